"""Tamper-evident audit log: hash-chained JSON Lines files, a background sink, verify, tail and CLI.

Each record is one JSON object on one line, with sorted keys and compact
separators, so its bytes are reproducible. Every record carries ``prev``, the
SHA-256 of the previous record's line bytes (without the newline). Editing,
deleting, inserting or reordering a record therefore breaks the chain at that
record or at the one after it, and :func:`verify` reports the first break.

Files live in one directory: ``audit.jsonl`` is written, and rotated files are
named ``audit-<first seq, 12 digits>.jsonl`` so that they sort in chain order.
A rotated file is never written again, and the first record of every newer
file is a ``rotate`` record that names the file before it and continues the
chain from that file's last record.

The chain alone cannot show that records were cut from its end, because no
later record is left to disagree. So after every durable write the log also
stores the seq and hash of its last record in ``last-hash.json``, replaced
atomically, and :func:`verify` checks a directory against that file.

A lease store outlives an audit chain when the operator moves an audit
directory aside and starts a new chain in an empty one. ``chain-start.json``
stores the authority time at which the chain in a directory started, so that
the authority writes no grant record of an earlier chain into it again.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from session_authority.clients._common import OneLineArgumentParser

from ._log_limit import LogLimit

try:
    import fcntl
except ImportError:  # Windows has no fcntl, so the directory lock is skipped there.
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Value of the ``v`` field written by this module; :func:`verify` accepts only this version."""

ZERO_HASH = "0" * 64
"""``prev`` of the first record of the first file."""

CURRENT_FILE_NAME = "audit.jsonl"
"""Name of the file that records are appended to."""

LOCK_FILE_NAME = "audit.lock"
"""File in the audit directory on which the writing process takes an exclusive ``flock``."""

LAST_HASH_FILE_NAME = "last-hash.json"
"""File in the audit directory that stores the seq and hash of the last durable record."""

CHAIN_START_FILE_NAME = "chain-start.json"
"""File in the audit directory that stores the authority time at which its chain started."""

MAX_BATCH_RECORDS = 1024
"""Maximum number of queued records that :class:`AuditSink` writes with one write and one fsync."""

BATCH_WAIT_SECONDS = 0.005
"""How long :class:`AuditSink` waits for more events before a write, when its previous write contained more than one.

Under a burst, the events queued during the wait share the write's two
fsyncs and its hand-offs between threads. With a single event in the
previous write, which is the case at low load, the sink writes at once.
"""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default size at which ``audit.jsonl`` is rotated (64 MiB)."""

MIN_MAX_BYTES = 1024
"""Smallest accepted ``max_bytes``, so a file has room for its rotate record and a few records."""

MAX_EVENT_ID_LENGTH = 256
"""Longest accepted ``event_id``, in characters."""

EVENT_TYPES = frozenset({"grant", "revoke", "end"})
"""Record types that callers append."""

ROTATE_TYPE = "rotate"
"""Record type that the log writes itself as the first record of every file after the first."""

RECORD_FIELDS = ("v", "seq", "event_id", "type", "time", "prev")
"""Fields that the log sets on every record; callers' fields must not use these names."""

