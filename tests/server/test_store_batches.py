"""SQLite store under bursts: grant rows past one INSERT and one batch, and ends queued among them."""

from __future__ import annotations

import dataclasses
import pathlib
import sqlite3

from session_authority.server._store import MAX_BATCH, MAX_ROWS_PER_INSERT, SqliteLeaseStore, StoredLease

PRINCIPALS = ("holder", "x" * 256, 'quote"back\\slash', "münchen", "tab\tctl\x01", "")


def _row(index: int) -> StoredLease:
    return StoredLease(
        digest=index.to_bytes(32, "big"),
        principal=f"{PRINCIPALS[index % len(PRINCIPALS)]}-{index}",
        tier="standard",
        idle_timeout=60.0 + index,
        max_duration=3600.0,
        granted_at=1000.0 + index,
        granted_wall=1_767_225_600.0 + index,
        last_activity=1000.5 + index,
    )


def _load(path: pathlib.Path) -> dict[bytes, StoredLease]:
    store = SqliteLeaseStore(path)
    try:
        return {row.digest: row for row in store.load().leases}
    finally:
        store.close()


def test_burst_past_max_batch_stores_every_row(tmp_path: pathlib.Path) -> None:
    count = 2 * MAX_BATCH + MAX_ROWS_PER_INSERT + 7
    store = SqliteLeaseStore(tmp_path)
    try:
        futures = [store.save_grant(_row(index)) for index in range(count)]
        for future in futures:
            future.result(timeout=30)
    finally:
        store.close()

    rows = _load(tmp_path)

    assert len(rows) == count
    for index in range(count):
        assert rows[index.to_bytes(32, "big")] == _row(index)


def test_end_queued_right_after_its_grant_is_stored(tmp_path: pathlib.Path) -> None:
    store = SqliteLeaseStore(tmp_path)
    try:
        futures = []
        for index in range(3000):
            futures.append(store.save_grant(_row(index)))
            futures.append(store.save_end(index.to_bytes(32, "big"), 2000.0, 1_767_227_600.0, 3, "admin"))
        for future in futures:
            future.result(timeout=30)
    finally:
        store.close()

    rows = _load(tmp_path)

    live = [row.principal for row in rows.values() if row.ended_at is None]
    assert live == []


def test_same_digest_twice_in_one_batch_keeps_last(tmp_path: pathlib.Path) -> None:
    store = SqliteLeaseStore(tmp_path)
    try:
        futures = [store.save_grant(_row(index)) for index in range(150)]
        replacement = StoredLease(
            digest=(5).to_bytes(32, "big"),
            principal="replacement",
            tier="short",
            idle_timeout=30.0,
            max_duration=900.0,
            granted_at=5000.0,
            granted_wall=1_767_230_000.0,
            last_activity=5000.0,
        )
        futures.append(store.save_grant(replacement))
        for future in futures:
            future.result(timeout=30)
    finally:
        store.close()

    rows = _load(tmp_path)

    assert rows[(5).to_bytes(32, "big")] == replacement


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_grant_span_round_trips(tmp_path: pathlib.Path) -> None:
    store = SqliteLeaseStore(tmp_path)
    try:
        store.save_grant(dataclasses.replace(_row(1), grant_span=TRACEPARENT)).result(timeout=30)
        store.save_grant(_row(2)).result(timeout=30)
    finally:
        store.close()

    rows = _load(tmp_path)

    assert rows[(1).to_bytes(32, "big")].grant_span == TRACEPARENT
    assert rows[(2).to_bytes(32, "big")].grant_span == ""


def test_store_without_grant_span_column_gains_it(tmp_path: pathlib.Path) -> None:
    # The leases table as stores wrote it before grant spans were kept.
    connection = sqlite3.connect(tmp_path / "leases.db")
    connection.executescript(
        """
        CREATE TABLE leases (
            digest BLOB PRIMARY KEY,
            version INTEGER NOT NULL,
            principal TEXT NOT NULL,
            tier TEXT NOT NULL,
            idle_timeout REAL NOT NULL,
            max_duration REAL NOT NULL,
            granted_at REAL NOT NULL,
            granted_wall REAL NOT NULL,
            last_activity REAL NOT NULL,
            ended_at REAL,
            ended_wall REAL,
            end_reason INTEGER,
            revoked_by TEXT NOT NULL DEFAULT ''
        ) WITHOUT ROWID;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        INSERT INTO meta VALUES ('version', '1');
        INSERT INTO leases VALUES (x'01', 1, 'holder', 'standard', 60.0, 3600.0, 1000.0, 1767225600.0, 1000.5,
            NULL, NULL, NULL, '');
        """
    )
    connection.commit()
    connection.close()

    store = SqliteLeaseStore(tmp_path)
    try:
        old_rows = store.load().leases
        store.save_grant(dataclasses.replace(_row(3), grant_span=TRACEPARENT)).result(timeout=30)
    finally:
        store.close()
    rows = _load(tmp_path)

    assert [(row.principal, row.grant_span) for row in old_rows] == [("holder", "")]
    assert rows[(3).to_bytes(32, "big")].grant_span == TRACEPARENT
    assert len(rows) == 2
