"""Lease stores: the interface behind the lease table, and its SQLite default.

Persisted times are on the *authority time* scale: seconds since the Unix
epoch as measured by the authority's monotonic clock from an anchor taken at
start-up. A start on the same boot as the anchor saved in the store takes that
anchor again, so authority time goes on with the monotonic clock. A restart
then neither lengthens nor shortens a lease, whatever the wall clock did.
Any other start (the first one, one after a reboot, or one on a store that
keeps no anchor) anchors at ``max(wall clock, highest time ever persisted)``,
so authority time never runs backwards. A wall clock that fell behind while
the authority was down then lengthens leases by up to that lag.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version written in every lease row and in the meta table."""

FLUSH_INTERVAL_SECONDS = 0.1
"""How often write-behind activity and the clock high-water mark are flushed."""

MAX_BATCH = 2048
"""Most operations grouped into one transaction."""

GROUP_COMMIT_WAIT_PER_WRITE_SECONDS = 0.0005
"""How long the writer waits for more writes before a commit, per write in the previous commit.

Under load, the writes queued during the wait share the commit's fsync and
its hand-offs between threads. The wait grows with the previous commit, so
it stays short at moderate load and reaches
:data:`GROUP_COMMIT_MAX_WAIT_SECONDS` under a burst. With a single write in
the previous commit, which is the case at low load, the writer commits at once.
"""

GROUP_COMMIT_MAX_WAIT_SECONDS = 0.005
"""Maximum wait for more writes before a commit.

A commit costs the authority about 1 ms of CPU across its threads (on a
2-core VM), more than a dozen grants' own store work, so during a burst
fewer and larger commits leave more CPU for grants. A reply waits at most
this much longer.
"""


class StoreError(Exception):
    """The store could not read or write; the message names the path."""


@dataclasses.dataclass(slots=True)
class StoredLease:
    """One lease row. Times are in authority time (see the module docstring)."""

    digest: bytes
    principal: str
    tier: str
    idle_timeout: float
    max_duration: float
    granted_at: float
    granted_wall: float
    last_activity: float
    ended_at: float | None = None
    ended_wall: float | None = None
    end_reason: int | None = None
    revoked_by: str = ""
    grant_span: str = ""
    """The grant span's context as a W3C ``traceparent`` value, or "" without tracing."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClockAnchor:
    """The mapping from one boot's monotonic clock to authority time.

    Attributes:
        boot_id: ``Clock.boot_id()`` of the monotonic clock it maps.
        offset: Authority time minus monotonic time, in seconds.
    """

    boot_id: str
    offset: float


@dataclasses.dataclass(slots=True)
class StoredState:
    """Everything a store returns at start-up."""

    leases: list[StoredLease]
    high_water: float


class LeaseStore(Protocol):
    """Durable home of the lease table.

    ``save_grant`` and ``save_end`` return futures that complete once the
    write is durable; the authority replies to a grant or a revoke only after
    that. ``save_activity`` is write-behind: losing it in a crash makes a
    lease end earlier than it would have, never later. Methods may be called
    from any thread and must not block on I/O.
    """

    description: str

    def load(self) -> StoredState: ...

    def save_grant(self, lease: StoredLease) -> concurrent.futures.Future[None]: ...

    def save_activity(self, digest: bytes, last_activity: float) -> None: ...

    def save_end(
        self,
        digest: bytes,
        ended_at: float,
        ended_wall: float,
        end_reason: int,
        revoked_by: str,
    ) -> concurrent.futures.Future[None]: ...

    def set_high_water(self, authority_time: float) -> None: ...

    def purge_ended_before(self, authority_time: float) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class ClockAnchorStore(Protocol):
    """A lease store that also keeps the authority's clock anchor.

    With such a store, an authority restarted on the same boot takes the
    saved anchor again instead of anchoring on the wall clock (see the module
    docstring). ``load_clock_anchor`` is called once at start-up and may
    block. ``save_clock_anchor`` may be called from any thread and must not
    block on I/O. It must make the anchor durable no later than any write
    queued after it, so that every row is read back with the offset it was
    written with.
    """

    def load_clock_anchor(self) -> ClockAnchor | None: ...

    def save_clock_anchor(self, anchor: ClockAnchor) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
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
    revoked_by TEXT NOT NULL DEFAULT '',
    grant_span TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""

_Operation = Callable[[sqlite3.Connection], None]
_Write = _Operation | StoredLease
"""A queued write: an operation on the connection, or a granted lease's row to insert."""
_NOTHING: object = object()