_ROTATED_FILE_NAME = re.compile(r"audit-(\d{12})\.jsonl")
_FINGERPRINT = re.compile(r"[0-9a-f]{12}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# Event IDs of the form the authority writes, "<type>:<lease digest as 64
# lower-case hex>", and the one-byte code of each type in an index key.
_DIGEST_EVENT_ID = re.compile(r"(grant|revoke|end):([0-9a-f]{64})")
_INDEX_TYPE_CODES = {"grant": b"g", "revoke": b"r", "end": b"e"}

# The event ID of a record as the canonical encoder writes it, quotes included.
_EVENT_ID_FIELD = re.compile(rb'"event_id":("(?:[^"\\]|\\.)*")')

MAX_RECORD_SEARCH_BYTES = 1 << 20
"""Most bytes read back to find the start of the log's last record after something else appended to its file."""

OLDER_FILES_SCAN_MAX_BYTES = 1 << 30
"""Most bytes of older audit files read at start-up to find records that stored leases are owed."""

VERIFY_ATTEMPTS = 3
"""Maximum number of times :func:`verify` reads a directory whose files changed during a failed check."""

_IndexKey = bytes | str
_EventIndex = dict[_IndexKey, int]
"""Event IDs of one audit file, each mapped to the byte offset of its record's line in that file."""


def _index_key(event_id: str) -> _IndexKey:
    """Return the key of an event ID in an :data:`_EventIndex`.

    An ID of the form ``<type>:<64 lower-case hex>`` becomes 33 bytes (a type
    code and the raw digest), less than half the memory of the text. Any other
    ID stays text. A bytes key never equals a str key, so two different IDs
    never share a key.
    """
    match = _DIGEST_EVENT_ID.fullmatch(event_id) if isinstance(event_id, str) else None
    if match is None:
        return event_id
    return _INDEX_TYPE_CODES[match.group(1)] + bytes.fromhex(match.group(2))


# --------------------------------------------------------------------------
# Encoding


def utc_isoformat(epoch_seconds: float) -> str:
    """Format seconds since the Unix epoch as UTC ISO 8601 with microseconds and offset.

    Example: ``2026-12-04T21:09:57.123456+00:00``. Use it for ``granted_at``
    and ``ended_at`` so that every timestamp in the log has the same form.
    """
    moment = datetime.datetime.fromtimestamp(epoch_seconds, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="microseconds")


def record_hash(line: bytes) -> str:
    """Return the SHA-256 (lower-case hex) of a record's line bytes, without the newline."""
    return hashlib.sha256(line).hexdigest()


def rotated_file_name(first_seq: int) -> str:
    """Return the name of a rotated file whose first record has ``first_seq``."""
    return f"audit-{first_seq:012d}.jsonl"


# The options of the canonical form. One shared encoder skips the set-up
# that json.dumps repeats per call; JSONEncoder.encode keeps no state, so
# any thread may use it.
_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _encode(record: Mapping[str, object]) -> bytes:
    """Encode a record in the canonical form: sorted keys, compact separators, UTF-8."""
    return _CANONICAL_ENCODER.encode(record).encode("utf-8")


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """Return the JSON object on a line, or None if the line is not one.

    ``NaN`` and ``Infinity`` are rejected because the writer never emits them.
    """
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors.
        return None
    if not isinstance(value, dict):
        return None
    return value


def _is_seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_event(event_id: str, type: str, fields: Mapping[str, object]) -> dict[str, object]:
    """Validate a caller's event and return a copy of its fields.

    Raises:
        ValueError: Invalid event_id or type, a reserved or forbidden field
            name, a fingerprint that is not 12 hex characters, or a value
            that JSON cannot represent exactly (NaN, infinity).
        TypeError: A field name that is not a string, or a value that is not
            JSON-serializable.
    """
    if not isinstance(event_id, str) or not event_id:
        raise ValueError(f"event_id must be a non-empty string such as 'end:<digest>', got {event_id!r}")
    if len(event_id) > MAX_EVENT_ID_LENGTH:
        raise ValueError(
            f"event_id must be at most {MAX_EVENT_ID_LENGTH} characters, got {len(event_id)}; "
            "use a digest rather than the full payload"
        )
    if type not in EVENT_TYPES:
        hint = "; rotate records are written by the log itself" if type == ROTATE_TYPE else ""
        raise ValueError(f"type must be one of {sorted(EVENT_TYPES)}, got {type!r}{hint}")

    copied = dict(fields)
    for name in copied:
        if not isinstance(name, str):
            raise TypeError(f"field names must be strings, got {name!r}")
        if name in RECORD_FIELDS:
            raise ValueError(f"field {name!r} is set by the audit log itself; pass it under another name")
    if "lease_id" in copied:
        raise ValueError(
            "field 'lease_id' is not allowed: a lease ID is a bearer credential, so record its 'fingerprint'"
        )
    fingerprint = copied.get("fingerprint")
    if fingerprint is not None and not (isinstance(fingerprint, str) and _FINGERPRINT.fullmatch(fingerprint)):
        # The value is not echoed: a caller who passes the raw lease ID here
        # would otherwise leak it into whatever logs this error.
        length = len(fingerprint) if isinstance(fingerprint, str) else None
        raise ValueError(
            "field 'fingerprint' must be the 12 lower-case hex characters of the lease fingerprint, "
            f"got a {fingerprint.__class__.__name__}" + (f" of {length} characters" if length is not None else "")
        )

    if _encodes_as_is(copied):
        return copied
    try:
        _encode(copied)
    except TypeError as exc:
        raise TypeError(
            f"audit fields must be JSON-serializable (str, int, float, bool, None, list, dict): {exc}"
        ) from exc
    except ValueError as exc:
        raise ValueError(f"audit fields must be finite numbers and valid text: {exc}") from exc
    return copied


_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def _encodes_as_is(fields: Mapping[str, object]) -> bool:
    """Return whether :func:`_encode` is sure to accept ``fields``, judged from the value types alone.

    True when every name is ASCII text and every value is ASCII text, an
    int of up to 64 bits, a bool, None or a finite float, which covers the
    fields of the authority's own events. Any other value returns False, and the caller
    then encodes the fields to find out. Non-ASCII text is in that group,
    because text with a lone surrogate fails to encode as UTF-8.
    """
    for name, value in fields.items():
        if not name.isascii():
            return False
        kind = type(value)
        if kind is str:
            if not value.isascii():  # type: ignore[attr-defined]
                return False
        elif kind is float:
            if not math.isfinite(value):  # type: ignore[arg-type]
                return False
        elif kind is int:
            # Python refuses to format ints past sys.get_int_max_str_digits()
            # digits (3.11 and later), so only ints of up to 64 bits skip the check.
            if not _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
                return False
        elif kind is not bool and value is not None:
            return False
    return True


# --------------------------------------------------------------------------
# Writing


@dataclasses.dataclass(frozen=True)
class AuditReceipt:
    """Proof that a record is in the log.

    Attributes:
        seq: Sequence number of the record.
        hash: SHA-256 (hex) of the record's line; the next record's ``prev``.
        duplicate: True when the event ID was already in the log, so nothing
            was written and ``seq`` and ``hash`` are those of the original.
    """

    seq: int
    hash: str
    duplicate: bool = False


class AuditWriteError(OSError):
    """The audit log could not be opened, recovered or appended to.

    ``filename`` names the file; ``errno`` is that of the underlying error
    when there is one. ``str()`` of the error is its message alone, a
    sentence that names the path, the problem and what to do next. When
    raised by :meth:`AuditLog.append`, nothing of the record stays in the
    file, so the caller may retry with the same event ID.
    """

    def __str__(self) -> str:
        # OSError would print "[Errno N] message: 'filename'", which makes the
        # file look like the subject of the advice when the message means the
        # directory. Every message raised here names its path already.
        return self.strerror or super().__str__()


@dataclasses.dataclass(frozen=True)
class LastHash:
    """Seq and hash of the last durable record of a log, as stored in ``last-hash.json``.

    Attributes:
        seq: Seq of the record.
        hash: SHA-256 (hex) of the record's line.
        chain_start_time: The authority time in ``chain-start.json`` when
            the writer read or wrote that file, else None. It shows that the
            chain has a ``chain-start.json`` even after that file is deleted.
    """

    seq: int
    hash: str
    chain_start_time: float | None = None


_Anchor = TypeVar("_Anchor")


def read_last_hash(directory: Path) -> LastHash | None:
    """Read the ``last-hash.json`` file of an audit directory.

    Returns:
        Its seq and hash, or None when the directory has no such file (a log
        written before the file existed, or one with no record yet).

    Raises:
        ValueError: The file is not a valid last-hash record; the message
            names the file and the problem.
        OSError: The file exists but cannot be read.
    """
    return _read_anchor_file(Path(directory) / LAST_HASH_FILE_NAME, _parse_last_hash)


def _read_anchor_file(path: Path, parse: Callable[[bytes], _Anchor]) -> _Anchor | None:
    """Read and parse one of the small JSON files beside the chain; None when it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return parse(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _parse_versioned(data: bytes) -> dict[str, Any]:
    """Return the JSON object of an anchor file, checked for its format version."""
    record = _parse_line(data.rstrip(b"\n"))
    if record is None:
        raise ValueError("not a JSON object, so it was edited or corrupted")
    if record.get("v") != FORMAT_VERSION:
        raise ValueError(f"unknown format version {record.get('v')!r}; this version reads {FORMAT_VERSION}")
    return record


def _parse_last_hash(data: bytes) -> LastHash:
    record = _parse_versioned(data)
    seq, digest = record.get("seq"), record.get("hash")
    if not _is_seq(seq):
        raise ValueError(f"seq must be a positive integer, got {seq!r}")
    if not (isinstance(digest, str) and _SHA256_HEX.fullmatch(digest)):
        raise ValueError(f"hash must be 64 lower-case hex characters, got {digest!r}")
    chain_start_time = record.get("chain_start_time")
    if chain_start_time is not None and not _is_seconds(chain_start_time):
        raise ValueError(f"chain_start_time must be a number of seconds, got {chain_start_time!r}")
    if chain_start_time is not None:
        chain_start_time = float(chain_start_time)
    return LastHash(seq=seq, hash=digest, chain_start_time=chain_start_time)


def _is_seconds(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def read_chain_start(directory: Path) -> float | None:
    """Read the ``chain-start.json`` file of an audit directory.

    Returns:
        The authority time (seconds) at which the chain in the directory
        started, or None when the directory has no such file (a chain
        started by a version that did not write it).

    Raises:
        ValueError: The file is not a valid chain-start record; the message
            names the file and the problem.
        OSError: The file exists but cannot be read.
    """
    return _read_anchor_file(Path(directory) / CHAIN_START_FILE_NAME, _parse_chain_start)


def _parse_chain_start(data: bytes) -> float:
    record = _parse_versioned(data)
    authority_time = record.get("authority_time")
    if not _is_seconds(authority_time):
        raise ValueError(f"authority_time must be a number of seconds, got {authority_time!r}")
    return float(authority_time)


def _write_file_atomically(path: Path, data: bytes, fsync: bool) -> None:
    """Replace ``path`` with ``data``: write a temporary file, fsync it, rename it over ``path``.

    On failure the temporary file is removed, so that only a crash can leave it behind.
    """
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError:
        try:
            temporary.unlink()
        except OSError:
            logger.debug("failed to remove %s after a failed replacement of %s", temporary, path, exc_info=True)
        raise


@dataclasses.dataclass(slots=True)
class _Event:
    """One validated event on its way into the log."""

    event_id: str
    type: str
    fields: dict[str, object]
    on_written: Callable[[AuditReceipt], None] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _EncodedLine:
    """A record line encoded for a write that has not happened yet, with the seq and hash it will have."""

    event_id: str
    type: str
    line: bytes
    seq: int
    hash: str
    # The event ID's key in the index, worked out once per record; None for a rotate record.
    key: _IndexKey | None = None


@dataclasses.dataclass
class _ScannedFile:
    """Chain state and event IDs read from one file when the log is opened."""

    event_ids: _EventIndex
    first_seq: int = 0
    last_seq: int = 0
    last_hash: str = ZERO_HASH
    last_version: object = FORMAT_VERSION
    starts_with_rotate: bool = False
    records: int = 0
    # Hash of the record whose seq is find_seq, if the file has it.
    found_hash: str | None = None


def _scan_records(path: Path, data: bytes, find_seq: int = 0, warn_invalid: bool = True) -> _ScannedFile:
    """Index the complete lines of one file. Lines that do not parse are skipped, and logged if ``warn_invalid``."""
    scanned = _ScannedFile(event_ids={})
    lines = data.split(b"\n")[:-1]
    next_offset = 0
    for line_number, line in enumerate(lines, start=1):
        offset = next_offset
        next_offset += len(line) + 1
        record = _parse_line(line)
        if record is None or not _is_seq(record.get("seq")):
            if not warn_invalid:
                continue
            logger.warning(
                "audit file %s line %d is not a valid record; run 'session-authority audit verify' on %s",
                path,
                line_number,
                path.parent,
            )
            continue
        digest = record_hash(line)
        seq = record["seq"]
        if scanned.records == 0:
            scanned.first_seq = seq
            scanned.starts_with_rotate = record.get("type") == ROTATE_TYPE
        scanned.records += 1
        scanned.last_seq = seq
        scanned.last_hash = digest
        scanned.last_version = record.get("v")
        if seq == find_seq:
            scanned.found_hash = digest
        event_id = record.get("event_id")
        if record.get("type") != ROTATE_TYPE and isinstance(event_id, str):
            scanned.event_ids[_index_key(event_id)] = offset
    return scanned


def _is_record_of(data: bytes, position: int, event_id: str) -> bool:
    """Return whether the line of ``data`` around ``position`` is a complete record of ``event_id``."""
    start = data.rfind(b"\n", 0, position) + 1
    end = data.find(b"\n", position)
    if end < 0:
        return False
    record = _parse_line(data[start:end])
    return record is not None and record.get("event_id") == event_id and _is_seq(record.get("seq"))


def _last_record_time(data: bytes) -> float:
    """Return the wall time at which the last complete record of a file was written, or -inf if none reads."""
    for line in reversed(data.split(b"\n")):
        record = _parse_line(line) if line else None
        if record is None or not isinstance(record.get("time"), str):
            continue
        try:
            return datetime.datetime.fromisoformat(record["time"]).timestamp()
        except ValueError:
            continue
    return -math.inf


def _list_rotated_files(directory: Path) -> list[tuple[int, Path]]:
    """Return ``(first seq, path)`` of the rotated files in a directory, oldest first."""
    found = []
    for entry in directory.iterdir():
        match = _ROTATED_FILE_NAME.fullmatch(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    found.sort()
    return found


def _fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a created or renamed file) durable."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torn_tail_start(data: bytes) -> int:
    """Return the length of a file's bytes without a torn last line.

    A crash in the middle of a write leaves a last line without its newline,
    or, on file systems that extend the file before its data lands, a last
    line with zero bytes in it. A complete last line without zero bytes that
    is not a record did not come from an interrupted write, so it is kept
    for ``verify`` to report.
    """
    # NOTE: only the last line is checked. A crash in a write of several
    # records can damage more than one line, but only on a file system that
    # persists later blocks of a write before earlier ones. Verify reports it.
    keep = data.rfind(b"\n") + 1
    if keep > 0:
        last_start = data.rfind(b"\n", 0, keep - 1) + 1
        last_line = data[last_start : keep - 1]
        if b"\0" in last_line and _parse_line(last_line) is None:
            keep = last_start
    return keep


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_at(fd: int, length: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, length, offset)
    # Windows has no pread. Seeking is safe because the caller has the log's lock.
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, length)


def _read_to_end(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := _read_at(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_line_at(fd: int, offset: int) -> bytes:
    """Return the line that starts at ``offset`` in a file, without its newline (to the end if it has none)."""
    chunks: list[bytes] = []
    chunk_size = 4096
    while True:
        chunk = _read_at(fd, chunk_size, offset)
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)
        chunk_size = min(chunk_size * 4, 1 << 24)


class AuditLog:
    """An append-only, hash-chained JSON Lines audit log in one directory.

    Opening the log recovers ``seq`` and the last hash from ``audit.jsonl``,
    or from the newest rotated file when ``audit.jsonl`` is missing or empty.
    It removes a torn last line left by a crash. It loads the event IDs of the
    current and the previous file, so that :meth:`append` writes each event
    once. The event IDs of older files are not kept, so a retry that arrives
    after two rotations is written again.

    Only one ``AuditLog`` may write a directory at a time: the log holds an
    exclusive ``flock`` on ``audit.lock`` there (on POSIX systems) until
    :meth:`close`.

    After each durable write the log replaces ``last-hash.json`` with the seq
    and hash of its last record. Opening a directory whose log ends before
    that record, or contains another record at that seq, raises
    :class:`AuditWriteError`, so that new records cannot cover up records
    removed from the end while the log was closed. Opening a log that has
    records but no ``last-hash.json`` logs a warning, because then nothing
    shows whether records were cut from its end. Opening and closing never
    write ``last-hash.json`` on their own: only a log that has appended a
    record does, so a start that fails before its first record keeps the
    evidence of a missing file for ``audit verify --strict`` and the next open.

    Before each write the log checks that ``audit.jsonl`` is still the file
    it has open and has the size it wrote. When something else moved,
    deleted or replaced the file, the log starts a new one as if it had
    rotated. When something else appended to, edited or truncated it, the
    log keeps every byte and writes after the file's real end. Either way it
    logs one error that names the change and keeps writing, and ``audit
    verify`` reports the change. An edit that keeps the file's size is not
    noticed until a duplicate of the edited record is looked up, or until
    ``audit verify`` runs.

    Threading: all methods may be called from any thread; one lock serializes
    them, and :meth:`append` blocks on disk I/O (including ``fsync``) while
    holding it. Use :class:`AuditSink` where a caller must not block; it
    writes the records queued meanwhile with one write and one fsync.

    Memory: the event ID index has one entry per record of the current and
    the previous file. For IDs of the form ``<type>:<64 hex digits>`` that is
    about 130 to 180 bytes per record, depending on how full the dict is
    (tracemalloc, CPython 3.11, 20,000 appends), and more for other IDs. The
    index stores where each record starts, not its seq and hash, so a
    duplicate costs a read of that record's line and, unless it is the last
    record, of the next line, whose ``prev`` confirms its hash. The log
    keeps the previous file open for those reads, so that moving it away
    while the log is open does not break duplicate detection.

    Args:
        directory: Directory of the audit files; created if missing.
        max_bytes: ``audit.jsonl`` is rotated before a record would make it
            larger than this. A single record larger than this is still
            written, alone in its file after the rotate record.
        fsync: Flush each record to disk before :meth:`append` returns. With
            False, a power loss can lose records that were acknowledged.
        wall_clock: Source of the ``time`` field, seconds since the Unix epoch.
        before_write: Fault injection for tests: called under the lock once
            for each record line (including rotate records), just before the
            write that contains the line. An ``OSError`` it raises fails that
            whole write, exactly like a failed write.

    Raises:
        ValueError: ``max_bytes`` is smaller than :data:`MIN_MAX_BYTES`.
        AuditWriteError: The directory or files cannot be created, read or
            locked, the current file's last record cannot be resumed from,
            ``last-hash.json`` cannot be read, or the log does not contain
            the record that ``last-hash.json`` names.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync: bool = True,
        wall_clock: Callable[[], float] = time.time,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        if not isinstance(max_bytes, int) or max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be an integer of at least {MIN_MAX_BYTES}, got {max_bytes!r}")

        self._directory = Path(directory)
        self._path = self._directory / CURRENT_FILE_NAME
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._wall_clock = wall_clock
        self._before_write = before_write

        self._lock = threading.Lock()
        self._closed = False
        self._fd: int | None = None
        self._lock_fd: int | None = None
        # Length of audit.jsonl up to the end of its last acknowledged record.
        self._size = 0
        self._last_seq = 0
        self._last_hash = ZERO_HASH
        # Seq of the first record in audit.jsonl; 0 while the file is empty.
        self._first_seq_in_file = 0
        # Records in audit.jsonl other than its rotate record. Rotating a file
        # that contains only its rotate record would gain nothing.
        self._events_in_file = 0
        # Set when audit.jsonl follows a rotated file but has no rotate record yet.
        self._needs_rotate_record = False
        self._previous_file_name: str | None = None
        self._event_ids: _EventIndex = {}
        self._previous_event_ids: _EventIndex = {}
        # Read-only descriptor of the previous file, which _previous_event_ids points into.
        self._previous_fd: int | None = None
        # Seqs of the first and last record of the previous file, for checking a duplicate's record there.
        self._previous_first_seq = 0
        self._previous_last_seq = 0
        # Hashes of records in the previous and the current file whose next line's prev cannot confirm
        # them, because no record of this log follows them. These are each file's last record and the
        # last record written before each change that something else made to the file. The current
        # file's last record is _last_hash, which is not repeated here.
        self._previous_known_hashes: dict[int, str] = {}
        self._known_hashes: dict[int, str] = {}
        # A failed write whose cut-off failed too: where it started and its bytes. Only bytes that match
        # a prefix of it are ours to remove before the next write.
        self._unremoved_write: tuple[int, bytes] | None = None
        # Set when audit.jsonl ends without a newline after something else changed it, so the next
        # write starts with one.
        self._needs_newline = False
        # Set once the log has reported that its directory is missing, and cleared when the directory is back.
        self._directory_missing_reported = False
        self._blocked_rotation_log = LogLimit(interval_seconds=60.0)
        self._outside_change_log = LogLimit(interval_seconds=10.0)
        self._last_hash_path = self._directory / LAST_HASH_FILE_NAME
        # Seq that last-hash.json contains; behind _last_seq while replacing it fails.
        self._last_hash_file_seq = 0
        self._last_hash_file_failures = 0
        # Set by _recover: no audit file had a byte and there was no last-hash.json.
        self._started_empty = False
        # Set once this log has written a record. Only then does it write last-hash.json.
        self._appended = False
        # Time in chain-start.json, read from that file or from last-hash.json, and written to last-hash.json.
        self._chain_start_time: float | None = None

        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._acquire_directory_lock()
            self._recover()
            self._open_current()
        except OSError as exc:
            self._release_files()
            if isinstance(exc, AuditWriteError):
                raise
            path = exc.filename or self._path
            raise AuditWriteError(
                exc.errno,
                f"failed to open the audit log in {self._directory}: {path}: {exc.strerror or exc}. Fix that"
                " path, so that the directory and its audit files are ones this process can read and write,"
                " then start again",
                str(path),
            ) from exc
        except BaseException:
            self._release_files()
            raise

    # Public surface ------------------------------------------------------

    @property
    def directory(self) -> Path:
        """Directory of the audit files."""
        return self._directory

    @property
    def path(self) -> Path:
        """Path of the file that records are appended to (``audit.jsonl``)."""
        return self._path

    @property
    def started_empty(self) -> bool:
        """True if opening found no audit file with a byte in it and no ``last-hash.json``, as in a new chain."""
        return self._started_empty

    def chain_start_time(self, authority_time: float) -> float | None:
        """Return the authority time at which this directory's chain started, storing it for a new chain.

        A lease store can hold leases granted before the chain in this
        directory started, when an earlier chain was moved aside or the log
        was off. Their grant records belong to that earlier chain, and the
        authority uses the returned time to tell them apart from leases
        whose records a crash kept from this chain.

        Reads ``chain-start.json``. When it is missing and the log
        :attr:`started_empty`, writes ``authority_time`` to it first (fsynced
        when the log fsyncs), so every later open returns the same time.

        ``last-hash.json`` also stores the time once the log has read or
        written ``chain-start.json`` and appended a record. When
        ``chain-start.json`` is missing from a chain whose ``last-hash.json``
        stores a time, the file was deleted: this logs a warning and returns
        the time from ``last-hash.json``, so that the caller still writes no
        grant record of an earlier chain. A chain whose two files are both
        missing cannot be distinguished from one started by an older
        version, and returns None.

        Args:
            authority_time: The authority's time now, in seconds; leases
                granted from now on have their grant records in this chain.

        Returns:
            The stored time, or None for a chain that has records but no
            ``chain-start.json`` and no time in ``last-hash.json`` (started
            by a version that did not write the file).

        Raises:
            AuditWriteError: The file cannot be read, is invalid, or cannot
                be written.
        """
        path = self._directory / CHAIN_START_FILE_NAME
        try:
            stored = read_chain_start(self._directory)
        except ValueError as exc:
            raise AuditWriteError(
                errno.EINVAL,
                f"cannot tell when the audit chain in {self._directory} started: {exc}. Restore the file from a"
                f" backup, or move {self._directory} aside to start a new chain",
                str(path),
            ) from exc
        except OSError as exc:
            raise AuditWriteError(
                exc.errno,
                f"cannot read {path}: {exc.strerror or exc}. It must be a file that this process can read;"
                " fix it and start again",
                str(path),
            ) from exc
        if stored is not None:
            with self._lock:
                self._chain_start_time = stored
            return stored
        if self._chain_start_time is not None:
            logger.warning(
                "%s is missing, but %s records that the audit chain in %s started at authority time %.6f, so"
                " the file was deleted. This start uses that time and writes no grant record for leases granted"
                " before it. Restore %s from a backup, or write %s to it",
                path,
                LAST_HASH_FILE_NAME,
                self._directory,
                self._chain_start_time,
                path,
                _encode({"v": FORMAT_VERSION, "authority_time": self._chain_start_time}).decode(),
            )
            return self._chain_start_time
        if not self._started_empty:
            return None

        data = _encode({"v": FORMAT_VERSION, "authority_time": authority_time}) + b"\n"
        try:
            _write_file_atomically(path, data, self._fsync)
            if self._fsync:
                _fsync_directory(self._directory)
        except OSError as exc:
            raise AuditWriteError(
                exc.errno,
                f"failed to write {path}: {exc.strerror or exc}. Make {self._directory} writable, then start again",
                str(path),
            ) from exc
        with self._lock:
            self._chain_start_time = authority_time
        return authority_time

    @property
    def last_seq(self) -> int:
        """Seq of the last record written, 0 for an empty log."""
        with self._lock:
            return self._last_seq

    @property
    def last_hash(self) -> str:
        """Hash of the last record written, :data:`ZERO_HASH` for an empty log."""
        with self._lock:
            return self._last_hash

    def contains(self, event_id: str) -> bool:
        """Return whether ``event_id`` is in the current or the previous file."""
        key = _index_key(event_id)
        with self._lock:
            return key in self._event_ids or key in self._previous_event_ids

    def find_in_older_files(
        self, event_ids: Collection[str], *, written_since: float, max_bytes: int = OLDER_FILES_SCAN_MAX_BYTES
    ) -> set[str]:
        """Return which of ``event_ids`` are in rotated files older than the previous one.

        :meth:`contains` covers only the current and the previous file. This
        reads the older files, newest first, for start-up, where the records
        owed by stored leases are checked once. A record is written after
        its event, so the search stops at the first file whose last record
        was written before ``written_since`` (wall time), or once it has
        read ``max_bytes``. An event found nowhere may still be in a file
        past either limit, so writing it again can repeat it but never lose it.

        Args:
            event_ids: Event IDs to look for.
            written_since: Wall time before which none of these events happened.
            max_bytes: Most bytes to read, so a long history cannot stall a start.
        """
        sought = {_CANONICAL_ENCODER.encode(event_id).encode("utf-8"): event_id for event_id in event_ids}
        if not sought:
            return set()
        with self._lock:
            previous_name = self._previous_file_name
        # Rotated names sort by their first seq, and the previous file is indexed already.
        older = [path for _, path in _list_rotated_files(self._directory) if previous_name is None or path.name < previous_name]
        found: set[str] = set()
        budget = max_bytes
        for path in reversed(older):
            if budget <= 0:
                logger.warning(
                    "stopped looking for %d earlier audit records at %s after reading %d bytes."
                    " Any of them in that file or before it are written again",
                    len(sought),
                    path,
                    max_bytes,
                )
                break
            try:
                data = path.read_bytes()
            except OSError as exc:
                logger.warning("could not read %s to look for earlier audit records: %s", path, exc)
                continue
            budget -= len(data)
            for match in _EVENT_ID_FIELD.finditer(data):
                event_id = sought.get(match.group(1))
                # Only a whole record counts: a line cut short by a crash or a
                # truncation may still show the event ID.
                if event_id is not None and _is_record_of(data, match.start(), event_id):
                    del sought[match.group(1)]
                    found.add(event_id)
            if not sought or _last_record_time(data) < written_since:
                break
        return found

    def append(self, event_id: str, type: str, fields: Mapping[str, object]) -> AuditReceipt:
        """Append one record and return once it is written (and fsynced when enabled).

        Rotates ``audit.jsonl`` first when the record would make it larger
        than ``max_bytes``. Blocks on disk I/O.

        Args:
            event_id: Unique ID of the event, such as ``end:<digest>``. If it
                is already in the current or previous file, nothing is written.
            type: ``grant``, ``revoke`` or ``end``.
            fields: The event's fields, such as ``fingerprint``, ``principal``,
                ``tier``, ``reason``; never a raw lease ID.

        Returns:
            The record's receipt, or the original's with ``duplicate=True``.

        Raises:
            ValueError, TypeError: Invalid arguments (see the field rules in
                the module documentation); nothing is written.
            AuditWriteError: The write failed; the file contains no part of
                the record, so the same event may be appended again.
            RuntimeError: The log is closed.
        """
        checked = _check_event(event_id, type, fields)
        return self._append_checked([_Event(event_id, type, checked)])[0]

    def close(self) -> None:
        """Close the file and release the directory lock; later appends raise. Idempotent.

        Replaces ``last-hash.json`` first if replacing it failed after the
        last write.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._write_last_hash_file_locked()
            self._release_files()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Opening -------------------------------------------------------------

    def _acquire_directory_lock(self) -> None:
        if fcntl is None:
            return
        lock_path = self._directory / LOCK_FILE_NAME
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise AuditWriteError(
                errno.EWOULDBLOCK,
                f"the audit directory {self._directory} is already open for writing by another AuditLog or"
                f" process, which holds a lock on {lock_path}; stop it, or give this one another data directory",
                str(lock_path),
            ) from exc

    def _recover(self) -> None:
        """Load the chain state and event IDs, and remove a torn last line of ``audit.jsonl``."""
        stored = self._read_last_hash_file()
        find_seq = stored.seq if stored is not None else 0
        rotated = _list_rotated_files(self._directory)
        previous: _ScannedFile | None = None
        if rotated:
            previous_path = rotated[-1][1]
            # The descriptor stays open for duplicate lookups, and the bytes
            # indexed are read through it, so both come from the same file.
            self._previous_fd = os.open(previous_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            previous = _scan_records(previous_path, _read_to_end(self._previous_fd), find_seq)
            self._previous_file_name = previous_path.name
            self._previous_event_ids = previous.event_ids
            self._previous_first_seq = previous.first_seq
            self._previous_last_seq = previous.last_seq
            self._previous_known_hashes = {previous.last_seq: previous.last_hash}

        data = self._path.read_bytes() if self._path.exists() else b""
        keep = _torn_tail_start(data)
        current = _scan_records(self._path, data[:keep], find_seq)
        # Checked before the torn tail is cut, so a failed check leaves the files as found.
        self._check_last_hash_file(stored, current, previous)
        data = self._remove_torn_tail(data, keep)
        self._report_missing_previous_file(data)
        self._started_empty = stored is None and not rotated and not data
        if stored is None and not self._started_empty:
            self._warn_last_hash_file_missing(current, previous)

        if current.records > 0:
            self._resume_from(current)
            self._first_seq_in_file = current.first_seq
            self._events_in_file = current.records - (1 if current.starts_with_rotate else 0)
            self._event_ids = current.event_ids
            self._size = len(data)
        elif previous is not None and previous.records > 0:
            # A crash between rotating and writing the new rotate record
            # leaves audit.jsonl missing or empty; the next append writes it.
            self._resume_from(previous)
            self._needs_rotate_record = True
            self._size = len(data)
        else:
            self._size = len(data)
        if stored is not None:
            self._last_hash_file_seq = stored.seq
            self._chain_start_time = stored.chain_start_time

    def _read_last_hash_file(self) -> LastHash | None:
        path = self._last_hash_path
        verify_command = f"session-authority audit verify {self._directory}"
        try:
            return read_last_hash(self._directory)
        except ValueError as exc:
            raise AuditWriteError(
                errno.EINVAL,
                f"cannot check the end of the audit log in {self._directory}: {exc}. Run '{verify_command}',"
                f" and if the chain is intact, delete {path}",
                str(path),
            ) from exc
        except IsADirectoryError as exc:
            raise AuditWriteError(
                exc.errno,
                f"cannot check the end of the audit log in {self._directory}: {path} is a directory, but it"
                " must be the file that stores the seq and hash of the last record. Move that directory out of"
                f" {self._directory}, run '{verify_command}', and start again",
                str(path),
            ) from exc
        except OSError as exc:
            raise AuditWriteError(
                exc.errno,
                f"cannot check the end of the audit log in {self._directory}: reading {path} failed:"
                f" {exc.strerror or exc}. Give this process read and write access to it, then start again",
                str(path),
            ) from exc

    def _report_missing_previous_file(self, data: bytes) -> None:
        """Log an error when the rotate record that starts ``audit.jsonl`` names a file that is gone.

        The log goes on from its last record either way, as it does when the
        file goes while the authority runs; ``verify`` reports the gap.
        """
        first_line = data.split(b"\n", 1)[0]
        record = _parse_line(first_line) if first_line else None
        if record is None or record.get("type") != ROTATE_TYPE:
            return
        missing = _missing_previous_file(record, self._path)
        if missing is not None:
            logger.error(
                "audit file %s names %s as the file before it, but %s has no such file: it was moved or deleted."
                " If it was moved, put it back under that name; 'session-authority audit verify %s' reports the gap",
                self._path,
                missing,
                self._directory,
                self._directory,
            )

    def _warn_last_hash_file_missing(self, current: _ScannedFile, previous: _ScannedFile | None) -> None:
        last_seq = max(current.last_seq, previous.last_seq if previous is not None else 0)
        logger.warning(
            "audit log %s has records up to seq %d but no %s, so records cut from its end before this start"
            " cannot be detected. The file was deleted, or an older version wrote the log. Run"
            " 'session-authority audit verify %s' and compare its last seq and hash with a copy kept elsewhere."
            " The first record written from now on writes a new %s",
            self._directory,
            last_seq,
            LAST_HASH_FILE_NAME,
            self._directory,
            LAST_HASH_FILE_NAME,
        )

    def _check_last_hash_file(
        self, stored: LastHash | None, current: _ScannedFile, previous: _ScannedFile | None
    ) -> None:
        """Raise if the log lacks the record that ``last-hash.json`` names.

        The log may run ahead of the file (a crash between a write and the
        replacement of the file), but never behind it.
        """
        if stored is None:
            return
        scans = [current] if previous is None else [current, previous]
        last_seq = max(scan.last_seq for scan in scans)
        advice = (
            f"Run 'session-authority audit verify {self._directory}', keep the directory {self._directory} as"
            " evidence and move it aside (rename it), then start again to begin a new chain in its place"
        )
        if last_seq < stored.seq:
            raise AuditWriteError(
                errno.EINVAL,
                f"records were removed from the end of the audit log in {self._directory}: it ends at seq"
                f" {last_seq}, but {LAST_HASH_FILE_NAME} records seq {stored.seq} as written. If"
                f" {CURRENT_FILE_NAME} or a rotated file was moved out of the directory, move it back and start"
                f" again. Otherwise {advice[0].lower()}{advice[1:]}",
                str(self._directory),
            )
        found = next((scan.found_hash for scan in scans if scan.found_hash is not None), None)
        if found is None:
            # The record is in an older rotated file, which opening does not
            # read; `audit verify` checks it.
            logger.debug(
                "audit record seq %d named by %s is not in the newest two files", stored.seq, LAST_HASH_FILE_NAME
            )
            return
        if found != stored.hash:
            raise AuditWriteError(
                errno.EINVAL,
                f"audit record seq {stored.seq} in {self._directory} does not have the hash that"
                f" {LAST_HASH_FILE_NAME} records, so it was edited or the end of the log was replaced. {advice}",
                str(self._directory),
            )

    def _resume_from(self, scanned: _ScannedFile) -> None:
        if scanned.last_version != FORMAT_VERSION:
            raise AuditWriteError(
                errno.EINVAL,
                f"cannot continue the audit chain in {self._directory}: its last record has format version"
                f" {scanned.last_version!r}, but this writer writes version {FORMAT_VERSION}. Upgrade"
                f" session-authority, or move {self._directory} aside to start a new chain",
                str(self._directory),
            )
        self._last_seq = scanned.last_seq
        self._last_hash = scanned.last_hash

    def _remove_torn_tail(self, data: bytes, keep: int) -> bytes:
        """Truncate ``audit.jsonl`` to ``keep`` bytes (from :func:`_torn_tail_start`) and return them.

        Removing a torn line is safe because that record was never
        acknowledged: :meth:`append` returns, and the sink reports a record
        as written, only after the whole write is done (and fsynced when
        enabled). Its writer therefore still has the event and retries it
        under the same ID.
        """
        if keep == len(data):
            return data

        logger.warning(
            "audit file %s: removed a torn last record (%d bytes) left by an interrupted write; "
            "it was never acknowledged, so its writer retries it",
            self._path,
            len(data) - keep,
        )
        fd = os.open(self._path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.ftruncate(fd, keep)
            os.fsync(fd)
        finally:
            os.close(fd)
        return data[:keep]

    def _open_current(self) -> int:
        if self._fd is None:
            self._fd = self._open_path()
        return self._fd

    def _open_path(self) -> int:
        """Open ``audit.jsonl`` for appending, creating it if missing, and return the new descriptor."""
        existed = self._path.exists()
        # Readable too, for duplicate lookups. O_APPEND still puts every write at the end.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self._path, flags, 0o600)
        if not existed and self._fsync:
            try:
                _fsync_directory(self._directory)
            except OSError:
                os.close(fd)
                raise
        return fd

    def _release_files(self) -> None:
        for fd in (self._fd, self._previous_fd, self._lock_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    logger.debug("closing an audit file descriptor failed", exc_info=True)
        self._fd = None
        self._previous_fd = None
        self._lock_fd = None

    # Writing -------------------------------------------------------------

    def _append_checked(self, events: Sequence[_Event]) -> list[AuditReceipt]:
        """Write validated events, in order, with as few writes and fsyncs as rotation allows.

        Returns:
            The receipts of a prefix of ``events`` (at least the first
            event): each write covers the records that fit in the current
            file, and the caller passes the rest again.

        Raises:
            AuditWriteError: The write failed; the file contains no part of
                it, so the same events may be appended again.
            RuntimeError: The log is closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"audit log {self._path} is closed; open a new AuditLog to append")
            self._check_current_file_locked()
            receipts, lines = self._encode_batch_locked(events)
            if lines:
                self._write_lines_locked(lines)
                self._write_last_hash_file_locked()
            return receipts

    def _encode_batch_locked(self, events: Sequence[_Event]) -> tuple[list[AuditReceipt], list[_EncodedLine]]:
        """Encode the prefix of ``events`` that one write takes, rotating first if the first event needs it.

        Nothing but a rotation changes the log's state here: seq and hash run
        ahead in local variables until :meth:`_write_lines_locked` succeeds.
        """
        receipts: list[AuditReceipt] = []
        lines: list[_EncodedLine] = []
        written_here: dict[str, tuple[int, str]] = {}
        seq, last_hash = self._last_seq, self._last_hash
        size, events_in_file = self._size, self._events_in_file
        rotation_postponed = False
        for event in events:
            known = written_here.get(event.event_id)
            if known is not None:
                receipts.append(AuditReceipt(seq=known[0], hash=known[1], duplicate=True))
                continue
            key = _index_key(event.event_id)
            earlier = self._find_written_locked(event.event_id, key)
            if earlier is not None:
                receipts.append(earlier)
                continue

            line = self._encode_record_locked(event.event_id, event.type, event.fields, seq + 1, last_hash)
            if events_in_file > 0 and size + len(line) + 1 > self._max_bytes and not rotation_postponed:
                if written_here:
                    break
                if self._rotation_blocked_locked():
                    rotation_postponed = True
                else:
                    self._rotate_locked()
                    size, events_in_file = 0, 0
            if self._needs_rotate_record and not lines:
                rotate_line = self._encode_record_locked(
                    f"rotate:{seq + 1}",
                    ROTATE_TYPE,
                    {"previous_file": self._previous_file_name, "previous_last_seq": seq},
                    seq + 1,
                    last_hash,
                )
                seq, last_hash = seq + 1, record_hash(rotate_line)
                size += len(rotate_line) + 1
                lines.append(_EncodedLine(f"rotate:{seq}", ROTATE_TYPE, rotate_line, seq, last_hash))
                line = self._encode_record_locked(event.event_id, event.type, event.fields, seq + 1, last_hash)

            seq, last_hash = seq + 1, record_hash(line)
            size += len(line) + 1
            events_in_file += 1
            lines.append(_EncodedLine(event.event_id, event.type, line, seq, last_hash, key))
            written_here[event.event_id] = (seq, last_hash)
            receipts.append(AuditReceipt(seq=seq, hash=last_hash))
        return receipts, lines

    def _find_written_locked(self, event_id: str, key: _IndexKey) -> AuditReceipt | None:
        """Return the duplicate receipt of an event in the current or previous file, or None if it is in neither.

        Reads the record's line, because the index stores only its offset. The
        receipt comes from that line only if its seq is one that the log wrote
        to that file and its hash matches the chain (see
        :meth:`_check_found_record_locked`). Otherwise the file was changed
        while the log had it open: the error is logged and None returned, so
        the event is written again rather than lost or given a receipt that
        is not in the chain. ``key`` is the event ID's key in the index.
        """
        offset = self._event_ids.get(key)
        in_current = offset is not None
        if not in_current:
            offset = self._previous_event_ids.get(key)
            if offset is None:
                return None
        path = self._path if in_current else self._directory / str(self._previous_file_name)
        try:
            # Opening and rotating set the previous index and its descriptor together.
            fd = self._open_current() if in_current else self._previous_fd
            line = _read_line_at(fd, offset) if fd is not None else b""
        except OSError as exc:
            logger.error(
                "could not read the earlier record of event %s from %s at byte %d (%s); writing the event again",
                event_id, path, offset, exc.strerror or exc,
            )
            return None
        record = _parse_line(line)
        if fd is None or record is None or record.get("event_id") != event_id or not _is_seq(record.get("seq")):
            problem: str | None = f"the record of event {event_id} is no longer at byte {offset}"
        else:
            try:
                problem = self._check_found_record_locked(fd, offset, line, record["seq"], in_current)
            except OSError as exc:
                problem = f"reading the line after the record of event {event_id} failed ({exc.strerror or exc})"
        if problem is not None:
            logger.error(
                "the audit file %s was changed while open: %s; writing the event again. Run"
                " 'session-authority audit verify %s' to find what changed",
                path, problem, self._directory,
            )
            return None
        return AuditReceipt(seq=record["seq"], hash=record_hash(line), duplicate=True)

    def _check_found_record_locked(self, fd: int, offset: int, line: bytes, seq: int, in_current: bool) -> str | None:
        """Return why a record read back for a duplicate is not one that the log wrote, or None if it is.

        The seq must lie between the first and the last seq that the log
        wrote to that file. The hash must match the one the log stored for
        that seq, where it stored one, or else the ``prev`` of the next line,
        which must be the record with the next seq. A record whose next
        record something else cut away cannot be confirmed, so its event is
        written again. An edit that also fixes the next record's ``prev``
        passes this check, but changes the next record's hash in turn, which
        ``audit verify`` reports.
        """
        if in_current:
            first_seq, last_seq = self._first_seq_in_file, self._last_seq
            known_hash = self._last_hash if seq == last_seq else self._known_hashes.get(seq)
        else:
            first_seq, last_seq = self._previous_first_seq, self._previous_last_seq
            known_hash = self._previous_known_hashes.get(seq)
        if not first_seq <= seq <= last_seq:
            return f"the record at byte {offset} has seq {seq}, but the log wrote seqs {first_seq} to {last_seq} there"

        digest = record_hash(line)
        if known_hash is not None:
            if digest != known_hash:
                return f"the record at byte {offset} (seq {seq}) does not have the hash that the log wrote"
            return None
        following = _parse_line(_read_line_at(fd, offset + len(line) + 1))
        if following is None or following.get("seq") != seq + 1 or following.get("prev") != digest:
            return f"the record at byte {offset} (seq {seq}) is not followed by seq {seq + 1} with its hash as prev"
        return None

    def _encode_record_locked(
        self, event_id: str, type: str, fields: Mapping[str, object], seq: int, prev: str
    ) -> bytes:
        record = dict(fields)
        record["v"] = FORMAT_VERSION
        record["seq"] = seq
        record["event_id"] = event_id
        record["type"] = type
        record["time"] = utc_isoformat(self._wall_clock())
        record["prev"] = prev
        return _encode(record)

    def _write_lines_locked(self, lines: Sequence[_EncodedLine]) -> None:
        """Write encoded lines with one write and one fsync; on failure, cut the file back so no part stays.

        Starts with a newline when the file ends without one after something
        else changed it, so that the first record is a line of its own.
        """
        start = self._size
        try:
            fd = self._open_current()
        except OSError as exc:
            raise AuditWriteError(
                exc.errno, f"failed to open {self._path} for appending: {exc.strerror or exc}", str(self._path)
            ) from exc

        separator = b"\n" if self._needs_newline else b""
        data = b"".join([separator] + [encoded.line + b"\n" for encoded in lines])
        try:
            if self._before_write is not None:
                for _ in lines:
                    self._before_write()
            _write_all(fd, data)
            if self._fsync:
                os.fsync(fd)
        except OSError as exc:
            if not self._truncate_after_failure_locked(fd, start):
                self._unremoved_write = (start, data)
            raise AuditWriteError(
                exc.errno, f"failed to append to the audit log {self._path}: {exc.strerror or exc}", str(self._path)
            ) from exc

        self._size = start + len(data)
        self._last_seq = lines[-1].seq
        self._last_hash = lines[-1].hash
        self._appended = True
        self._needs_newline = False
        if self._first_seq_in_file == 0:
            self._first_seq_in_file = lines[0].seq
        offset = start + len(separator)
        for encoded in lines:
            if encoded.type == ROTATE_TYPE:
                self._needs_rotate_record = False
            else:
                self._events_in_file += 1
                assert encoded.key is not None
                self._event_ids[encoded.key] = offset
            offset += len(encoded.line) + 1

    def _write_last_hash_file_locked(self) -> None:
        """Replace ``last-hash.json`` with the last record's seq and hash: write a temporary file, fsync, rename.

        Does nothing until this log has appended a record, so that opening a
        log without the file does not hide that it was missing.

        A failure is logged and retried after the next write, because the
        records themselves are durable. The directory is not fsynced after
        the rename: if a power loss undoes the rename, the file names an
        earlier record of the same chain, which the log may run ahead of.
        """
        if not self._appended or self._last_hash_file_seq == self._last_seq:
            return
        record: dict[str, object] = {"v": FORMAT_VERSION, "seq": self._last_seq, "hash": self._last_hash}
        if self._chain_start_time is not None:
            record["chain_start_time"] = self._chain_start_time
        data = _encode(record) + b"\n"
        try:
            _write_file_atomically(self._last_hash_path, data, self._fsync)
        except OSError as exc:
            self._last_hash_file_failures += 1
            # The first failure, then every 100th, so a full disk does not flood the log.
            if self._last_hash_file_failures % 100 == 1:
                logger.warning(
                    "failed to replace %s (%d failures so far); it still names seq %d while the log is at seq %d,"
                    " so records cut from the end after seq %d would go unnoticed: %s",
                    self._last_hash_path,
                    self._last_hash_file_failures,
                    self._last_hash_file_seq,
                    self._last_seq,
                    self._last_hash_file_seq,
                    exc,
                )
            return
        if self._last_hash_file_failures:
            logger.info("replaced %s after %d failures", self._last_hash_path, self._last_hash_file_failures)
            self._last_hash_file_failures = 0
        self._last_hash_file_seq = self._last_seq

    def _truncate_after_failure_locked(self, fd: int, length: int) -> bool:
        """Cut the file back to ``length`` after a failed write, and return False if that failed too."""
        try:
            os.ftruncate(fd, length)
        except OSError:
            # The next batch retries the cut (see _reconcile_size_locked).
            logger.warning("audit file %s: failed to remove a partly written record", self._path, exc_info=True)
            return False
        return True

    def _rotation_blocked_locked(self) -> bool:
        """Return whether a file that this log did not write takes the rotated name, and log that (once a minute).

        The log then writes on past ``max_bytes`` rather than stop, and tries
        again before each batch, because moving that file could destroy
        evidence and only an operator may do it.
        """
        target = self._directory / rotated_file_name(self._first_seq_in_file)
        if not target.exists():
            return False
        held_back = self._blocked_rotation_log.allow()
        if held_back is not None:
            logger.error(
                "cannot rotate %s: %s already exists and this log did not write it. The log keeps appending to"
                " %s past its %d-byte limit (the file has %d bytes before this write) and rotates once that"
                " name is free: move the file out of the audit directory%s",
                self._path, target, CURRENT_FILE_NAME, self._max_bytes, self._size,
                self._blocked_rotation_log.note(held_back),
            )
        return True

    def _rotate_locked(self) -> None:
        """Rename ``audit.jsonl`` to its rotated name and open a new, empty one.

        The caller writes the rotate record next. If anything after the rename
        fails, the state stays "rotated, rotate record pending", so the next
        append finishes the job.
        """
        rotated_name = rotated_file_name(self._first_seq_in_file)
        target = self._directory / rotated_name
        if target.exists():
            raise AuditWriteError(
                errno.EEXIST,
                f"cannot rotate {self._path}: {target} already exists; move it out of the audit directory",
                str(target),
            )
        try:
            os.rename(self._path, target)
        except OSError as exc:
            raise AuditWriteError(
                exc.errno, f"failed to rotate {self._path} to {target}: {exc.strerror or exc}", str(self._path)
            ) from exc

        # The rotated file's descriptor stays open for duplicate lookups in
        # the previous index. The file before it is no longer indexed.
        rotated_fd = self._fd
        self._fd = None
        if rotated_fd is None:
            try:
                rotated_fd = os.open(target, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise AuditWriteError(
                    exc.errno, f"failed to open the rotated audit file {target}: {exc.strerror or exc}", str(target)
                ) from exc
        self._size = 0
        self._shift_to_previous_locked(rotated_name, rotated_fd)
        logger.info("rotated audit file %s to %s", self._path, target)

        try:
            if self._fsync:
                _fsync_directory(self._directory)
            self._open_current()
        except OSError as exc:
            raise AuditWriteError(
                exc.errno,
                f"failed to start the new audit file {self._path} after rotation: {exc.strerror or exc}",
                str(self._path),
            ) from exc

    def _shift_to_previous_locked(self, previous_file_name: str, previous_fd: int) -> None:
        """Make the current file the previous one, and start the state of a new, empty current file.

        The previous file's descriptor stays open for duplicate lookups in
        the previous index. The file before it is no longer indexed, so its
        descriptor is closed. The caller sets ``_size`` and ``_fd``.
        """
        older_fd, self._previous_fd = self._previous_fd, previous_fd
        if older_fd is not None:
            try:
                os.close(older_fd)
            except OSError:
                logger.debug("closing the audit file before %s failed", previous_file_name, exc_info=True)
        self._previous_event_ids = self._event_ids
        self._previous_file_name = previous_file_name
        self._previous_first_seq = self._first_seq_in_file
        self._previous_last_seq = self._last_seq
        self._previous_known_hashes = {**self._known_hashes, self._last_seq: self._last_hash}
        self._event_ids = {}
        self._known_hashes = {}
        self._first_seq_in_file = 0
        self._events_in_file = 0
        self._needs_rotate_record = True
        self._needs_newline = False
        self._unremoved_write = None

    # Changes made by something else ----------------------------------------

    def _check_current_file_locked(self) -> None:
        """Find changes that something other than this log made to ``audit.jsonl``, and go on writing after them.

        Runs before each batch. A change never stops the log and never makes
        it cut bytes it did not write. The log writes one error line that
        names the change and what to do, then writes its next records after
        whatever the path contains now. ``audit verify`` then reports the change where it
        is, and the records written from now on are all in the directory.

        Raises:
            AuditWriteError: The file cannot be opened or examined, or bytes
                left by an earlier failed write cannot be removed. Nothing
                was written, and the next batch checks again.
        """
        try:
            fd = self._open_current()
            opened = os.fstat(fd)
            if opened.st_size == self._size:
                self._unremoved_write = None
            else:
                self._reconcile_size_locked(fd, opened.st_size)
            try:
                named: os.stat_result | None = os.stat(self._path)
            except FileNotFoundError:
                named = None
            if named is None or not os.path.samestat(named, opened):
                self._replace_lost_file_locked(fd, opened, named is None)
        except AuditWriteError:
            raise
        except OSError as exc:
            raise AuditWriteError(
                exc.errno,
                f"failed to check the audit file {self._path} before appending: {exc.strerror or exc}",
                str(self._path),
            ) from exc

    def _reconcile_size_locked(self, fd: int, actual: int) -> None:
        """Bring ``_size`` and the index in line with an ``audit.jsonl`` of ``actual`` bytes, not the size written.

        Bytes that a failed write left behind, because cutting them off
        failed too, are removed when they match the start of that write.
        Any other difference is a change that something else made. Those
        bytes may hold records that the log acknowledged, so the log keeps
        them and continues after the file's real end, on a new line.
        """
        unremoved = self._unremoved_write
        if unremoved is not None and self._is_unremoved_write_locked(fd, actual, unremoved):
            os.ftruncate(fd, self._size)
            self._unremoved_write = None
            logger.warning(
                "audit file %s: removed %d bytes left by an earlier failed write", self._path, actual - self._size
            )
            return

        written_size = self._size
        self._unremoved_write = None
        if actual > written_size and self._ends_with_last_record_locked(fd, written_size):
            # Bytes were only added after the log's last record, so every
            # offset in the index is still right and nothing is read again.
            self._size = actual
            self._needs_newline = _read_at(fd, 1, actual - 1) != b"\n"
        else:
            # An edit moves the records after it, so the offsets are read
            # again, at the cost of reading the whole file. A duplicate lookup
            # still checks each record against the chain before trusting it.
            data = _read_to_end(fd)
            self._event_ids = _scan_records(self._path, data, warn_invalid=False).event_ids
            self._size = len(data)
            self._needs_newline = not data.endswith(b"\n") and bool(data)
        if self._first_seq_in_file != 0:
            # Bytes that the log did not write may follow this record now.
            self._known_hashes[self._last_seq] = self._last_hash
        newline = ", starting on a new line," if self._needs_newline else ""
        # A writer that keeps appending would otherwise get one line per batch.
        held_back = self._outside_change_log.allow()
        if held_back is None:
            return
        if self._size > written_size:
            logger.error(
                "audit file %s grew from %d to %d bytes while open, but this log did not write the extra bytes:"
                " something else appended to or edited the file. The log keeps them and writes its next records"
                "%s after them. Its last record is seq %d. Run 'session-authority audit verify %s' to find the"
                " change%s",
                self._path, written_size, self._size, newline, self._last_seq, self._directory,
                self._outside_change_log.note(held_back),
            )
        else:
            logger.error(
                "audit file %s shrank from %d to %d bytes while open: something else truncated or edited it, so"
                " records up to seq %d that this log wrote may be lost or changed. The log writes its next"
                " records%s after the file's current end. Run 'session-authority audit verify %s' to find the"
                " change%s",
                self._path, written_size, self._size, self._last_seq, newline, self._directory,
                self._outside_change_log.note(held_back),
            )

    def _ends_with_last_record_locked(self, fd: int, size: int) -> bool:
        """Return whether the first ``size`` bytes of the file still end with the last record this log wrote there."""
        if self._first_seq_in_file == 0 or size == 0:
            return False
        length = min(size, MAX_RECORD_SEARCH_BYTES)
        tail = _read_at(fd, length, size - length)
        if not tail.endswith(b"\n"):
            return False
        line = tail[:-1].rsplit(b"\n", 1)[-1]
        return (b"\n" in tail[:-1] or length == size) and record_hash(line) == self._last_hash

    def _is_unremoved_write_locked(self, fd: int, actual: int, unremoved: tuple[int, bytes]) -> bool:
        """Return whether the bytes after ``_size`` are the start of the failed write ``unremoved`` and nothing else."""
        start, data = unremoved
        if start != self._size or not start < actual <= start + len(data):
            return False
        return _read_at(fd, actual - start, start) == data[: actual - start]

    def _replace_lost_file_locked(self, old_fd: int, opened: os.stat_result, missing: bool) -> None:
        """Start a new ``audit.jsonl`` after the open one was moved, deleted or replaced by something else.

        This is handled like a rotation that something else did: the lost
        file becomes the previous file, under the rotated name it would have
        had, so duplicates of its events are still found through its open
        descriptor. The next record is a rotate record that names that
        rotated name and continues the chain from the lost file's last
        record. A rotate record is written because ``audit verify`` requires
        one at the start of every file after the first. With it, an operator
        who moves the lost file back under the name it names gets a chain
        that verifies. While the file is missing, ``audit verify`` reports
        the gap at that rotate record, or at the start of the chain when the
        lost file was the first one.
        """
        if missing and not self._directory.is_dir():
            # The whole directory was moved or deleted, so the open file is
            # still in it, and there is no directory to start a new file in.
            if not self._directory_missing_reported:
                self._directory_missing_reported = True
                logger.error(
                    "audit directory %s was moved or deleted while open. This log keeps writing to %s in it,"
                    " wherever it is now. Stop the authority, move the directory back, and run"
                    " 'session-authority audit verify %s'",
                    self._directory, CURRENT_FILE_NAME, self._directory,
                )
            return
        self._directory_missing_reported = False

        # The new file is opened and read before the state changes, so a failure here changes nothing.
        new_fd = self._open_path()
        try:
            new_size = os.fstat(new_fd).st_size
            ends_with_newline = new_size == 0 or _read_at(new_fd, 1, new_size - 1) == b"\n"
        except OSError:
            os.close(new_fd)
            raise

        self._fd = new_fd
        first_seq, last_seq = self._first_seq_in_file, self._last_seq
        rotated_name = rotated_file_name(first_seq)
        renamed = False
        if first_seq == 0:
            # The lost file held no record of this log, so the previous file stays as it was.
            self._unremoved_write = None
            try:
                os.close(old_fd)
            except OSError:
                logger.debug("closing the lost audit file %s failed", self._path, exc_info=True)
        else:
            renamed = _is_same_file(self._directory / rotated_name, opened)
            self._shift_to_previous_locked(rotated_name, old_fd)
        self._size = new_size
        self._needs_newline = not ends_with_newline

        if first_seq == 0:
            logger.warning(
                "audit file %s was moved, deleted or replaced while open, before this log wrote a record to it,"
                " so no record is lost. The log writes its next records to the file now at that path",
                self._path,
            )
        elif renamed:
            logger.warning(
                "audit file %s was renamed to %s while open, as a rotation does, so no record is lost. The log"
                " continues the chain at seq %d in a new %s",
                self._path, rotated_name, last_seq + 1, CURRENT_FILE_NAME,
            )
        else:
            change = "moved or deleted" if missing else f"replaced by another file of {new_size} bytes"
            logger.error(
                "audit file %s was %s while open, so its records seq %d to %d are no longer in %s. The log"
                " continues the chain at seq %d in %s, starting with a rotate record that names %s as the file"
                " before it. If the old file still exists, move it back to %s; then run"
                " 'session-authority audit verify %s', which reports any records still missing",
                self._path, change, first_seq, last_seq, self._directory, last_seq + 1, self._path,
                rotated_name, self._directory / rotated_name, self._directory,
            )


def _is_same_file(path: Path, stat_result: os.stat_result) -> bool:
    """Return whether ``path`` names the file that ``stat_result`` describes."""
    try:
        return os.path.samestat(os.stat(path), stat_result)
    except OSError:
        return False


# --------------------------------------------------------------------------
# Background sink


class AuditSink:
    """Writes audit events on one background thread, so submitting never waits for the disk.

    Events are written in the order submitted. The thread writes every event
    queued while the previous write ran (up to :data:`MAX_BATCH_RECORDS`) with
    one write and one fsync, so a burst shares the cost of the fsync. While
    events keep coming, it first waits :data:`BATCH_WAIT_SECONDS` for more. A write
    that fails is retried, after exponential backoff with jitter, until it
    lands; events behind it wait, so order is kept. Because the log skips an
    event ID that it already holds, a retry never writes an event twice.

    Events are lost only if the process exits, or :meth:`close` times out,
    before they are written; and an event that fails with an error other than
    :class:`AuditWriteError` (a bug, since :meth:`submit` validates events) is
    logged and dropped, because retrying cannot help it.

    The sink does not own the log: close the sink first, then the log.

    Threading: :meth:`submit`, :meth:`flush`, :meth:`close` and the properties
    may be called from any thread. ``on_written`` callbacks run on the sink's
    thread, one at a time, and must not block for long.

    Args:
        log: The log to write.
        initial_backoff_seconds: Delay before the first retry; doubles per
            failed attempt.
        max_backoff_seconds: Cap of the retry delay. Each delay is drawn
            uniformly between half the computed delay and the whole of it.
        random_source: Source of the jitter; tests pass a seeded one.

    Raises:
        ValueError: A backoff is not positive, or the cap is below the start.
    """

    def __init__(
        self,
        log: AuditLog,
        *,
        initial_backoff_seconds: float = 0.05,
        max_backoff_seconds: float = 2.0,
        random_source: random.Random | None = None,
    ) -> None:
        if not initial_backoff_seconds > 0:
            raise ValueError(f"initial_backoff_seconds must be positive, got {initial_backoff_seconds!r}")
        if not max_backoff_seconds >= initial_backoff_seconds:
            raise ValueError(
                f"max_backoff_seconds must be at least initial_backoff_seconds ({initial_backoff_seconds}), "
                f"got {max_backoff_seconds!r}"
            )
        self._log = log
        self._initial_backoff_seconds = initial_backoff_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self._random = random_source if random_source is not None else random.Random()

        self._condition = threading.Condition()
        # An event stays at the head of the queue until it is written and its
        # callback has run, so `pending` and `flush` count it until then.
        self._queue: collections.deque[_Event] = collections.deque()
        self._closed = False
        self._stopping = False
        self._stop_event = threading.Event()
        self._healthy = True
        self._consecutive_failures = 0

        self._thread = threading.Thread(target=self._run, name="audit-sink", daemon=True)
        self._thread.start()

    @property
    def log(self) -> AuditLog:
        """The log this sink writes."""
        return self._log

    @property
    def healthy(self) -> bool:
        """False while the last write attempt failed; True before the first attempt and after a success.

        In fail-closed mode the authority rejects grants while this is False.
        """
        with self._condition:
            return self._healthy

    @property
    def pending(self) -> int:
        """Events submitted but not yet written (including the one being written)."""
        with self._condition:
            return len(self._queue)

    @property
    def consecutive_failures(self) -> int:
        """Failed write attempts since the last successful one."""
        with self._condition:
            return self._consecutive_failures

    def submit(
        self,
        event_id: str,
        type: str,
        fields: Mapping[str, object],
        on_written: Callable[[AuditReceipt], None] | None = None,
    ) -> None:
        """Queue one event for writing; never waits for the disk.

        Args:
            event_id: Unique ID of the event; see :meth:`AuditLog.append`.
            type: ``grant``, ``revoke`` or ``end``.
            fields: The event's fields; copied, so the caller may reuse the mapping.
            on_written: Called on the sink's thread with the receipt once the
                record is written, or with ``duplicate=True`` if the event ID
                was already in the log. Exceptions it raises are logged.

        Raises:
            RuntimeError: The sink is closed.
            ValueError, TypeError: The event is invalid (a programming error);
                disk trouble never raises here.
        """
        checked = _check_event(event_id, type, fields)
        with self._condition:
            if self._closed:
                raise RuntimeError("audit sink is closed; submit events before calling close()")
            self._queue.append(_Event(event_id, type, checked, on_written))
            # Only the writer thread waits for a non-empty queue, and only while it is empty.
            if len(self._queue) == 1:
                self._condition.notify_all()

    def flush(self, timeout_seconds: float) -> bool:
        """Wait until every submitted event is written; return False if the timeout passed first."""
        deadline = time.monotonic() + timeout_seconds
        with self._condition:
            while self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def close(self, timeout_seconds: float = 5.0) -> bool:
        """Reject new events, wait for queued ones to be written, and stop the thread.

        Returns:
            True if every event was written and the thread stopped within
            ``timeout_seconds``. False leaves the unwritten events in memory
            only; they are lost when the process exits.
        """
        deadline = time.monotonic() + timeout_seconds
        with self._condition:
            self._closed = True
        flushed = self.flush(timeout_seconds)

        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._stop_event.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))

        if not flushed:
            logger.error(
                "audit sink closed with %d events not written to %s after %.1f s",
                self.pending,
                self._log.path,
                timeout_seconds,
            )
        return flushed and not self._thread.is_alive()

    def _run(self) -> None:
        # After an unexpected error the thread writes one event at a time
        # until one lands, so that only the event that fails is dropped.
        one_at_a_time = False
        previous_batch_size = 0
        while True:
            with self._condition:
                while not self._queue and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                wait_for_more = previous_batch_size > 1 and len(self._queue) < MAX_BATCH_RECORDS and not one_at_a_time
            if wait_for_more and BATCH_WAIT_SECONDS > 0:
                time.sleep(BATCH_WAIT_SECONDS)
            with self._condition:
                limit = 1 if one_at_a_time else MAX_BATCH_RECORDS
                batch = list(itertools.islice(self._queue, limit))
            previous_batch_size = len(batch)

            try:
                receipts = self._log._append_checked(batch)
            except AuditWriteError as exc:
                delay_seconds = self._note_failure(exc)
                if self._stop_event.wait(delay_seconds):
                    return
                continue
            except Exception:
                if not one_at_a_time:
                    logger.debug(
                        "writing %d audit events failed; writing them one at a time", len(batch), exc_info=True
                    )
                    one_at_a_time = True
                    continue
                logger.exception(
                    "dropping audit event %s: writing it failed with an unexpected error", batch[0].event_id
                )
                self._finish_head(1)
                continue

            one_at_a_time = False
            self._note_success()
            for event, receipt in zip(batch, receipts):
                if event.on_written is None:
                    continue
                try:
                    event.on_written(receipt)
                except Exception:
                    logger.exception("audit on_written callback for event %s failed", event.event_id)
            self._finish_head(len(receipts))

    def _finish_head(self, count: int) -> None:
        with self._condition:
            for _ in range(count):
                self._queue.popleft()
            self._condition.notify_all()

    def _note_success(self) -> None:
        with self._condition:
            failures = self._consecutive_failures
            self._consecutive_failures = 0
            self._healthy = True
        if failures:
            logger.info("audit write to %s succeeded after %d failed attempts", self._log.path, failures)

    def _note_failure(self, exc: AuditWriteError) -> float:
        """Record a failed attempt, log it (rate-limited) and return the delay before the retry."""
        with self._condition:
            self._consecutive_failures += 1
            self._healthy = False
            attempts = self._consecutive_failures
            pending = len(self._queue)

        exponent = min(attempts - 1, 32)
        delay_seconds = min(self._max_backoff_seconds, self._initial_backoff_seconds * 2.0**exponent)
        delay_seconds *= 0.5 + 0.5 * self._random.random()
        # Log the first failure, then every 10th, so a full disk does not flood the log.
        if attempts == 1 or attempts % 10 == 0:
            logger.warning(
                "audit write to %s failed (attempt %d, %d events pending), retrying in %.3f s: %s",
                exc.filename or self._log.path,
                attempts,
                pending,
                delay_seconds,
                exc,
            )
        return delay_seconds


