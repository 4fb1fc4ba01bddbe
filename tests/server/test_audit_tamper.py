"""Tests of an audit log whose files something else moves, deletes, edits or truncates while the log is open.

After each change the log must write every later record and leave the
records it wrote before untouched. It must log one error that names the
change and still find duplicates of earlier events. ``verify`` must report
the directory as broken where records are missing or changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Iterator

import grpc
import pytest

from session_authority.server import (
    AuditLog,
    AuthorityConfig,
    AuthorityThread,
    InsecureDevAuthenticator,
    ManualClock,
    parse_policy,
)
import session_authority.server._audit as audit_module
from session_authority.server._audit import (
    CURRENT_FILE_NAME,
    ZERO_HASH,
    AuditReceipt,
    AuditWriteError,
    list_audit_files,
    record_hash,
    rotated_file_name,
    verify,
)
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from audit_support import SteppingWallClock, released_end_fields
from policies import ONE_TIER_POLICY

MAX_BYTES = 4096
AUDIT_LOGGER = "session_authority.server._audit"


def event_id(index: int) -> str:
    return "end:" + hashlib.sha256(f"lease-{index}".encode()).hexdigest()


def open_log(directory: pathlib.Path, **options: object) -> AuditLog:
    options.setdefault("fsync", False)
    return AuditLog(directory, wall_clock=SteppingWallClock(), **options)  # type: ignore[arg-type]


def append(log: AuditLog, indexes: range) -> dict[int, AuditReceipt]:
    return {index: log.append(event_id(index), "end", released_end_fields(index)) for index in indexes}


def append_until_rotated(log: AuditLog, directory: pathlib.Path) -> dict[int, AuditReceipt]:
    """Append events until the log rotates once; the last event returned is the only one in the new file."""
    receipts: dict[int, AuditReceipt] = {}
    while len(list_audit_files(directory)) < 2:
        receipts.update(append(log, range(len(receipts), len(receipts) + 1)))
    return receipts


def lines_of(path: pathlib.Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def records_by_event(directory: pathlib.Path) -> dict[str, list[dict[str, object]]]:
    """Return every record that parses in the directory's audit files, grouped by event ID."""
    found: dict[str, list[dict[str, object]]] = {}
    for path in list_audit_files(directory):
        for line in lines_of(path):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            found.setdefault(str(record["event_id"]), []).append(record)
    return found


def audit_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == AUDIT_LOGGER and record.levelno >= logging.ERROR
    ]


def replace_bytes(path: pathlib.Path, old: bytes, new: bytes) -> None:
    """Edit a file in place, as an editor that keeps the file (and its inode) does."""
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))


def assert_written_once(directory: pathlib.Path, receipts: dict[int, AuditReceipt]) -> None:
    found = records_by_event(directory)
    for index, receipt in receipts.items():
        assert [record["seq"] for record in found.get(event_id(index), [])] == [receipt.seq], index


def assert_duplicates(log: AuditLog, receipts: dict[int, AuditReceipt]) -> None:
    for index, original in receipts.items():
        repeat = log.append(event_id(index), "end", released_end_fields(index))
        assert repeat == AuditReceipt(seq=original.seq, hash=original.hash, duplicate=True), index


# --------------------------------------------------------------------------
# audit.jsonl moved, deleted or replaced


def test_moved_file_continues_in_new_file(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    moved = tmp_path / "moved.jsonl"
    with open_log(directory) as log:
        before = append(log, range(3))
        written_before = (directory / CURRENT_FILE_NAME).read_bytes()
        (directory / CURRENT_FILE_NAME).rename(moved)

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(3, 6))
        assert_duplicates(log, before)

    rotate = json.loads(lines_of(directory / CURRENT_FILE_NAME)[0])
    result = verify(directory)
    assert moved.read_bytes() == written_before
    assert [receipt.seq for receipt in after.values()] == [5, 6, 7]
    assert_written_once(directory, after)
    assert (rotate["type"], rotate["seq"], rotate["prev"]) == ("rotate", 4, before[2].hash)
    assert rotate["previous_file"] == rotated_file_name(1)
    assert len(audit_errors(caplog)) == 1
    assert "was moved or deleted while open" in audit_errors(caplog)[0]
    assert not result.ok
    assert result.error is not None and "the chain starts at seq 4" in result.error.message


