"""Tests of the audit log's event ID index: duplicates found across rotation, reopen and moved files."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from session_authority.server._audit import (
    CURRENT_FILE_NAME,
    AuditLog,
    AuditReceipt,
    list_audit_files,
    verify,
)

from audit_support import WALL_START, SteppingWallClock, released_end_fields

MAX_BYTES = 4096


def digest_hex(index: int) -> str:
    return hashlib.sha256(f"lease-{index}".encode()).hexdigest()


def open_log(directory: Path) -> AuditLog:
    return AuditLog(directory, max_bytes=MAX_BYTES, fsync=False, wall_clock=SteppingWallClock())


def append_until_files(log: AuditLog, directory: Path, files: int) -> dict[str, tuple[str, AuditReceipt]]:
    """Append grant and end events of new leases, and one text ID per lease, until ``files`` files exist."""
    written: dict[str, tuple[str, AuditReceipt]] = {}
    index = 0
    while len(list_audit_files(directory)) < files:
        for event_type in ("grant", "end"):
            event_id = f"{event_type}:{digest_hex(index)}"
            written[event_id] = (event_type, log.append(event_id, event_type, released_end_fields(index)))
        text_id = f"revoke:lease-{index}"
        written[text_id] = ("revoke", log.append(text_id, "revoke", released_end_fields(index)))
        index += 1
    return written


def file_of(directory: Path, receipt: AuditReceipt) -> Path:
    """Return the audit file that contains the record with the receipt's seq."""
    for path in list_audit_files(directory):
        for line in path.read_bytes().splitlines():
            if f'"seq":{receipt.seq},'.encode() in line:
                return path
    raise AssertionError(f"no record with seq {receipt.seq} in {directory}")


def test_index_duplicates_across_rotation(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with open_log(directory) as log:
        written = append_until_files(log, directory, 4)
        files = list_audit_files(directory)
        indexed = set(files[-2:])
        sizes = {path: path.stat().st_size for path in files}

        repeats = {}
        for event_id, (event_type, original) in written.items():
            if file_of(directory, original) in indexed:
                repeats[event_id] = (original, log.append(event_id, event_type, released_end_fields(0)))

        assert {path: path.stat().st_size for path in list_audit_files(directory)} == sizes
    assert repeats
    for event_id, (original, repeat) in repeats.items():
        assert repeat == AuditReceipt(seq=original.seq, hash=original.hash, duplicate=True), event_id


def test_index_forgets_file_two_rotations_back(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with open_log(directory) as log:
        first_id = f"end:{digest_hex(0)}"
        log.append(first_id, "end", released_end_fields(0))
        append_until_files(log, directory, 3)

        contained = log.contains(first_id)
        again = log.append(first_id, "end", released_end_fields(0))

    assert not contained
    assert not again.duplicate


def test_index_same_digest_other_type_written(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        grant = log.append(f"grant:{digest_hex(1)}", "grant", released_end_fields(1))
        end = log.append(f"end:{digest_hex(1)}", "end", released_end_fields(1))

    assert not grant.duplicate
    assert not end.duplicate
    assert end.seq == grant.seq + 1


def test_index_upper_case_hex_distinct(tmp_path: Path) -> None:
    lower = f"end:{digest_hex(2)}"
    upper = f"end:{digest_hex(2).upper()}"
    with open_log(tmp_path) as log:
        first = log.append(lower, "end", released_end_fields(2))
        second = log.append(upper, "end", released_end_fields(2))
        repeat = log.append(upper, "end", released_end_fields(2))

    assert not first.duplicate
    assert not second.duplicate
    assert repeat == AuditReceipt(seq=second.seq, hash=second.hash, duplicate=True)


def test_index_duplicates_after_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with open_log(directory) as log:
        written = append_until_files(log, directory, 3)
    files = list_audit_files(directory)
    sizes = {path: path.stat().st_size for path in files}
    indexed = set(files[-2:])

    with open_log(directory) as log:
        for event_id, (event_type, original) in written.items():
            if file_of(directory, original) not in indexed:
                continue
            repeat = log.append(event_id, event_type, released_end_fields(0))

            assert repeat == AuditReceipt(seq=original.seq, hash=original.hash, duplicate=True), event_id
    assert {path: path.stat().st_size for path in list_audit_files(directory)} == sizes
    assert verify(directory).ok


def test_index_previous_file_moved_while_open(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    archive = tmp_path / "archive"
    archive.mkdir()
    with open_log(directory) as log:
        early_id = f"end:{digest_hex(0)}"
        original = log.append(early_id, "end", released_end_fields(0))
        while len(list_audit_files(directory)) < 2:
            log.append(f"end:{digest_hex(log.last_seq + 1000)}", "end", released_end_fields(log.last_seq))
        previous = list_audit_files(directory)[0]
        previous.rename(archive / previous.name)

        repeat = log.append(early_id, "end", released_end_fields(0))

    assert repeat == AuditReceipt(seq=original.seq, hash=original.hash, duplicate=True)


def test_index_record_changed_while_open_writes_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    event_id = f"end:{digest_hex(3)}"
    other_id = f"end:{digest_hex(4)}"
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        log.append(event_id, "end", released_end_fields(3))
        data = path.read_bytes()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data.replace(event_id.encode(), other_id.encode()), 0)
        finally:
            os.close(fd)

        with caplog.at_level(logging.ERROR, logger="session_authority.server._audit"):
            again = log.append(event_id, "end", released_end_fields(3))

    assert not again.duplicate
    assert again.seq == 2
    assert "was changed while open" in caplog.text
    # The record is in the file again, after the changed one.
    assert path.read_bytes().count(event_id.encode()) == 1


def test_older_files_search_finds_unindexed(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with open_log(directory) as log:
        written = append_until_files(log, directory, 5)
        unindexed = {event_id for event_id in written if not log.contains(event_id)}
        found = log.find_in_older_files([*unindexed, f"end:{digest_hex(10_000)}"], written_since=WALL_START - 1)

    assert unindexed
    assert found == unindexed


def test_older_files_search_stops_at_limits(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with open_log(directory) as log:
        written = append_until_files(log, directory, 5)
        unindexed = [event_id for event_id in written if not log.contains(event_id)]
        # Every older file was written before this time, so only the newest one is read.
        newest_only = log.find_in_older_files(unindexed, written_since=WALL_START + 10_000)
        within_one_byte = log.find_in_older_files(unindexed, written_since=WALL_START - 1, max_bytes=1)

    assert newest_only
    assert newest_only == within_one_byte
    assert len(newest_only) < len(unindexed)


def test_older_files_search_skips_torn_record(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with open_log(directory) as log:
        written = append_until_files(log, directory, 5)
        unindexed = [event_id for event_id in written if not log.contains(event_id)]
        torn = unindexed[1]
        path = file_of(directory, written[torn][1])
        # Cut the record's line just after its event ID, as a truncation in the middle of it would.
        data = path.read_bytes()
        cut = data.index(torn.encode()) + len(torn) + 1
        end_of_line = data.index(b"\n", cut)
        path.write_bytes(data[:cut] + data[end_of_line:])

        found = log.find_in_older_files(unindexed, written_since=WALL_START - 1)

    assert torn not in found
    assert found == set(unindexed) - {torn}