# --------------------------------------------------------------------------
# Verification


@dataclasses.dataclass(frozen=True)
class VerifyError:
    """The first record that breaks the chain.

    Attributes:
        path: File holding the record.
        line: 1-based line number in that file; 0 for a problem with the
            file or the set of files rather than with one record.
        message: What is wrong, such as ``prev does not match the hash of
            line 6 (record edited, deleted or inserted)``.
    """

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        if self.line == 0:
            return f"{self.path}: {self.message}"
        return f"{self.path} line {self.line}: {self.message}"


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes:
        ok: True if the whole chain verified.
        records: Records verified (before the error, when there is one).
        files: Files opened.
        error: The first break, or None.
        last_seq: Seq of the last verified record, 0 if none.
        last_hash: Hash of the last verified record, :data:`ZERO_HASH` if none.
        last_hash_file_seq: Seq named by the directory's ``last-hash.json``
            when the log was checked against that file, else None.
        last_hash_file_missing: True when a directory with records was
            checked without ``expected_last_hash`` and has no
            ``last-hash.json``, so records cut from the end, or an edit of
            the last record, went unchecked.
        chain_start_error: What is wrong with a directory's
            ``chain-start.json``, or None. The file cannot be read or is
            invalid, so the authority does not start on the directory, or it
            is missing although ``last-hash.json`` stores a chain start
            time. It fails the result only with ``require_valid_chain_start``.
    """

    ok: bool
    records: int
    files: int
    error: VerifyError | None = None
    last_seq: int = 0
    last_hash: str = ZERO_HASH
    last_hash_file_seq: int | None = None
    last_hash_file_missing: bool = False
    chain_start_error: VerifyError | None = None


@dataclasses.dataclass
class _ChainState:
    records: int = 0
    last_seq: int = 0
    last_hash: str = ZERO_HASH
    last_path: Path | None = None
    last_line: int = 0
    # Seq of the record that last-hash.json names, and that record's file, line and hash once found.
    find_seq: int = 0
    found_record: tuple[Path, int, str] | None = None
    # Type, file and line of each grant, revoke and end event ID, collected for verify_replicas.
    event_places: dict[str, tuple[str, Path, int]] | None = None


def _first_seq_or_name_order(path: Path) -> tuple[float, str]:
    """Sort key of a file in chain order: its first record's seq, else the seq in its name."""
    try:
        with path.open("rb") as file:
            record = _parse_line(file.readline().rstrip(b"\n"))
    except OSError:
        record = None
    if record is not None and _is_seq(record.get("seq")):
        return (float(record["seq"]), path.name)
    match = _ROTATED_FILE_NAME.fullmatch(path.name)
    if match:
        return (float(int(match.group(1))), path.name)
    return (math.inf, path.name)