_INSERT_GRANT_PREFIX = (
    "INSERT OR REPLACE INTO leases (digest, version, principal, tier, idle_timeout,"
    " max_duration, granted_at, granted_wall, last_activity, grant_span) VALUES "
)
_GRANT_ROW_PLACEHOLDERS = "(?,?,?,?,?,?,?,?,?,?)"

MAX_ROWS_PER_INSERT = 99
"""Maximum number of lease rows in one INSERT statement.

One statement with many rows is one step of the SQLite library, and the
``sqlite3`` module releases the GIL around every step, so a batch of grants
costs one GIL hand-off instead of one per row. 99 rows of 10 columns stay
under 999 bound parameters, the default limit of SQLite before 3.32.0
(``SQLITE_MAX_VARIABLE_NUMBER``, 32766 since).
"""

_INSERT_GRANTS = [""] + [
    _INSERT_GRANT_PREFIX + ",".join([_GRANT_ROW_PLACEHOLDERS] * count) for count in range(1, MAX_ROWS_PER_INSERT + 1)
]
"""The INSERT statement for each number of rows, indexed by the count."""


@dataclasses.dataclass(frozen=True, slots=True)
class _PendingEnd:
    ended_at: float
    ended_wall: float
    end_reason: int
    revoked_by: str


@dataclasses.dataclass(frozen=True, slots=True)
class _EndMarker:
    """The place of a lease's end in the write queue.

    The commit whose batch reaches the marker writes the end, after every
    grant row queued before it, so the end always finds its lease's row.
    """

    digest: bytes

    def __call__(self, connection: sqlite3.Connection) -> None:
        """Write nothing here: the commit writes the end after the batch's rows."""