def test_moved_file_put_back_verifies(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "audit"
    moved = tmp_path / "moved.jsonl"
    with open_log(directory) as log:
        append(log, range(3))
        (directory / CURRENT_FILE_NAME).rename(moved)
        append(log, range(3, 6))

    moved.rename(directory / rotated_file_name(1))

    assert verify(directory).ok


def test_deleted_file_continues_in_new_file(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    with open_log(directory, max_bytes=MAX_BYTES) as log:
        rotated_first = append_until_rotated(log, directory)
        in_current = {**append(log, range(100, 102)), len(rotated_first) - 1: rotated_first[len(rotated_first) - 1]}
        rotated = list_audit_files(directory)[0]
        rotated_before = rotated.read_bytes()
        last_seq_before = log.last_seq
        (directory / CURRENT_FILE_NAME).unlink()

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(200, 203))
        assert_duplicates(log, in_current)

    result = verify(directory)
    assert rotated.read_bytes() == rotated_before
    assert [receipt.seq for receipt in after.values()] == [last_seq_before + 2 + n for n in range(3)]
    assert_written_once(directory, after)
    assert len(audit_errors(caplog)) == 1
    assert result.error is not None
    assert result.error.path == directory / CURRENT_FILE_NAME
    assert result.error.line == 1
    assert "record deleted or reordered" in result.error.message


def test_file_renamed_to_rotated_name_verifies(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    with open_log(directory) as log:
        before = append(log, range(3))
        (directory / CURRENT_FILE_NAME).rename(directory / rotated_file_name(1))

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(3, 6))
        assert_duplicates(log, before)

    assert_written_once(directory, {**before, **after})
    assert audit_errors(caplog) == []
    assert "renamed to audit-000000000001.jsonl while open" in caplog.text
    assert verify(directory).ok


def test_replaced_file_written_after(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    path = directory / CURRENT_FILE_NAME
    with open_log(directory) as log:
        before = append(log, range(3))
        replacement = tmp_path / "replacement.jsonl"
        replacement.write_bytes(b"not a record")
        os.replace(replacement, path)

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(3, 5))
        assert_duplicates(log, before)

    assert lines_of(path)[0] == b"not a record"
    assert json.loads(lines_of(path)[1])["type"] == "rotate"
    assert_written_once(directory, after)
    assert len(audit_errors(caplog)) == 1
    assert "replaced by another file of 12 bytes" in audit_errors(caplog)[0]
    assert not verify(directory).ok


def test_directory_moved_keeps_writing(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    moved = tmp_path / "moved-audit"
    with open_log(directory) as log:
        before = append(log, range(3))
        directory.rename(moved)

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(3, 6))
        assert_duplicates(log, before)

    # The directory's files moved with it, so the chain in the open file stays whole.
    assert_written_once(moved, {**before, **after})
    assert not directory.exists()
    assert len(audit_errors(caplog)) == 1
    assert "audit directory" in audit_errors(caplog)[0]
    assert verify(moved).ok


# --------------------------------------------------------------------------
# audit.jsonl edited, truncated or appended to


@pytest.mark.parametrize(
    ("replacement", "message"), [(b'"tier":"standard-edited"', "grew from"), (b'"tier":"std"', "shrank from")]
)
def test_edit_keeps_records(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, replacement: bytes, message: str
) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        before = append(log, range(3))
        original = lines_of(path)
        replace_bytes(path, b'"tier":"standard"', replacement)

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(3, 6))
        assert_duplicates(log, {1: before[1], 2: before[2]})

    lines = lines_of(path)
    result = verify(tmp_path)
    assert lines[1:3] == original[1:3]
    assert json.loads(lines[3])["prev"] == before[2].hash
    assert_written_once(tmp_path, after)
    assert len(audit_errors(caplog)) == 1
    assert message in audit_errors(caplog)[0]
    assert result.error is not None
    assert (result.error.line, result.records) == (2, 1)


def test_truncated_to_zero_keeps_writing(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    path = directory / CURRENT_FILE_NAME
    with open_log(directory, max_bytes=MAX_BYTES) as log:
        in_previous = append_until_rotated(log, directory)
        in_previous.pop(len(in_previous) - 1)
        previous = list_audit_files(directory)[0]
        previous_before = previous.read_bytes()
        last_hash = log.last_hash
        os.truncate(path, 0)

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(100, 103))
        assert_duplicates(log, in_previous)

    records = [json.loads(line) for line in lines_of(path)]
    result = verify(directory)
    assert previous.read_bytes() == previous_before
    assert [record["event_id"] for record in records] == [event_id(index) for index in after]
    assert [record["seq"] for record in records] == [receipt.seq for receipt in after.values()]
    assert records[0]["prev"] == last_hash
    assert len(audit_errors(caplog)) == 1
    assert "shrank from" in audit_errors(caplog)[0]
    assert result.error is not None
    assert result.error.path == path
    assert "record deleted or reordered" in result.error.message