def list_audit_files(directory: Path) -> list[Path]:
    """Return the audit files of a directory in chain order (rotated files, then ``audit.jsonl``)."""
    files = [path for _, path in _list_rotated_files(directory)]
    current = directory / CURRENT_FILE_NAME
    if current.is_file():
        files.append(current)
    return files


def _check_record_fields(record: Mapping[str, Any]) -> str | None:
    """Return what is wrong with a record's own fields, or None."""
    if "v" not in record:
        return "missing field 'v' (format version)"
    if record["v"] != FORMAT_VERSION:
        return f"unknown format version {record['v']!r}; this verifier reads version {FORMAT_VERSION}"
    for name in RECORD_FIELDS:
        if name not in record:
            return f"missing field {name!r}"
    if not _is_seq(record["seq"]):
        return f"seq must be a positive integer, got {record['seq']!r}"
    if not (isinstance(record["prev"], str) and _SHA256_HEX.fullmatch(record["prev"])):
        return f"prev must be 64 lower-case hex characters, got {record['prev']!r}"
    if record["type"] not in EVENT_TYPES and record["type"] != ROTATE_TYPE:
        return f"unknown record type {record['type']!r}"
    if not (isinstance(record["event_id"], str) and record["event_id"]):
        return f"event_id must be a non-empty string, got {record['event_id']!r}"
    try:
        written_at = datetime.datetime.fromisoformat(record["time"])
    except (TypeError, ValueError):
        return f"time must be an ISO 8601 timestamp, got {record['time']!r}"
    if written_at.utcoffset() is None:
        return f"time must carry a UTC offset, got {record['time']!r}"
    return None