class SqliteLeaseStore:
    """Leases in an SQLite database in WAL mode, written by one thread.

    Writes are queued and the writer thread commits whatever has queued up in
    one transaction, so a burst of grants shares one fsync (group commit).
    While writes keep coming, it first waits for more, longer the more the
    previous commit held (up to :data:`GROUP_COMMIT_MAX_WAIT_SECONDS`).
    With ``synchronous=FULL`` a committed transaction survives a power loss;
    replies to grants and ends wait for their commit.

    Args:
        data_dir: Directory for ``leases.db`` (created if missing).
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = pathlib.Path(data_dir)
        self.path = self.data_dir / "leases.db"
        self.description = f"sqlite:{self.path}"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # The statement cache has room for every INSERT of _INSERT_GRANTS besides the other statements.
            self._connection = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, cached_statements=2 * MAX_ROWS_PER_INSERT
            )
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.executescript(_SCHEMA)
            self._add_missing_columns()
            self._check_version()
        except (OSError, sqlite3.Error) as exc:
            hint = ""
            if self.data_dir.is_dir() and not os.access(self.data_dir, os.W_OK):
                # SQLite reports a read-only directory only as "unable to open database file".
                hint = f"; the data directory {self.data_dir} is not writable (read-only filesystem or permissions)"
            raise StoreError(f"cannot open lease store {self.path}: {exc}{hint}") from exc
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_lock = threading.Lock()
        self._pending_activity: dict[bytes, float] = {}
        # Ends not yet committed, kept until a commit succeeds: an end lost to a
        # failed write would bring the lease back alive at the next start,
        # after its end was reported to the caller and audited.
        self._pending_ends: dict[bytes, _PendingEnd] = {}
        # Ends whose marker a failed commit took; every later commit writes them until one succeeds.
        self._retry_ends: set[bytes] = set()
        self._high_water: float | None = None
        self._clock_anchor: ClockAnchor | None = None
        self._closed = False
        self.commits = 0
        """Transactions committed so far; grouping keeps this far below the write count."""
        self._thread = threading.Thread(target=self._run, name="lease-store", daemon=True)
        self._thread.start()
        logger.info("lease store opened at %s", self.path)

    # -- reads (start-up only) -----------------------------------------------

    def load(self) -> StoredState:
        """Read every stored lease and the clock high-water mark."""
        try:
            rows = self._connection.execute(
                "SELECT digest, principal, tier, idle_timeout, max_duration, granted_at,"
                " granted_wall, last_activity, ended_at, ended_wall, end_reason, revoked_by, grant_span"
                " FROM leases"
            ).fetchall()
            high_water_row = self._connection.execute(
                "SELECT value FROM meta WHERE key = 'high_water'"
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read lease store {self.path}: {exc}") from exc
        leases = [StoredLease(*row) for row in rows]
        high_water = float(high_water_row[0]) if high_water_row else 0.0
        return StoredState(leases=leases, high_water=high_water)

    def load_clock_anchor(self) -> ClockAnchor | None:
        """Read the clock anchor saved by the latest authority on this store, or None if none was saved."""
        try:
            meta = dict(
                self._connection.execute(
                    "SELECT key, value FROM meta WHERE key IN ('clock_boot_id', 'clock_offset')"
                ).fetchall()
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read lease store {self.path}: {exc}") from exc
        if "clock_boot_id" not in meta or "clock_offset" not in meta:
            return None
        return ClockAnchor(boot_id=meta["clock_boot_id"], offset=float(meta["clock_offset"]))

    # -- writes --------------------------------------------------------------

    def save_grant(self, lease: StoredLease) -> concurrent.futures.Future[None]:
        # The row itself is queued, so the commit can insert consecutive rows with one executemany.
        return self._submit(lease)

    def save_activity(self, digest: bytes, last_activity: float) -> None:
        with self._pending_lock:
            if last_activity > self._pending_activity.get(digest, 0.0):
                self._pending_activity[digest] = last_activity

    def save_end(
        self,
        digest: bytes,
        ended_at: float,
        ended_wall: float,
        end_reason: int,
        revoked_by: str,
    ) -> concurrent.futures.Future[None]:
        """Queue a lease's end; the future fails if the next commit fails.

        An end whose commit failed stays queued and goes into every later
        commit until one succeeds, so a full or failing disk delays the end
        on disk but does not lose it while the authority runs.
        """
        with self._pending_lock:
            # A lease ends once: the first end reported wins.
            self._pending_ends.setdefault(digest, _PendingEnd(ended_at, ended_wall, end_reason, revoked_by))
        return self._submit(_EndMarker(digest))

    def set_high_water(self, authority_time: float) -> None:
        with self._pending_lock:
            if self._high_water is None or authority_time > self._high_water:
                self._high_water = authority_time

    def save_clock_anchor(self, anchor: ClockAnchor) -> None:
        """Queue the clock anchor. It is committed no later than any write queued after this call."""
        with self._pending_lock:
            self._clock_anchor = anchor

    def purge_ended_before(self, authority_time: float) -> None:
        def write(connection: sqlite3.Connection) -> None:
            connection.execute(
                "DELETE FROM leases WHERE ended_at IS NOT NULL AND ended_at < ?", (authority_time,)
            )

        self._submit(write)

    def flush(self, timeout_seconds: float) -> None:
        """Wait until every write queued before this call has been committed.

        Raises:
            StoreError: The writes did not land within ``timeout_seconds``.
        """
        try:
            self._submit(lambda connection: None).result(timeout_seconds)
        except concurrent.futures.TimeoutError as exc:
            raise StoreError(f"lease store {self.path} did not commit within {timeout_seconds} s") from exc

    def close(self) -> None:
        """Flush everything queued, stop the writer thread and close the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        with self._pending_lock:
            unwritten_ends = len(self._pending_ends)
        if unwritten_ends:
            logger.error(
                "lease store %s closed with %d lease ends not written; those leases read as live after the"
                " next start until their idle or max-duration deadline",
                self.path,
                unwritten_ends,
            )
        try:
            self._connection.close()
        except sqlite3.Error:
            logger.exception("closing lease store %s failed", self.path)
        logger.info("lease store closed at %s", self.path)

    # -- writer thread -------------------------------------------------------

    def _add_missing_columns(self) -> None:
        # A store written before grant spans were kept lacks their column. The
        # column has a default, so adding it keeps every row and the format version.
        columns = {row[1] for row in self._connection.execute("PRAGMA table_info(leases)")}
        if "grant_span" not in columns:
            self._connection.execute("ALTER TABLE leases ADD COLUMN grant_span TEXT NOT NULL DEFAULT ''")
            logger.info("lease store %s: added the grant_span column", self.path)

    def _check_version(self) -> None:
        row = self._connection.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if row is None:
            self._connection.execute(
                "INSERT INTO meta (key, value) VALUES ('version', ?)", (str(FORMAT_VERSION),)
            )
        elif int(row[0]) != FORMAT_VERSION:
            raise StoreError(
                f"lease store {self.path} has format version {row[0]}, this authority reads"
                f" version {FORMAT_VERSION}; upgrade the authority or point --data-dir elsewhere"
            )

    def _submit(self, write: _Write) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(StoreError(f"lease store {self.path} is closed"))
            return future
        self._queue.put((write, future))
        return future

    def _run(self) -> None:
        previous_batch_size = 0
        while True:
            batch: list[tuple[_Write, concurrent.futures.Future[None]]] = []
            try:
                item = self._queue.get(timeout=FLUSH_INTERVAL_SECONDS)
            except queue.Empty:
                item = _NOTHING
            stopping = self._take_queued(item, batch)
            wait = min(GROUP_COMMIT_MAX_WAIT_SECONDS, previous_batch_size * GROUP_COMMIT_WAIT_PER_WRITE_SECONDS)
            if not stopping and 0 < len(batch) < MAX_BATCH and previous_batch_size > 1 and wait > 0:
                time.sleep(wait)
                stopping = self._take_queued(_NOTHING, batch)
            previous_batch_size = len(batch)
            try:
                self._commit(batch)
            except Exception:  # noqa: BLE001 - the only writer thread must outlive any one batch
                logger.exception("lease store writer failed on a batch of %d writes; continuing", len(batch))
                for _, future in batch:
                    _settle(future, StoreError(f"writing lease store {self.path} failed unexpectedly"))
            if stopping:
                return

    def _take_queued(self, item: object, batch: list[tuple[_Write, concurrent.futures.Future[None]]]) -> bool:
        """Append ``item`` (unless it is ``_NOTHING``) and every write queued behind it to ``batch``, up to :data:`MAX_BATCH`.

        Returns:
            True if the stop marker was taken, which ends the batch.
        """
        while len(batch) < MAX_BATCH:
            if item is _NOTHING:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return False
            if item is None:
                return True
            batch.append(item)  # type: ignore[arg-type]
            item = _NOTHING
        return False

    def _commit(self, batch: list[tuple[_Write, concurrent.futures.Future[None]]]) -> None:
        with self._pending_lock:
            activity, self._pending_activity = self._pending_activity, {}
            # An end is due once its marker is in the batch. Writing it
            # earlier, while its grant row waits for a later batch, would
            # update no row and lose the end.
            due = self._retry_ends.union(write.digest for write, _ in batch if isinstance(write, _EndMarker))
            self._retry_ends = set()
            ends = {digest: self._pending_ends.pop(digest) for digest in due if digest in self._pending_ends}
            high_water, self._high_water = self._high_water, None
            anchor, self._clock_anchor = self._clock_anchor, None
        if not batch and not activity and not ends and high_water is None and anchor is None:
            return
        connection = self._connection
        try:
            connection.execute("BEGIN IMMEDIATE")
            if anchor is not None:
                connection.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [("clock_boot_id", anchor.boot_id), ("clock_offset", repr(anchor.offset))],
                )
            _apply_in_order(connection, batch)
            if ends:
                # After the batch's grants, so an end granted and ended within one batch finds its row.
                connection.executemany(
                    "UPDATE leases SET ended_at = ?, ended_wall = ?, end_reason = ?, revoked_by = ?"
                    " WHERE digest = ? AND ended_at IS NULL",
                    [
                        (end.ended_at, end.ended_wall, end.end_reason, end.revoked_by, digest)
                        for digest, end in ends.items()
                    ],
                )
            if activity:
                connection.executemany(
                    "UPDATE leases SET last_activity = ? WHERE digest = ? AND last_activity < ?",
                    [(at, digest, at) for digest, at in activity.items()],
                )
            if high_water is not None:
                connection.execute(
                    "INSERT INTO meta (key, value) VALUES ('high_water', ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value"
                    " WHERE CAST(excluded.value AS REAL) > CAST(meta.value AS REAL)",
                    (repr(high_water),),
                )
            connection.execute("COMMIT")
            self.commits += 1
        except (OSError, sqlite3.Error) as exc:
            logger.error("lease store write to %s failed: %s", self.path, exc)
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error:
                logger.debug("rollback after failed write found no transaction", exc_info=True)
            error = StoreError(f"writing lease store {self.path} failed: {exc}")
            for _, future in batch:
                _settle(future, error)
            # Ends, activity, the high-water mark and the clock anchor are
            # retried with the next batch. Losing activity only shortens
            # leases, but a lost end would make a revoked lease live again
            # after a restart.
            with self._pending_lock:
                for digest, at in activity.items():
                    if at > self._pending_activity.get(digest, 0.0):
                        self._pending_activity[digest] = at
                for digest, end in ends.items():
                    self._pending_ends.setdefault(digest, end)
                    self._retry_ends.add(digest)
                if high_water is not None and (self._high_water is None or high_water > self._high_water):
                    self._high_water = high_water
                if anchor is not None and self._clock_anchor is None:
                    self._clock_anchor = anchor
            return
        for _, future in batch:
            _settle(future, None)