def test_truncated_mid_record_starts_new_line(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        append(log, range(3))
        original = lines_of(path)
        cut = len(original[0]) + 1 + len(original[1]) // 2
        os.truncate(path, cut)

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(3, 5))

    lines = lines_of(path)
    result = verify(tmp_path)
    assert lines[0] == original[0]
    assert lines[1] == original[1][: len(original[1]) // 2]
    assert [json.loads(line)["event_id"] for line in lines[2:]] == [event_id(3), event_id(4)]
    assert_written_once(tmp_path, after)
    assert len(audit_errors(caplog)) == 1
    assert result.error is not None
    assert result.error.line == 2


def test_garbage_line_kept(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        before = append(log, range(3))
        written_before = path.read_bytes()
        with path.open("ab") as file:
            file.write(b"this line was appended by hand\n")

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(3, 6))
        assert_duplicates(log, before)

    lines = lines_of(path)
    result = verify(tmp_path)
    assert path.read_bytes().startswith(written_before + b"this line was appended by hand\n")
    assert json.loads(lines[4])["prev"] == before[2].hash
    assert_written_once(tmp_path, after)
    assert len(audit_errors(caplog)) == 1
    assert "grew from" in audit_errors(caplog)[0]
    assert result.error is not None
    assert (result.error.line, result.records) == (4, 3)


def test_garbage_without_newline_ends_line(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        before = append(log, range(3))
        written_before = path.read_bytes()
        with path.open("ab") as file:
            file.write(b'{"partial":')

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(3, 6))
        assert_duplicates(log, before)

    result = verify(tmp_path)
    assert path.read_bytes().startswith(written_before + b'{"partial":\n')
    assert_written_once(tmp_path, after)
    assert len(audit_errors(caplog)) == 1
    assert "starting on a new line" in audit_errors(caplog)[0]
    assert result.error is not None
    assert (result.error.line, result.records) == (4, 3)


def test_same_size_edit_writes_on(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        before = append(log, range(3))
        replace_bytes(path, b'"tier":"standard"', b'"tier":"STANDARD"')

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(3, 5))

    result = verify(tmp_path)
    assert json.loads(lines_of(path)[3])["prev"] == before[2].hash
    assert_written_once(tmp_path, after)
    # A change that keeps the size shows only in verify, and in a duplicate of the edited record.
    assert audit_errors(caplog) == []
    assert result.error is not None
    assert result.error.line == 2


# --------------------------------------------------------------------------
# Bytes left by a failed write


class FailingTruncate:
    """Replacement for ``os.ftruncate`` that fails its first call, as on a failing disk."""

    def __init__(self) -> None:
        self.failed = False
        self._ftruncate = os.ftruncate

    def __call__(self, fd: int, length: int) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._ftruncate(fd, length)


class HalfWrite:
    """Replacement for ``os.write`` that writes half of its first data and fails, as a full disk does."""

    def __init__(self) -> None:
        self.failed = False
        self._write = os.write

    def __call__(self, fd: int, data: bytes) -> int:
        if self.failed:
            return self._write(fd, data)
        self.failed = True
        self._write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_write_leaving_half(log: AuditLog, index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Append an event with a write that leaves half its record behind, because cutting it off fails too."""
    with monkeypatch.context() as patched:
        patched.setattr(os, "write", HalfWrite())
        patched.setattr(os, "ftruncate", FailingTruncate())
        with pytest.raises(AuditWriteError):
            log.append(event_id(index), "end", released_end_fields(index))


def test_failed_write_leftover_removed(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        before = append(log, range(2))
        written_before = path.read_bytes()
        fail_write_leaving_half(log, 2, monkeypatch)
        leftover = path.stat().st_size - len(written_before)

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(2, 4))

    assert leftover > 0
    assert path.read_bytes().startswith(written_before)
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [1, 2, 3, 4]
    assert_written_once(tmp_path, {**before, **after})
    assert audit_errors(caplog) == []
    assert f"removed {leftover} bytes left by an earlier failed write" in caplog.text
    assert verify(tmp_path).ok


def test_leftover_with_outside_bytes_kept(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        before = append(log, range(2))
        fail_write_leaving_half(log, 2, monkeypatch)
        with path.open("ab") as file:
            file.write(b"appended by hand\n")
        with_outside_bytes = path.read_bytes()

        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            after = append(log, range(2, 4))
        assert_duplicates(log, before)

    assert path.read_bytes().startswith(with_outside_bytes)
    assert_written_once(tmp_path, after)
    assert len(audit_errors(caplog)) == 1
    assert "removed" not in caplog.text
    assert not verify(tmp_path).ok


# --------------------------------------------------------------------------
# Duplicate receipts from edited records


def test_edited_seq_duplicate_written_again(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        append(log, range(2))
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, path.read_bytes().replace(b'"seq":1,', b'"seq":7,', 1), 0)
        finally:
            os.close(fd)

        with caplog.at_level(logging.ERROR, logger=AUDIT_LOGGER):
            again = log.append(event_id(0), "end", released_end_fields(0))

    assert again == AuditReceipt(seq=3, hash=record_hash(lines_of(path)[2]), duplicate=False)
    assert len(audit_errors(caplog)) == 1
    assert "has seq 7, but the log wrote seqs 1 to 2 there" in audit_errors(caplog)[0]


def test_edited_field_duplicate_written_again(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        before = append(log, range(2))
        replace_bytes(path, b'"tier":"standard"', b'"tier":"premium!"')

        with caplog.at_level(logging.ERROR, logger=AUDIT_LOGGER):
            again = log.append(event_id(0), "end", released_end_fields(0))
        repeat_of_last = log.append(event_id(1), "end", released_end_fields(1))

    assert not again.duplicate
    assert again.seq == 3
    assert repeat_of_last == AuditReceipt(seq=before[1].seq, hash=before[1].hash, duplicate=True)
    assert len(audit_errors(caplog)) == 1
    assert "is not followed by seq 2 with its hash as prev" in audit_errors(caplog)[0]


def test_edited_last_record_written_again(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        append(log, range(2))
        data = path.read_bytes()
        last_start = data.rindex(b"\n", 0, len(data) - 1) + 1
        path.write_bytes(data[:last_start] + data[last_start:].replace(b'"standard"', b'"premium!"', 1))

        with caplog.at_level(logging.ERROR, logger=AUDIT_LOGGER):
            again = log.append(event_id(1), "end", released_end_fields(1))

    assert not again.duplicate
    assert again.seq == 3
    assert len(audit_errors(caplog)) == 1
    assert "does not have the hash that the log wrote" in audit_errors(caplog)[0]


def test_duplicate_in_previous_file_checked(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    with open_log(directory, max_bytes=MAX_BYTES) as log:
        first = append_until_rotated(log, directory)[0]
        previous = list_audit_files(directory)[0]
        previous_last_seq = json.loads(lines_of(previous)[-1])["seq"]
        replace_bytes(previous, b'"seq":1,', b'"seq":99,')

        with caplog.at_level(logging.ERROR, logger=AUDIT_LOGGER):
            again = log.append(event_id(0), "end", released_end_fields(0))

    assert first.seq == 1
    assert not again.duplicate
    assert len(audit_errors(caplog)) == 1
    assert f"has seq 99, but the log wrote seqs 1 to {previous_last_seq} there" in audit_errors(caplog)[0]


def test_reopened_log_checks_previous_file(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "audit"
    with open_log(directory, max_bytes=MAX_BYTES) as log:
        first = append_until_rotated(log, directory)[0]

    with open_log(directory, max_bytes=MAX_BYTES) as log:
        repeat = log.append(event_id(0), "end", released_end_fields(0))

    assert repeat == AuditReceipt(seq=first.seq, hash=first.hash, duplicate=True)
    assert first.hash != ZERO_HASH


# --------------------------------------------------------------------------
# Through a running authority

POLICY = parse_policy(ONE_TIER_POLICY)


@pytest.fixture
def authority(tmp_path: pathlib.Path) -> Iterator[tuple[AuthorityThread, pb_grpc.SessionAuthorityStub]]:
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=POLICY,
        data_dir=tmp_path,
        clock=ManualClock(),
        audit=True,
        audit_max_backoff_seconds=0.1,
    )
    running = AuthorityThread(config).start()
    channel = grpc.insecure_channel(running.target)
    try:
        yield running, pb_grpc.SessionAuthorityStub(channel)
    finally:
        channel.close()
        running.stop()


def grant_digests(stub: pb_grpc.SessionAuthorityStub, count: int) -> list[str]:
    return [stub.Grant(pb.GrantRequest(principal=f"svc-{index}")).lease.digest for index in range(count)]


def test_authority_writes_after_truncation(
    tmp_path: pathlib.Path,
    authority: tuple[AuthorityThread, pb_grpc.SessionAuthorityStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    running, stub = authority
    sink = running.authority.audit_sink
    directory = tmp_path / "audit"
    before = grant_digests(stub, 3)
    assert sink.flush(10)
    os.truncate(directory / CURRENT_FILE_NAME, 0)

    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
        after = grant_digests(stub, 3)
        flushed = sink.flush(10)
    running.stop()

    found = records_by_event(directory)
    assert flushed
    assert sink.healthy
    assert [len(found.get(f"grant:{digest}", [])) for digest in after] == [1, 1, 1]
    assert [len(found.get(f"grant:{digest}", [])) for digest in before] == [0, 0, 0]
    assert len(audit_errors(caplog)) == 1
    assert not verify(directory).ok


def test_authority_writes_after_file_moved(
    tmp_path: pathlib.Path,
    authority: tuple[AuthorityThread, pb_grpc.SessionAuthorityStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    running, stub = authority
    sink = running.authority.audit_sink
    directory = tmp_path / "audit"
    moved = tmp_path / "moved.jsonl"
    before = grant_digests(stub, 3)
    assert sink.flush(10)
    (directory / CURRENT_FILE_NAME).rename(moved)

    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
        after = grant_digests(stub, 3)
        assert sink.flush(10)
    running.stop()

    found = records_by_event(directory)
    moved_text = moved.read_bytes()
    assert [len(found.get(f"grant:{digest}", [])) for digest in after] == [1, 1, 1]
    assert all(f"grant:{digest}".encode() in moved_text for digest in before)
    assert all(f"grant:{digest}".encode() not in moved_text for digest in after)
    assert len(audit_errors(caplog)) == 1
    assert not verify(directory).ok
    moved.rename(directory / rotated_file_name(1))
    assert verify(directory).ok


def test_blocked_rotation_keeps_writing(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    blocker = directory / rotated_file_name(1)
    with open_log(directory, max_bytes=1024) as log:
        first = append(log, range(1))
        # A file this log did not write takes the name audit.jsonl would rotate to.
        blocker.write_bytes(b"not ours\n")
        with caplog.at_level(logging.ERROR, logger=AUDIT_LOGGER):
            blocked = append(log, range(1, 20))
        oversized = (directory / CURRENT_FILE_NAME).stat().st_size
        blocker.rename(tmp_path / "moved-out.jsonl")
        after = append(log, range(20, 22))

    assert oversized > 1024
    assert len(audit_errors(caplog)) == 1
    assert "already exists and this log did not write it" in audit_errors(caplog)[0]
    assert (tmp_path / "moved-out.jsonl").read_bytes() == b"not ours\n"
    assert_written_once(directory, {**first, **blocked, **after})
    assert len(list_audit_files(directory)) == 2
    assert verify(directory).ok


def test_repeated_outside_appends_logged_once(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    with open_log(directory) as log:
        append(log, range(1))
        with caplog.at_level(logging.ERROR, logger=AUDIT_LOGGER):
            # Something else appends before each of twenty batches.
            for index in range(1, 21):
                with open(directory / CURRENT_FILE_NAME, "ab") as other:
                    other.write(b"not a record\n")
                append(log, range(index, index + 1))

    assert len(audit_errors(caplog)) == 1
    assert len(records_by_event(directory)) == 21


def test_outside_append_not_read_again(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lines only added after the log's last record leave every offset as it was,
    # so a writer that keeps appending must not make each batch read the whole file.
    reads: list[int] = []
    real_read_to_end = audit_module._read_to_end

    def counting_read_to_end(fd: int) -> bytes:
        reads.append(fd)
        return real_read_to_end(fd)

    directory = tmp_path / "audit"
    with open_log(directory) as log:
        before = append(log, range(3))
        monkeypatch.setattr(audit_module, "_read_to_end", counting_read_to_end)
        with caplog.at_level(logging.ERROR, logger=AUDIT_LOGGER):
            for index in range(3, 8):
                with open(directory / CURRENT_FILE_NAME, "ab") as other:
                    other.write(b"not a record")
                append(log, range(index, index + 1))
        assert_duplicates(log, before)

    assert reads == []
    assert len(records_by_event(directory)) == 8


def test_verify_names_missing_rotated_file(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "audit"
    with open_log(directory, max_bytes=MAX_BYTES) as log:
        receipts = append_until_rotated(log, directory)
        first_moved_seq = max(receipt.seq for receipt in receipts.values()) - 1
        (directory / CURRENT_FILE_NAME).rename(tmp_path / "moved.jsonl")
        append(log, range(len(receipts), len(receipts) + 2))

    result = verify(directory)

    assert not result.ok
    assert result.error is not None
    assert f"names {rotated_file_name(first_moved_seq)} as the file before it" in result.error.message
    assert "not in the directory" in result.error.message