def _check_chain_link(
    record: Mapping[str, Any], path: Path, line_number: int, first_file: bool, state: _ChainState
) -> str | None:
    """Return how a record fails to follow the previous one, or None."""
    seq = record["seq"]
    if state.last_seq == 0:
        if seq != 1:
            return f"the chain starts at seq {seq}, expected 1 (records or files deleted from the start)"
        if record["prev"] != ZERO_HASH:
            return "the first record's prev must be 64 zeros (records or files deleted from the start)"
    elif seq <= state.last_seq:
        return f"seq {seq} follows seq {state.last_seq} (record inserted, duplicated or reordered)"
    elif seq != state.last_seq + 1:
        missing = _missing_previous_file(record, path)
        if missing is not None:
            return (
                f"seq {seq} follows seq {state.last_seq} (record deleted or reordered): this rotate record names"
                f" {missing} as the file before it, which is not in the directory. If it was moved, put it back"
                " under that name"
            )
        return f"seq {seq} follows seq {state.last_seq} (record deleted or reordered)"
    elif record["prev"] != state.last_hash:
        where = f"line {state.last_line}"
        if state.last_path is not None and state.last_path != path:
            where += f" of {state.last_path.name}"
        return f"prev does not match the hash of {where} (record edited, deleted or inserted)"

    is_rotate = record["type"] == ROTATE_TYPE
    if line_number == 1 and not first_file and not is_rotate:
        return "the file does not start with a rotate record (files joined or records moved)"
    if is_rotate and (line_number != 1 or first_file):
        return "rotate record where none belongs: only the first record of a later file is one"
    return None