def _apply_in_order(connection: sqlite3.Connection, batch: list[tuple[_Write, concurrent.futures.Future[None]]]) -> None:
    """Run a batch's writes in queue order, inserting each run of consecutive lease rows with few statements."""
    rows: list[StoredLease] = []
    for write, _ in batch:
        if isinstance(write, StoredLease):
            rows.append(write)
            continue
        if rows:
            _insert_grants(connection, rows)
            rows = []
        write(connection)
    if rows:
        _insert_grants(connection, rows)


def _insert_grants(connection: sqlite3.Connection, rows: list[StoredLease]) -> None:
    """Insert lease rows with one statement per :data:`MAX_ROWS_PER_INSERT` rows."""
    for start in range(0, len(rows), MAX_ROWS_PER_INSERT):
        chunk = rows[start : start + MAX_ROWS_PER_INSERT]
        parameters: list[object] = []
        for row in chunk:
            parameters += (
                row.digest,
                FORMAT_VERSION,
                row.principal,
                row.tier,
                row.idle_timeout,
                row.max_duration,
                row.granted_at,
                row.granted_wall,
                row.last_activity,
                row.grant_span,
            )
        connection.execute(_INSERT_GRANTS[len(chunk)], parameters)


def _settle(future: concurrent.futures.Future[None], error: Exception | None) -> None:
    """Complete a write's future unless its waiter already cancelled it.

    A cancelled waiter does not cancel the write itself: the row is committed
    (or not) all the same, and only the result goes unreported.
    """
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        logger.debug("lease store write finished after its waiter cancelled it")