def _missing_previous_file(record: Mapping[str, Any], path: Path) -> str | None:
    """Return the file a rotate record names as the one before it, if that file is not beside ``path``."""
    if record["type"] != ROTATE_TYPE:
        return None
    name = record.get("previous_file")
    if not isinstance(name, str) or not _ROTATED_FILE_NAME.fullmatch(name) or (path.parent / name).exists():
        return None
    return name


def _is_canonical(record: Mapping[str, Any], line: bytes) -> bool:
    try:
        return _encode(record) == line
    except ValueError:  # A lone surrogate escape cannot be encoded as UTF-8.
        return False


def _verify_file(path: Path, first_file: bool, state: _ChainState) -> VerifyError | None:
    try:
        file = path.open("rb")
    except OSError as exc:
        return VerifyError(path, 0, f"cannot read the file: {exc.strerror or exc}")
    with file:
        for line_number, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                return VerifyError(path, line_number, "record is truncated (no newline at the end of the file)")
            line = raw[:-1]
            record = _parse_line(line)
            if record is None:
                return VerifyError(path, line_number, "not a JSON object (record edited or corrupted)")

            problem = _check_record_fields(record)
            if problem is None and not _is_canonical(record, line):
                problem = "record is not in canonical form (sorted keys, compact separators), so it was edited"
            if problem is None:
                problem = _check_chain_link(record, path, line_number, first_file, state)
            if problem is not None:
                return VerifyError(path, line_number, problem)

            state.records += 1
            state.last_seq = record["seq"]
            state.last_hash = record_hash(line)
            state.last_path = path
            state.last_line = line_number
            if state.last_seq == state.find_seq:
                state.found_record = (path, line_number, state.last_hash)
            if state.event_places is not None and record["type"] in EVENT_TYPES:
                state.event_places.setdefault(record["event_id"], (record["type"], path, line_number))
    return None


def verify(
    paths: Sequence[Path] | Path,
    *,
    expected_last_hash: str | None = None,
    require_last_hash_file: bool = False,
    require_valid_chain_start: bool = False,
) -> VerifyResult:
    """Check the hash chain of an audit directory or of audit files, and report the first break.

    An edited record shows as invalid JSON, as a line not in canonical form,
    or as a ``prev`` mismatch in the next record. Deleted, inserted,
    duplicated or reordered records show as a seq gap or repeat, or as a
    ``prev`` mismatch. It also detects a truncated last line, an unknown
    format version, missing fields, and missing or misplaced rotated files.

    An edit of the last record, or the removal of whole records from the
    end, leaves no later record to disagree with it. For a directory, the
    log is therefore also checked against its ``last-hash.json``: the record
    with the seq that file names must exist and have its hash. The log may
    continue past that record, because the file is replaced only after each
    write is durable. A directory with records but without that file (it
    was deleted, or an older version wrote the log) is checked without it,
    and the result says so in ``last_hash_file_missing``, unless
    ``require_last_hash_file`` makes that a failure. A list of files is
    checked without it. In both cases those changes at the end go
    undetected unless ``expected_last_hash`` is given. The chain must start
    at seq 1, so rotated files can be archived elsewhere but must be passed
    back in for a check.

    A directory's ``chain-start.json`` is read too, because the authority
    does not start on a directory whose file cannot be read or is invalid.
    A problem with it is reported in ``chain_start_error``.

    A directory may be checked while an authority writes it. When a check
    fails and the directory's files changed while it read them (a rotation
    or a write in progress), the directory is read again, at most
    :data:`VERIFY_ATTEMPTS` times in all, and the last result is returned.

    Args:
        paths: A directory (all of its audit files, in chain order), one
            file, or several files; files are put in order of their first seq.
        expected_last_hash: SHA-256 hex that the last record must hash to.
            When given, it replaces the check against ``last-hash.json``.
        require_last_hash_file: Fail when a directory has records but no
            ``last-hash.json`` (and ``expected_last_hash`` is not given). A
            directory without records never has the file, so it passes.
        require_valid_chain_start: Fail when a directory's
            ``chain-start.json`` has a problem (see ``chain_start_error``),
            rather than only reporting it. A missing file is a problem only
            when ``last-hash.json`` stores a chain start time.

    Returns:
        The result; ``error`` names the file and line of the first break.

    Raises:
        ValueError: ``expected_last_hash`` is not 64 lower-case hex characters.
    """
    if expected_last_hash is not None and not _SHA256_HEX.fullmatch(expected_last_hash):
        raise ValueError(
            f"expected_last_hash must be 64 lower-case hex characters (a SHA-256), got {expected_last_hash!r}"
        )
    return _verify(paths, expected_last_hash, require_last_hash_file, require_valid_chain_start, _ChainState())


def _verify(
    paths: Sequence[Path] | Path,
    expected_last_hash: str | None,
    require_last_hash_file: bool,
    require_valid_chain_start: bool,
    state: _ChainState,
) -> VerifyResult:
    """Verify the paths, and read a directory again when its files changed during a failed check.

    A running authority appends to ``audit.jsonl``, replaces
    ``last-hash.json`` and rotates while a check reads. A check that overlaps
    a rotation can list the files before the rename and open the new
    ``audit.jsonl`` after it, or miss both names, and then reports a seq gap
    or records cut from the end that no one removed. A failure on a
    directory that stayed the same while it was read is final.
    """
    directory = Path(paths) if isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir() else None
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        before = _directory_snapshot(directory) if directory is not None else None
        attempt_state = _ChainState(event_places=None if state.event_places is None else {})
        result = _verify_once(
            paths, expected_last_hash, require_last_hash_file, require_valid_chain_start, attempt_state
        )
        if result.ok or directory is None or _directory_snapshot(directory) == before:
            break
        logger.debug(
            "audit directory %s changed during check %d of %d, which failed: %s",
            directory,
            attempt,
            VERIFY_ATTEMPTS,
            result.error,
        )
    vars(state).update(vars(attempt_state))
    return result


def _directory_snapshot(directory: Path) -> frozenset[tuple[str, int, int, int]]:
    """Return the name, inode, size and modification time of each entry of a directory.

    Two equal snapshots taken before and after a check show that no file was
    appended to, replaced, renamed or removed in between. An unreadable
    directory gives an empty snapshot.
    """
    entries = set()
    try:
        with os.scandir(directory) as scan:
            for entry in scan:
                try:
                    status = entry.stat()
                except OSError:  # Removed between the listing and the stat: the next snapshot differs.
                    continue
                entries.add((entry.name, status.st_ino, status.st_size, status.st_mtime_ns))
    except OSError:
        return frozenset()
    return frozenset(entries)


def _verify_once(
    paths: Sequence[Path] | Path,
    expected_last_hash: str | None,
    require_last_hash_file: bool,
    require_valid_chain_start: bool,
    state: _ChainState,
) -> VerifyResult:
    stored: LastHash | None = None
    stored_error: VerifyError | None = None
    chain_start_error: VerifyError | None = None
    # Path of the last-hash.json that a directory lacks; None when it has one or when files were given.
    missing_last_hash_file: Path | None = None
    if isinstance(paths, (str, os.PathLike)):
        target = Path(paths)
        if target.is_dir():
            files = list_audit_files(target)
            if not files:
                message = f"no audit files ({CURRENT_FILE_NAME} or audit-<seq>.jsonl) in this directory{_subdirectory_hint(target)}"
                return VerifyResult(ok=False, records=0, files=0, error=VerifyError(target, 0, message))
            if expected_last_hash is None:
                stored, stored_error = _load_last_hash_for_verify(target)
                if stored is None and stored_error is None:
                    missing_last_hash_file = target / LAST_HASH_FILE_NAME
            chain_start_error = _check_chain_start_for_verify(target, stored)
        else:
            files = [target]
    else:
        files = sorted((Path(path) for path in paths), key=_first_seq_or_name_order)
        if not files:
            raise ValueError("paths must name at least one audit file or directory, got an empty list")
        directories = [path for path in files if path.is_dir()]
        if directories:
            raise ValueError(f"{directories[0]} is a directory; pass a directory alone, or a list of audit files")

    if stored is not None:
        state.find_seq = stored.seq
    stored_seq = stored.seq if stored is not None else None
    for index, path in enumerate(files):
        error = _verify_file(path, index == 0, state)
        if error is not None:
            missing = missing_last_hash_file is not None and state.records > 0
            return VerifyResult(
                False,
                state.records,
                index + 1,
                error,
                state.last_seq,
                state.last_hash,
                stored_seq,
                missing,
                chain_start_error,
            )

    error = stored_error
    missing = missing_last_hash_file is not None and state.records > 0
    if expected_last_hash is not None and state.last_hash != expected_last_hash:
        where = state.last_path if state.last_path is not None else files[-1]
        message = "the last record's hash does not match the expected last hash (records edited or deleted at the end)"
        error = VerifyError(where, state.last_line, message)
    elif stored is not None:
        error = _check_last_hash(stored, state, files[-1])
    elif missing and require_last_hash_file:
        assert missing_last_hash_file is not None
        error = VerifyError(
            missing_last_hash_file,
            0,
            f"missing, although the log has {state.records} records, so records cut from its end cannot be"
            " detected (the file was deleted, or an older version wrote the log)",
        )
    if error is None and require_valid_chain_start:
        error = chain_start_error
    return VerifyResult(
        error is None,
        state.records,
        len(files),
        error,
        state.last_seq,
        state.last_hash,
        stored_seq,
        missing,
        chain_start_error,
    )


def _check_chain_start_for_verify(directory: Path, stored: LastHash | None) -> VerifyError | None:
    """Read a directory's ``chain-start.json`` and return its problem (``VerifyResult.chain_start_error``), or None."""
    path = directory / CHAIN_START_FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if stored is None or stored.chain_start_time is None:
            return None
        return VerifyError(
            path,
            0,
            f"missing, although {LAST_HASH_FILE_NAME} records that the chain started at authority time"
            f" {stored.chain_start_time:.6f} (the file was deleted)",
        )
    except OSError as exc:
        return VerifyError(path, 0, f"cannot read the file: {exc.strerror or exc}")
    try:
        _parse_chain_start(data)
    except ValueError as exc:
        return VerifyError(path, 0, f"invalid chain-start file: {exc}")
    return None


def _load_last_hash_for_verify(directory: Path) -> tuple[LastHash | None, VerifyError | None]:
    """Read a directory's ``last-hash.json``; a file that cannot be used becomes a verify error."""
    path = directory / LAST_HASH_FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, VerifyError(path, 0, f"cannot read the file: {exc.strerror or exc}")
    try:
        return _parse_last_hash(data), None
    except ValueError as exc:
        return None, VerifyError(path, 0, f"invalid last-hash file: {exc}")


def _check_last_hash(stored: LastHash, state: _ChainState, last_file: Path) -> VerifyError | None:
    """Return how a fully verified chain disagrees with its ``last-hash.json``, or None."""
    if state.found_record is None:
        where = state.last_path if state.last_path is not None else last_file
        return VerifyError(
            where,
            0,
            f"records were removed from the end: the log ends at seq {state.last_seq}, but {LAST_HASH_FILE_NAME}"
            f" records seq {stored.seq} as written",
        )
    path, line, digest = state.found_record
    if digest != stored.hash:
        return VerifyError(
            path,
            line,
            f"the hash of seq {stored.seq} does not match the hash in {LAST_HASH_FILE_NAME}"
            " (record edited, or the records at the end replaced)",
        )
    return None


@dataclasses.dataclass(frozen=True)
class DuplicateEvent:
    """One ``grant``, ``revoke`` or ``end`` event ID recorded in the audit logs of two directories.

    Attributes:
        event_id: The event ID, such as ``end:<lease digest>``.
        type: The record type: ``grant``, ``revoke`` or ``end``.
        first_path: File of the first record found (in the order the
            directories were given).
        first_line: Its 1-based line number.
        second_path: File of the other record.
        second_line: Its 1-based line number.
    """

    event_id: str
    type: str
    first_path: Path
    first_line: int
    second_path: Path
    second_line: int

    def __str__(self) -> str:
        return (
            f"{self.type} event {self.event_id} is recorded twice: {self.first_path} line {self.first_line}"
            f" and {self.second_path} line {self.second_line}"
        )


@dataclasses.dataclass(frozen=True)
class ReplicaVerifyResult:
    """Outcome of :func:`verify_replicas`.

    Attributes:
        results: Each directory with the result of its own chain, in the
            order given.
        duplicates: Grant, revoke and end event IDs found in more than one
            directory, in the order found.
    """

    results: tuple[tuple[Path, VerifyResult], ...]
    duplicates: tuple[DuplicateEvent, ...]

    @property
    def duplicate_ends(self) -> tuple[DuplicateEvent, ...]:
        """The ``end`` events among :attr:`duplicates`."""
        return tuple(duplicate for duplicate in self.duplicates if duplicate.type == "end")

    @property
    def ok(self) -> bool:
        """True if every chain verified and no event is recorded in two directories."""
        return not self.duplicates and all(result.ok for _, result in self.results)


def verify_replicas(
    directories: Sequence[Path], *, require_last_hash_file: bool = False, require_valid_chain_start: bool = False
) -> ReplicaVerifyResult:
    """Check several audit directories whose events must each be recorded once among them.

    The directories are the chains of authority replicas, or an earlier
    chain that an operator moved aside and the chain that replaced it. Each
    directory is verified on its own, exactly as :func:`verify` checks one
    directory (including its ``last-hash.json``). Then the directories are
    checked against each other: a lease is granted, revoked and ended once,
    so each ``grant``, ``revoke`` and ``end`` event ID may appear in at most
    one of them. Records before a chain's first break take part in that
    check too. Duplicates within one directory are not reported here,
    because one log may write an event again after two rotations (see
    :class:`AuditLog`).

    Memory: keeps the event ID, type and place of every grant, revoke and
    end record of all the directories, about 250 bytes each (measured for
    end records with tracemalloc on CPython 3.11).

    Args:
        directories: Two or more audit directories.
        require_last_hash_file: Passed to :func:`verify` for each directory.
        require_valid_chain_start: Passed to :func:`verify` for each directory.

    Returns:
        The per-directory results and every duplicated event.

    Raises:
        ValueError: Fewer than two directories, a path that is not a
            directory, or one directory given twice.
    """
    paths = [Path(directory) for directory in directories]
    if len(paths) < 2:
        raise ValueError(f"directories must name at least two audit directories, got {len(paths)}; use verify for one")
    seen: dict[Path, Path] = {}
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory; pass the audit directory of each replica")
        resolved = path.resolve()
        if resolved in seen:
            raise ValueError(f"{path} and {seen[resolved]} are the same directory; pass each replica's directory once")
        seen[resolved] = path

    results: list[tuple[Path, VerifyResult]] = []
    first_places: dict[str, tuple[int, Path, int]] = {}
    duplicates: list[DuplicateEvent] = []
    for index, path in enumerate(paths):
        state = _ChainState(event_places={})
        results.append((path, _verify(path, None, require_last_hash_file, require_valid_chain_start, state)))
        assert state.event_places is not None
        for event_id, (type, file, line) in state.event_places.items():
            first = first_places.setdefault(event_id, (index, file, line))
            if first[0] != index:
                duplicates.append(DuplicateEvent(event_id, type, first[1], first[2], file, line))
    return ReplicaVerifyResult(tuple(results), tuple(duplicates))


# --------------------------------------------------------------------------
# Tail


def _read_lines(path: Path, follow: bool, poll_seconds: float, stop: threading.Event | None) -> Iterator[bytes | None]:
    """Yield complete lines of a file, and None each time the end of the file is reached.

    With ``follow``, keeps polling for new lines; when the path is replaced by
    a new file (rotation), drains the old file and reopens the path.
    """
    file = None
    inode = 0
    # Bytes after the last newline read. A bytearray grows in place, so a long
    # line costs time linear in its length.
    buffered = bytearray()
    try:
        while stop is None or not stop.is_set():
            if file is None:
                try:
                    file = path.open("rb")
                except FileNotFoundError:
                    if not follow:
                        return
                    yield None
                    if _wait(stop, poll_seconds):
                        return
                    continue
                inode = os.fstat(file.fileno()).st_ino
                buffered = bytearray()

            chunk = file.read(65536)
            if chunk:
                buffered += chunk
                if b"\n" in chunk:
                    *lines, rest = buffered.split(b"\n")
                    buffered = rest
                    yield from (bytes(line) for line in lines)
                continue

            yield None
            if not follow:
                return
            try:
                status: os.stat_result | None = os.stat(path)
            except FileNotFoundError:
                status = None
            if status is None or status.st_ino != inode:
                # Rotated: the writer finished the old file before renaming it.
                buffered += file.read()
                *lines, _torn = buffered.split(b"\n")
                yield from (bytes(line) for line in lines)
                file.close()
                file = None
                if status is not None:
                    continue
            elif status.st_size < file.tell():
                # A torn last line was cut off when the writer reopened the file.
                file.seek(status.st_size)
                buffered = bytearray()
            if _wait(stop, poll_seconds):
                return
    finally:
        if file is not None:
            file.close()


def _wait(stop: threading.Event | None, seconds: float) -> bool:
    """Wait for the next poll; return True if ``stop`` was set."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


def _parse_tail_line(path: Path, line: bytes) -> dict[str, Any] | None:
    record = _parse_line(line)
    if record is None:
        logger.warning("skipping a line of %s that is not a JSON object", path)
    return record


def _records_in_rotated_files(directory: Path, after_seq: int, before_seq: float) -> Iterator[dict[str, Any]]:
    """Yield records with ``after_seq < seq < before_seq`` from rotated files, in order."""
    rotated = _list_rotated_files(directory)
    for index, (first_seq, path) in enumerate(rotated):
        next_first_seq = rotated[index + 1][0] if index + 1 < len(rotated) else math.inf
        if next_first_seq <= after_seq + 1 or first_seq >= before_seq:
            continue
        for line in _read_lines(path, follow=False, poll_seconds=0, stop=None):
            record = None if line is None else _parse_tail_line(path, line)
            if record is not None and _is_seq(record.get("seq")) and after_seq < record["seq"] < before_seq:
                yield record


def tail(
    path: Path,
    *,
    follow: bool,
    poll_seconds: float = 0.25,
    stop: threading.Event | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield audit records, oldest first, optionally waiting for new ones.

    For a directory, yields the records of its rotated files and then of
    ``audit.jsonl``. With ``follow``, keeps reading ``audit.jsonl`` as records
    are appended and reopens it when it is rotated. Records missed during a
    rotation are read from the rotated file, and records are matched by seq,
    so none is skipped or repeated. For a single file, yields its records
    and, with ``follow``, those appended later.

    A torn last line is not yielded until its newline arrives. Lines that
    are not JSON objects are logged and skipped: use :func:`verify` to check
    the log, not this.

    Args:
        path: Audit directory or file.
        follow: Keep waiting for new records until ``stop`` is set.
        poll_seconds: How often to look for new records while following.
        stop: Ends the iteration at the next poll when set. Without it a
            following iteration ends only when the caller stops consuming it.
    """
    path = Path(path)
    if not path.is_dir():
        for line in _read_lines(path, follow, poll_seconds, stop):
            record = None if line is None else _parse_tail_line(path, line)
            if record is not None:
                yield record
        return

    last_seq = 0
    caught_up = False
    current = path / CURRENT_FILE_NAME
    for line in _read_lines(current, follow, poll_seconds, stop):
        if line is None:
            # End of audit.jsonl, or it is missing. Read the rotated files
            # now in case audit.jsonl has no record yet.
            if not caught_up:
                for record in _records_in_rotated_files(path, last_seq, math.inf):
                    last_seq = record["seq"]
                    yield record
                caught_up = True
            continue
        record = _parse_tail_line(current, line)
        if record is None or not _is_seq(record.get("seq")):
            continue
        seq = record["seq"]
        if seq <= last_seq:
            continue
        if seq > last_seq + 1:
            for earlier in _records_in_rotated_files(path, last_seq, seq):
                yield earlier
        last_seq = seq
        caught_up = True
        yield record
    if not follow and not caught_up:
        yield from _records_in_rotated_files(path, last_seq, math.inf)


# --------------------------------------------------------------------------
# Command line


_TABLE_FIELDS = ("principal", "tier", "reason", "revoked_by", "duration_seconds", "granted_at", "ended_at")
_TABLE_HIDDEN = frozenset({"v", "prev", "event_id", "seq", "time", "type", "fingerprint"})


def format_record_line(record: Mapping[str, Any]) -> str:
    """Format a record as one table line: seq, time, type, fingerprint, then ``name=value`` pairs."""
    names = [name for name in _TABLE_FIELDS if name in record]
    names += sorted(name for name in record if name not in _TABLE_HIDDEN and name not in _TABLE_FIELDS)
    details = " ".join(f"{name}={_format_value(record[name])}" for name in names)
    return (
        f"{record.get('seq', '?')!s:>8}  {record.get('time', '-')!s:<32}  {record.get('type', '-')!s:<6}  "
        f"{record.get('fingerprint', '-')!s:<12}  {details}"
    ).rstrip()


_TABLE_HEADER = f"{'SEQ':>8}  {'TIME':<32}  {'TYPE':<6}  {'FINGERPRINT':<12}  DETAILS"


def _format_value(value: object) -> str:
    if isinstance(value, str) and value and not any(character.isspace() or character in "\"=" for character in value):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="session-authority audit",
        description="Verify or read the tamper-evident audit log of a session authority.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify_parser = commands.add_parser(
        "verify",
        help="check the hash chain; exit 0 if unbroken, 1 at the first broken record",
        description="Check the hash chain of an audit directory or of audit files. A directory is also "
        f"checked against its {LAST_HASH_FILE_NAME}, which catches records cut from the end; without that "
        "file the check is skipped and the OK line says so. Several directories (one per authority replica, "
        "or an earlier chain moved aside and the chain after it) are each checked on their own, and then "
        "checked for a grant, revoke or end event recorded in more than one of them.",
    )
    verify_parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="audit directory (checks all its audit files in order), one or more audit files, "
        "or several audit directories (replicas, or an old chain and its successor)",
    )
    verify_parser.add_argument(
        "--expected-last-hash",
        metavar="HEX",
        help="SHA-256 (64 hex characters) that the last record must hash to; replaces the check against "
        f"{LAST_HASH_FILE_NAME}, and is needed to catch an edit of the last record or records cut from "
        "the end when checking files rather than a directory",
    )
    verify_parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit 1 when a directory has records but no {LAST_HASH_FILE_NAME}, so the end of the log cannot "
        f"be checked, or when its {CHAIN_START_FILE_NAME} cannot be read, is invalid, or is missing although "
        f"{LAST_HASH_FILE_NAME} records a chain start (without --strict that prints a warning). With audit "
        "files instead of a directory it requires --expected-last-hash",
    )
    verify_parser.add_argument("--json", action="store_true", help="print the result as one JSON object")

    tail_parser = commands.add_parser(
        "tail",
        help="print audit records",
        description="Print the records of an audit directory or file, oldest first.",
    )
    tail_parser.add_argument("path", type=Path, metavar="PATH", help="audit directory or audit file")
    tail_parser.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new records, across rotations, until interrupted"
    )
    tail_parser.add_argument("--json", action="store_true", help="print each record as its JSON line")
    return parser


def _run_verify(arguments: argparse.Namespace) -> int:
    paths: list[Path] = arguments.paths
    missing = [path for path in paths if not path.exists()]
    if missing:
        print(f"session-authority audit verify: error: {missing[0]}: no such file or directory", file=sys.stderr)
        return 2
    directories = [path for path in paths if path.is_dir()]
    if len(paths) > 1 and directories:
        return _run_verify_replicas(arguments, paths, directories)

    if arguments.strict and not directories and arguments.expected_last_hash is None:
        print(
            "session-authority audit verify: error: --strict with audit files needs --expected-last-hash,"
            " because only a directory has a last-hash.json to check the end of the log against",
            file=sys.stderr,
        )
        return 2
    target: Path | list[Path] = paths[0] if len(paths) == 1 else paths
    try:
        result = verify(
            target,
            expected_last_hash=arguments.expected_last_hash,
            require_last_hash_file=arguments.strict,
            require_valid_chain_start=arguments.strict,
        )
    except ValueError as exc:
        print(f"session-authority audit verify: error: {exc}", file=sys.stderr)
        return 2

    if arguments.json:
        print(json.dumps(_verify_summary(result), sort_keys=True))
    else:
        print(_verify_line(result))
    return 0 if result.ok else 1


_MAX_DUPLICATES_PRINTED = 20
"""Duplicated events printed by ``audit verify DIR1 DIR2 ...`` before the rest are only counted."""


def _run_verify_replicas(arguments: argparse.Namespace, paths: list[Path], directories: list[Path]) -> int:
    files = [path for path in paths if not path.is_dir()]
    problem = None
    if files:
        problem = (
            f"{directories[0]} is a directory but {files[0]} is not; pass one directory, audit files,"
            " or only directories (one per replica)"
        )
    elif arguments.expected_last_hash is not None:
        problem = "--expected-last-hash checks one log; pass a single directory with it"
    if problem is None:
        try:
            replicas = verify_replicas(
                paths, require_last_hash_file=arguments.strict, require_valid_chain_start=arguments.strict
            )
        except ValueError as exc:
            problem = str(exc)
    if problem is not None:
        print(f"session-authority audit verify: error: {problem}", file=sys.stderr)
        return 2

    if arguments.json:
        summary = {
            "ok": replicas.ok,
            "directories": [{"path": str(path), **_verify_summary(result)} for path, result in replicas.results],
            "duplicates": [
                {
                    "event_id": duplicate.event_id,
                    "type": duplicate.type,
                    "first": {"path": str(duplicate.first_path), "line": duplicate.first_line},
                    "second": {"path": str(duplicate.second_path), "line": duplicate.second_line},
                }
                for duplicate in replicas.duplicates
            ],
        }
        print(json.dumps(summary, sort_keys=True))
        return 0 if replicas.ok else 1

    for path, result in replicas.results:
        print(f"{path}: {_verify_line(result)}")
    duplicates = replicas.duplicates
    for duplicate in duplicates[:_MAX_DUPLICATES_PRINTED]:
        print(f"DUPLICATE: {duplicate}")
    if len(duplicates) > _MAX_DUPLICATES_PRINTED:
        print(f"DUPLICATE: {len(duplicates) - _MAX_DUPLICATES_PRINTED} more not printed; use --json for all")
    failed = sum(1 for _, result in replicas.results if not result.ok)
    if replicas.ok:
        print(f"OK: {len(paths)} directories verified, and no grant, revoke or end event is recorded in more than one")
    else:
        events = "event" if len(duplicates) == 1 else "events"
        print(
            f"FAIL: {failed} of {len(paths)} chains broken,"
            f" {len(duplicates)} {events} recorded in more than one directory"
        )
    return 0 if replicas.ok else 1


def _verify_summary(result: VerifyResult) -> dict[str, object]:
    summary: dict[str, object] = {
        "ok": result.ok,
        "records": result.records,
        "files": result.files,
        "last_seq": result.last_seq,
        "last_hash": result.last_hash,
        "last_hash_file_seq": result.last_hash_file_seq,
        "last_hash_file_missing": result.last_hash_file_missing,
        "chain_start_error": None if result.chain_start_error is None else str(result.chain_start_error),
        "error": None,
    }
    if result.error is not None:
        summary["error"] = {
            "path": str(result.error.path),
            "line": result.error.line,
            "message": result.error.message,
        }
    return summary


def _verify_line(result: VerifyResult) -> str:
    if not result.ok:
        return f"FAIL: {result.error}"
    line = _verify_ok_line(result)
    if result.chain_start_error is not None:
        line += f"\nWARNING: {result.chain_start_error} (--strict makes this a failure)"
    return line


def _verify_ok_line(result: VerifyResult) -> str:
    records = "record" if result.records == 1 else "records"
    files = "file" if result.files == 1 else "files"
    line = f"OK: {result.records} {records} in {result.files} {files}, chain verified"
    if result.last_hash_file_missing:
        return (
            f"{line}, but the end of the log was not checked because {LAST_HASH_FILE_NAME} is missing, so"
            " records cut from the end would go unnoticed (--strict makes this a failure)"
        )
    anchored = result.last_hash_file_seq
    if anchored is None:
        return line
    if anchored == result.last_seq:
        return f"{line}, last record matches {LAST_HASH_FILE_NAME}"
    # The writer replaces last-hash.json only after a write is durable, so a
    # crash between the two leaves the file behind the log.
    later = result.last_seq - anchored
    return f"{line}, seq {anchored} matches {LAST_HASH_FILE_NAME} (written before the last {later})"


def _json_line(record: Mapping[str, Any]) -> str:
    try:
        return _encode(record).decode("utf-8")
    except ValueError:  # A lone surrogate escape: print it escaped rather than fail.
        return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _subdirectory_hint(directory: Path) -> str:
    """Return a hint for a data directory given where its ``audit/`` subdirectory was meant, or ""."""
    audit_directory = directory / "audit"
    if audit_directory.is_dir() and list_audit_files(audit_directory):
        return f"; an authority's data directory keeps its audit log in audit/, so give {audit_directory}"
    return ""


def _run_tail(arguments: argparse.Namespace) -> int:
    path: Path = arguments.path
    if not path.exists() and not arguments.follow:
        print(f"session-authority audit tail: error: {path}: no such file or directory", file=sys.stderr)
        return 2
    if path.is_dir() and not list_audit_files(path):
        hint = _subdirectory_hint(path)
        # Following an empty directory waits for an authority to start writing there, unless it is the wrong directory.
        if hint or not arguments.follow:
            print(
                f"session-authority audit tail: error: {path}: no audit files ({CURRENT_FILE_NAME} or"
                f" audit-<seq>.jsonl) in this directory{hint}",
                file=sys.stderr,
            )
            return 2
    if not arguments.json:
        print(_TABLE_HEADER, flush=True)
    try:
        for record in tail(path, follow=arguments.follow):
            line = _json_line(record) if arguments.json else format_record_line(record)
            print(line, flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


def audit_main(argv: Sequence[str]) -> int:
    """Run ``session-authority audit verify|tail`` with the arguments after ``audit``.

    ``verify`` exits 0 and prints ``OK: N records in M files, chain verified``
    (followed by the result of the ``last-hash.json`` check for a directory,
    or by a note that the check was skipped because the file is missing),
    or exits 1 and prints ``FAIL: PATH line N: message``. ``--strict`` turns
    the skipped check into exit 1. With several directories it prints one
    such line per directory, a ``DUPLICATE:`` line per grant, revoke or end
    event found in two of them, and an ``OK:`` or ``FAIL:`` summary.
    Usage errors and missing paths exit 2 with one line on stderr.

    Returns:
        The exit code.
    """
    parser = _build_parser()
    try:
        arguments = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2).
        return exc.code if isinstance(exc.code, int) else 2
    if arguments.command == "verify":
        return _run_verify(arguments)
    return _run_tail(arguments)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(audit_main(sys.argv[1:]))
