"""Tests of the tamper-evident audit log, its sink, verify, tail and CLI, on real files."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import session_authority.server._audit as audit_module
from session_authority.server._audit import (
    CHAIN_START_FILE_NAME,
    CURRENT_FILE_NAME,
    LAST_HASH_FILE_NAME,
    ZERO_HASH,
    AuditLog,
    AuditReceipt,
    AuditSink,
    AuditWriteError,
    DuplicateEvent,
    LastHash,
    audit_main,
    list_audit_files,
    read_chain_start,
    read_last_hash,
    tail,
    utc_isoformat,
    verify,
    verify_replicas,
)

from audit_support import WALL_START, SteppingWallClock

def end_fields(index: int) -> dict[str, object]:
    return {
        "fingerprint": f"{index:012x}",
        "principal": "spiffe://example.org/billing",
        "tier": "standard",
        "reason": "idle_timeout",
        "granted_at": utc_isoformat(WALL_START + index),
        "ended_at": utc_isoformat(WALL_START + index + 30.5),
        "duration_seconds": 30.5,
    }


def open_log(directory: Path, **options: object) -> AuditLog:
    options.setdefault("wall_clock", SteppingWallClock())
    return AuditLog(directory, **options)  # type: ignore[arg-type]


def write_records(directory: Path, count: int, **options: object) -> None:
    with open_log(directory, **options) as log:
        for index in range(count):
            log.append(f"end:{index:04d}", "end", end_fields(index))


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def sha256_hex(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def reencode(record: dict[str, object]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class FailingHook:
    """``before_write`` hook that raises ENOSPC for the first ``failures`` writes."""

    def __init__(self, failures: int, observe: Callable[[], None] | None = None) -> None:
        self.remaining = failures
        self.calls = 0
        self._observe = observe

    def __call__(self) -> None:
        self.calls += 1
        if self._observe is not None:
            self._observe()
        if self.remaining > 0:
            self.remaining -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------
# Format


def test_record_line_is_canonical_json(tmp_path: Path) -> None:
    with AuditLog(tmp_path, wall_clock=lambda: WALL_START) as log:
        log.append("end:aa", "end", end_fields(1))

    raw = (tmp_path / CURRENT_FILE_NAME).read_bytes()
    line = raw[:-1]
    record = json.loads(line)
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 1
    assert reencode(record) == line
    assert list(record) == sorted(record)
    assert record["v"] == 1
    assert record["seq"] == 1
    assert record["event_id"] == "end:aa"
    assert record["type"] == "end"
    assert record["time"] == "2026-12-04T21:09:57.123456+00:00"
    assert record["prev"] == ZERO_HASH
    assert record["fingerprint"] == "000000000001"
    assert record["duration_seconds"] == 30.5


def test_prev_is_hash_of_previous_line(tmp_path: Path) -> None:
    write_records(tmp_path, 3)

    lines = read_lines(tmp_path / CURRENT_FILE_NAME)
    assert json.loads(lines[1])["prev"] == sha256_hex(lines[0])
    assert json.loads(lines[2])["prev"] == sha256_hex(lines[1])


def test_append_returns_receipt_with_seq_and_hash(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        first = log.append("grant:1", "grant", {"fingerprint": "0123456789ab", "principal": "svc"})
        second = log.append("revoke:1", "revoke", {"fingerprint": "0123456789ab", "revoked_by": "admin"})
        last_hash = log.last_hash
        last_seq = log.last_seq

    lines = read_lines(tmp_path / CURRENT_FILE_NAME)
    assert first == AuditReceipt(seq=1, hash=sha256_hex(lines[0]), duplicate=False)
    assert second == AuditReceipt(seq=2, hash=sha256_hex(lines[1]), duplicate=False)
    assert last_hash == second.hash
    assert last_seq == 2


def test_utc_isoformat_has_microseconds_and_offset() -> None:
    assert utc_isoformat(WALL_START) == "2026-12-04T21:09:57.123456+00:00"
    assert utc_isoformat(0) == "1970-01-01T00:00:00.000000+00:00"


@pytest.mark.parametrize(
    ("event_id", "type", "fields", "error", "match"),
    [
        ("", "end", {}, ValueError, r"^event_id must be a non-empty string"),
        ("x" * 257, "end", {}, ValueError, r"^event_id must be at most 256 characters, got 257"),
        ("end:1", "expire", {}, ValueError, r"^type must be one of \['end', 'grant', 'revoke'\], got 'expire'$"),
        ("end:1", "rotate", {}, ValueError, r"rotate records are written by the log itself$"),
        ("end:1", "end", {"seq": 5}, ValueError, r"^field 'seq' is set by the audit log itself"),
        ("end:1", "end", {"lease_id": "abc"}, ValueError, r"^field 'lease_id' is not allowed"),
        ("end:1", "end", {"fingerprint": "ABC"}, ValueError, r"^field 'fingerprint' must be the 12 lower-case hex"),
        ("end:1", "end", {"duration_seconds": float("nan")}, ValueError, r"^audit fields must be finite numbers"),
        ("end:1", "end", {"when": object()}, TypeError, r"^audit fields must be JSON-serializable"),
        ("end:1", "end", {"duration_seconds": float("inf")}, ValueError, r"^audit fields must be finite numbers"),
        ("end:1", "end", {"principal": "svc-\ud800"}, ValueError, r"^audit fields must be finite numbers and valid text"),
        ("end:1", "end", {"svc-\ud800": "a"}, ValueError, r"^audit fields must be finite numbers and valid text"),
        ("end:1", "end", {"details": [float("nan")]}, ValueError, r"^audit fields must be finite numbers"),
        ("end:1", "end", {"details": {"when": object()}}, TypeError, r"^audit fields must be JSON-serializable"),
    ],
)
def test_append_rejects_invalid_event(
    tmp_path: Path, event_id: str, type: str, fields: dict[str, object], error: type[Exception], match: str
) -> None:
    with open_log(tmp_path) as log:
        with pytest.raises(error, match=match):
            log.append(event_id, type, fields)

        assert log.last_seq == 0
    assert (tmp_path / CURRENT_FILE_NAME).read_bytes() == b""


def test_append_writes_non_ascii_and_nested_fields(tmp_path: Path) -> None:
    fields: dict[str, object] = {
        "principal": "dienst-zürich",
        "count": 3,
        "flag": True,
        "revoked_by": None,
        "details": {"nested": [1, 2.5]},
    }

    with open_log(tmp_path) as log:
        log.append("end:1", "end", fields)

    record = json.loads(read_lines(tmp_path / CURRENT_FILE_NAME)[0])
    assert record["principal"] == "dienst-zürich"
    assert record["count"] == 3
    assert record["flag"] is True
    assert record["revoked_by"] is None
    assert record["details"] == {"nested": [1, 2.5]}


def test_fingerprint_error_does_not_echo_value(tmp_path: Path) -> None:
    raw_lease_id = "c2VjcmV0LWxlYXNlLWlkLXZhbHVl"

    with open_log(tmp_path) as log:
        with pytest.raises(ValueError) as caught:
            log.append("end:1", "end", {"fingerprint": raw_lease_id})

    assert raw_lease_id not in str(caught.value)
    assert "got a str of 28 characters" in str(caught.value)


def test_max_bytes_below_minimum_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^max_bytes must be an integer of at least 1024, got 100$"):
        AuditLog(tmp_path, max_bytes=100)


def test_second_writer_on_directory_rejected(tmp_path: Path) -> None:
    with open_log(tmp_path):
        with pytest.raises(AuditWriteError, match=r"already open for writing by another AuditLog") as caught:
            AuditLog(tmp_path)

    assert caught.value.filename == str(tmp_path / "audit.lock")


def test_append_after_close_raises(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.close()

    with pytest.raises(RuntimeError, match=r"is closed; open a new AuditLog to append$"):
        log.append("end:1", "end", {})


# --------------------------------------------------------------------------
# Verify: an intact chain and each kind of tampering


def test_chain_of_100_records_verifies(tmp_path: Path) -> None:
    write_records(tmp_path, 100)

    result = verify(tmp_path)

    assert result.ok
    assert result.error is None
    assert result.records == 100
    assert result.files == 1
    assert result.last_seq == 100
    assert result.last_hash == sha256_hex(read_lines(tmp_path / CURRENT_FILE_NAME)[-1])


def edit_principal(lines: list[bytes]) -> None:
    record = json.loads(lines[4])
    record["principal"] = "spiffe://example.org/attacker"
    lines[4] = reencode(record)


def delete_line_4(lines: list[bytes]) -> None:
    del lines[3]


def swap_lines_7_and_8(lines: list[bytes]) -> None:
    lines[6], lines[7] = lines[7], lines[6]


def insert_forged_after_line_3(lines: list[bytes]) -> None:
    forged = json.loads(lines[3])
    forged["event_id"] = "end:forged"
    forged["prev"] = sha256_hex(lines[2])
    lines.insert(3, reencode(forged))


def insert_forged_and_renumber(lines: list[bytes]) -> None:
    insert_forged_after_line_3(lines)
    for index in range(4, len(lines)):
        record = json.loads(lines[index])
        record["seq"] += 1
        lines[index] = reencode(record)


def change_version_line_10(lines: list[bytes]) -> None:
    record = json.loads(lines[9])
    record["v"] = 2
    lines[9] = reencode(record)


def break_json_line_3(lines: list[bytes]) -> None:
    lines[2] = lines[2][:-1]


def remove_time_line_2(lines: list[bytes]) -> None:
    record = json.loads(lines[1])
    del record["time"]
    lines[1] = reencode(record)


def add_space_line_6(lines: list[bytes]) -> None:
    lines[5] = lines[5].replace(b'"tier":', b'"tier": ')


@pytest.mark.parametrize(
    ("tamper", "line", "message"),
    [
        (edit_principal, 6, "prev does not match the hash of line 5 (record edited, deleted or inserted)"),
        (delete_line_4, 4, "seq 5 follows seq 3 (record deleted or reordered)"),
        (swap_lines_7_and_8, 7, "seq 8 follows seq 6 (record deleted or reordered)"),
        (insert_forged_after_line_3, 5, "seq 4 follows seq 4 (record inserted, duplicated or reordered)"),
        (insert_forged_and_renumber, 5, "prev does not match the hash of line 4 (record edited, deleted or inserted)"),
        (change_version_line_10, 10, "unknown format version 2; this verifier reads version 1"),
        (break_json_line_3, 3, "not a JSON object (record edited or corrupted)"),
        (remove_time_line_2, 2, "missing field 'time'"),
        (add_space_line_6, 6, "record is not in canonical form (sorted keys, compact separators), so it was edited"),
    ],
)
def test_tampering_detected_at_line(
    tmp_path: Path, tamper: Callable[[list[bytes]], None], line: int, message: str
) -> None:
    write_records(tmp_path, 20)
    path = tmp_path / CURRENT_FILE_NAME
    lines = read_lines(path)
    tamper(lines)
    write_lines(path, lines)

    result = verify(tmp_path)

    assert not result.ok
    assert result.error is not None
    assert result.error.path == path
    assert result.error.line == line
    assert result.error.message == message
    assert result.records == line - 1


def test_truncated_mid_line_detected(tmp_path: Path) -> None:
    write_records(tmp_path, 20)
    path = tmp_path / CURRENT_FILE_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])

    result = verify(tmp_path)

    assert result.error is not None
    assert result.error.line == 20
    assert result.error.message == "record is truncated (no newline at the end of the file)"


def test_first_record_deleted_detected(tmp_path: Path) -> None:
    write_records(tmp_path, 5)
    path = tmp_path / CURRENT_FILE_NAME
    write_lines(path, read_lines(path)[1:])

    result = verify(tmp_path)

    assert result.error is not None
    assert result.error.line == 1
    assert result.error.message == "the chain starts at seq 2, expected 1 (records or files deleted from the start)"


def edit_last_record(path: Path) -> None:
    lines = read_lines(path)
    record = json.loads(lines[-1])
    record["reason"] = "released"
    lines[-1] = reencode(record)
    write_lines(path, lines)


def test_files_last_edit_needs_expected_hash(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    path = tmp_path / CURRENT_FILE_NAME
    original_last_hash = verify(tmp_path).last_hash
    edit_last_record(path)

    without_expected = verify([path])
    with_expected = verify([path], expected_last_hash=original_last_hash)

    assert without_expected.ok
    assert not with_expected.ok
    assert with_expected.error is not None
    assert with_expected.error.line == 10
    assert with_expected.error.message.startswith("the last record's hash does not match the expected last hash")


def test_records_cut_from_files_need_expected_hash(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    path = tmp_path / CURRENT_FILE_NAME
    original_last_hash = verify(tmp_path).last_hash
    write_lines(path, read_lines(path)[:7])

    assert verify([path]).ok
    assert not verify([path], expected_last_hash=original_last_hash).ok


def test_expected_last_hash_matching_passes(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        for index in range(5):
            log.append(f"end:{index}", "end", end_fields(index))
        last_hash = log.last_hash

    assert verify(tmp_path, expected_last_hash=last_hash).ok


def test_expected_last_hash_invalid_rejected(tmp_path: Path) -> None:
    write_records(tmp_path, 1)

    with pytest.raises(ValueError, match=r"^expected_last_hash must be 64 lower-case hex characters"):
        verify(tmp_path, expected_last_hash="abc")


def test_empty_directory_fails_verify(tmp_path: Path) -> None:
    result = verify(tmp_path)

    assert not result.ok
    assert result.error is not None
    assert result.error.line == 0
    assert result.error.message.startswith("no audit files")


# --------------------------------------------------------------------------
# Rotation


def rotated_directory(tmp_path: Path, count: int = 100) -> Path:
    directory = tmp_path / "audit"
    write_records(directory, count, max_bytes=4096)
    return directory


def test_rotation_names_files_in_chain_order(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)

    files = list_audit_files(directory)
    names = [path.name for path in files]

    assert len(files) >= 4
    assert names[0] == "audit-000000000001.jsonl"
    assert names[-1] == CURRENT_FILE_NAME
    assert names[:-1] == sorted(names[:-1])
    for path in files[:-1]:
        assert path.stat().st_size <= 4096


def test_rotation_continues_chain_across_files(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)
    files = list_audit_files(directory)

    for previous, current in zip(files, files[1:]):
        first = json.loads(read_lines(current)[0])
        previous_last = read_lines(previous)[-1]
        assert first["type"] == "rotate"
        assert first["prev"] == sha256_hex(previous_last)
        assert first["seq"] == json.loads(previous_last)["seq"] + 1
        assert first["previous_file"] == previous.name
        assert first["previous_last_seq"] == json.loads(previous_last)["seq"]
        if current.name != CURRENT_FILE_NAME:
            assert current.name == f"audit-{first['seq']:012d}.jsonl"


def test_rotated_directory_verifies(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)
    files = list_audit_files(directory)

    result = verify(directory)

    assert result.ok, result.error
    assert result.files == len(files)
    assert result.records == 100 + len(files) - 1


def append_until_rotated(log: AuditLog, first_index: int) -> None:
    rotated_before = len(list_audit_files(log.directory))
    index = first_index
    while len(list_audit_files(log.directory)) == rotated_before:
        log.append(f"end:{index:04d}", "end", end_fields(index))
        index += 1


def test_verify_during_rotation_reads_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "audit"
    log = open_log(directory, max_bytes=4096)
    for index in range(40):
        log.append(f"end:{index:04d}", "end", end_fields(index))
    read_file = audit_module._verify_file
    rotations = []

    def rotate_while_reading(path: Path, first_file: bool, state: object) -> object:
        # verify has listed the files, so this rotation renames the audit.jsonl in that list.
        if not rotations:
            append_until_rotated(log, 1000)
            rotations.append(path)
        return read_file(path, first_file, state)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_module, "_verify_file", rotate_while_reading)

    with log:
        result = verify(directory)

    assert len(rotations) == 1
    assert result.ok, result.error
    assert result.last_seq == log.last_seq


def test_verify_break_in_changing_directory_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "audit"
    log = open_log(directory, max_bytes=4096)
    for index in range(40):
        log.append(f"end:{index:04d}", "end", end_fields(index))
    first_file = list_audit_files(directory)[0]
    lines = read_lines(first_file)
    del lines[3]
    write_lines(first_file, lines)
    read_file = audit_module._verify_file
    calls = []

    def append_while_reading(path: Path, first_file: bool, state: object) -> object:
        calls.append(path)
        log.append(f"end:{1000 + len(calls):04d}", "end", end_fields(len(calls)))
        return read_file(path, first_file, state)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_module, "_verify_file", append_while_reading)

    with log:
        result = verify(directory)

    assert not result.ok
    assert result.error is not None
    assert result.error.path == first_file
    assert result.error.line == 4
    assert calls.count(first_file) == audit_module.VERIFY_ATTEMPTS


def test_open_reports_deleted_newest_rotated_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = rotated_directory(tmp_path)
    newest = list_audit_files(directory)[-2]
    newest.unlink()

    with caplog.at_level(logging.ERROR, logger="session_authority.server._audit"):
        with open_log(directory) as log:
            receipt = log.append("end:after", "end", end_fields(1))

    assert f"names {newest.name} as the file before it, but {directory} has no such file" in caplog.text
    assert receipt.seq > 0
    assert not verify(directory).ok


def test_open_rotated_directory_reports_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = rotated_directory(tmp_path)

    caplog.clear()

    open_log(directory).close()

    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_verify_sorts_given_files_by_first_seq(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)
    files = list_audit_files(directory)

    result = verify(list(reversed(files)))

    assert result.ok, result.error
    assert result.files == len(files)


def test_tampering_in_older_file_detected(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)
    first_file = directory / "audit-000000000001.jsonl"
    lines = read_lines(first_file)
    record = json.loads(lines[2])
    record["reason"] = "released"
    lines[2] = reencode(record)
    write_lines(first_file, lines)

    result = verify(directory)

    assert result.error is not None
    assert result.error.path == first_file
    assert result.error.line == 4
    assert result.error.message == "prev does not match the hash of line 3 (record edited, deleted or inserted)"


def test_older_file_last_record_edit_detected(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)
    files = list_audit_files(directory)
    lines = read_lines(files[0])
    record = json.loads(lines[-1])
    record["tier"] = "relaxed"
    lines[-1] = reencode(record)
    write_lines(files[0], lines)

    result = verify(directory)

    assert result.error is not None
    assert result.error.path == files[1]
    assert result.error.line == 1
    assert result.error.message == (
        f"prev does not match the hash of line {len(lines)} of {files[0].name} (record edited, deleted or inserted)"
    )


def test_missing_middle_file_detected(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)
    files = list_audit_files(directory)
    files[1].unlink()

    result = verify(directory)

    assert result.error is not None
    assert result.error.path == files[2]
    assert result.error.line == 1
    assert "(record deleted or reordered)" in result.error.message


def test_missing_first_file_detected(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)
    files = list_audit_files(directory)
    files[0].unlink()

    result = verify(directory)

    assert result.error is not None
    assert result.error.path == files[1]
    assert result.error.line == 1
    assert result.error.message.startswith("the chain starts at seq")


def test_rotation_resumes_after_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    write_records(directory, 30, max_bytes=4096)
    with open_log(directory, max_bytes=4096) as log:
        for index in range(30, 60):
            log.append(f"end:{index:04d}", "end", end_fields(index))

    result = verify(directory)

    assert result.ok, result.error
    assert result.records == 60 + len(list_audit_files(directory)) - 1


def test_reopen_after_rotation_without_current_file(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path, count=40)
    # A crash between the rename and the creation of the new file leaves no
    # audit.jsonl, and last-hash.json still names the rotated file's last record.
    (directory / CURRENT_FILE_NAME).unlink()
    files_before = list_audit_files(directory)
    last_of_rotated = read_lines(files_before[-1])[-1]
    (directory / LAST_HASH_FILE_NAME).write_bytes(
        reencode({"v": 1, "seq": json.loads(last_of_rotated)["seq"], "hash": sha256_hex(last_of_rotated)}) + b"\n"
    )

    with open_log(directory, max_bytes=4096) as log:
        receipt = log.append("end:after-crash", "end", end_fields(99))

    first_line = json.loads(read_lines(directory / CURRENT_FILE_NAME)[0])
    assert first_line["type"] == "rotate"
    assert first_line["previous_file"] == files_before[-1].name
    assert receipt.seq == first_line["seq"] + 1
    assert verify(directory).ok


# --------------------------------------------------------------------------
# Recovery and exactly-once


def test_torn_last_line_removed_on_reopen(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_records(tmp_path, 10)
    path = tmp_path / CURRENT_FILE_NAME
    intact = path.read_bytes()
    with path.open("ab") as file:
        file.write(b'{"event_id":"end:torn","prev":"')

    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
        log = open_log(tmp_path)
    with log:
        seq_after_reopen = log.last_seq
        receipt = log.append("end:torn", "end", end_fields(10))

    assert "removed a torn last record (31 bytes)" in caplog.text
    assert seq_after_reopen == 10
    assert receipt.seq == 11
    assert path.read_bytes().startswith(intact)
    assert verify(tmp_path).ok


def test_invalid_last_line_removed_on_reopen(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    path = tmp_path / CURRENT_FILE_NAME
    intact = path.read_bytes()
    with path.open("ab") as file:
        file.write(b"\x00" * 50 + b"\n")

    with open_log(tmp_path) as log:
        seq_after_reopen = log.last_seq

    assert seq_after_reopen == 10
    assert path.read_bytes() == intact


def test_garbage_last_line_kept_on_reopen(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_records(tmp_path, 10)
    path = tmp_path / CURRENT_FILE_NAME
    with path.open("ab") as file:
        file.write(b"written by someone else\n")

    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
        log = open_log(tmp_path)
    with log:
        receipt = log.append("end:after", "end", end_fields(10))
    result = verify(tmp_path)

    assert f"audit file {path} line 11 is not a valid record" in caplog.text
    assert "removed a torn last record" not in caplog.text
    assert receipt.seq == 11
    assert read_lines(path)[10] == b"written by someone else"
    assert not result.ok
    assert result.error is not None
    assert result.error.line == 11


def test_torn_line_only_in_file_leaves_empty_log(tmp_path: Path) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    path.write_bytes(b'{"v":1,"seq":1')

    with open_log(tmp_path) as log:
        receipt = log.append("end:1", "end", end_fields(1))

    assert receipt.seq == 1
    assert json.loads(read_lines(path)[0])["prev"] == ZERO_HASH


def test_duplicate_event_id_written_once(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        original = log.append("end:abc", "end", end_fields(1))
        repeat = log.append("end:abc", "end", end_fields(1))

    assert repeat == AuditReceipt(seq=original.seq, hash=original.hash, duplicate=True)
    assert len(read_lines(tmp_path / CURRENT_FILE_NAME)) == 1


def test_duplicate_event_id_after_reopen(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        original = log.append("end:abc", "end", end_fields(1))
        log.append("end:def", "end", end_fields(2))
    before = (tmp_path / CURRENT_FILE_NAME).read_bytes()

    with open_log(tmp_path) as log:
        contained = log.contains("end:abc")
        repeat = log.append("end:abc", "end", end_fields(1))

    assert contained
    assert repeat == AuditReceipt(seq=original.seq, hash=original.hash, duplicate=True)
    assert (tmp_path / CURRENT_FILE_NAME).read_bytes() == before


def test_duplicate_in_previous_file_after_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with open_log(directory, max_bytes=4096) as log:
        original = log.append("end:early", "end", end_fields(0))
        while len(list_audit_files(directory)) < 2:
            log.append(f"end:{log.last_seq}", "end", end_fields(log.last_seq))
    assert list_audit_files(directory)[0].name == "audit-000000000001.jsonl"

    with open_log(directory, max_bytes=4096) as log:
        repeat = log.append("end:early", "end", end_fields(0))

    assert repeat.duplicate
    assert repeat.seq == original.seq


def test_contains_unknown_event_false(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append("end:abc", "end", end_fields(1))

        assert not log.contains("end:other")


# --------------------------------------------------------------------------
# Write failures


def test_failed_write_raises_with_path(tmp_path: Path) -> None:
    with open_log(tmp_path, before_write=FailingHook(1)) as log:
        with pytest.raises(AuditWriteError) as caught:
            log.append("end:1", "end", end_fields(1))

        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename == str(tmp_path / CURRENT_FILE_NAME)
        assert "failed to append to the audit log" in str(caught.value)
        assert not log.contains("end:1")
        assert log.last_seq == 0


def test_partial_write_cut_back(tmp_path: Path) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    write_records(tmp_path, 3)
    intact = path.read_bytes()

    def write_half_then_fail() -> None:
        # Another descriptor appends half a record, as a write interrupted by a full disk would.
        with path.open("ab") as file:
            file.write(b'{"event_id":"end:half","fingerprint":"0000')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with open_log(tmp_path, before_write=write_half_then_fail) as log:
        with pytest.raises(AuditWriteError):
            log.append("end:half", "end", end_fields(3))
        after_failure = path.read_bytes()

    assert after_failure == intact


def test_append_after_failed_write_continues_chain(tmp_path: Path) -> None:
    with open_log(tmp_path, before_write=FailingHook(2)) as log:
        for _ in range(2):
            with pytest.raises(AuditWriteError):
                log.append("end:1", "end", end_fields(1))
        receipt = log.append("end:1", "end", end_fields(1))
        log.append("end:2", "end", end_fields(2))

    assert receipt.seq == 1
    assert verify(tmp_path).records == 2


def test_failed_rotate_record_retried(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    current = directory / CURRENT_FILE_NAME
    failed_on_empty_file: list[int] = []

    def fail_first_write_to_new_file() -> None:
        # Right after a rotation the new file is empty and the rotate record comes next.
        rotated = len(list_audit_files(directory)) > 1
        if rotated and current.stat().st_size == 0 and len(failed_on_empty_file) < 2:
            failed_on_empty_file.append(1)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with open_log(directory, max_bytes=4096, before_write=fail_first_write_to_new_file) as log:
        index = 0
        failures = 0
        while len(list_audit_files(directory)) < 2 or len(read_lines(current)) < 3:
            try:
                log.append(f"end:{index}", "end", end_fields(index))
                index += 1
            except AuditWriteError:
                failures += 1

    first = json.loads(read_lines(current)[0])
    assert failures == 2
    assert first["type"] == "rotate"
    assert first["previous_file"] == "audit-000000000001.jsonl"
    assert verify(directory).ok


def test_stray_bytes_kept_before_append(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        log.append("end:1", "end", end_fields(1))
        with path.open("ab") as file:
            file.write(b'{"half":')

        with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
            log.append("end:2", "end", end_fields(2))

    lines = read_lines(path)
    result = verify(tmp_path)
    # The log did not write those bytes, so it keeps them and starts its next record on a new line.
    assert lines[1] == b'{"half":'
    assert json.loads(lines[2])["event_id"] == "end:2"
    assert "grew from" in caplog.text
    assert result.error is not None
    assert result.error.line == 2


def test_file_shrunk_while_open_keeps_writing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / CURRENT_FILE_NAME
    with open_log(tmp_path) as log:
        log.append("end:1", "end", end_fields(1))
        log.append("end:2", "end", end_fields(2))
        first_bytes = path.read_bytes()[:10]
        os.truncate(path, 10)

        with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
            receipt = log.append("end:3", "end", end_fields(3))

    lines = read_lines(path)
    assert receipt.seq == 3
    assert lines[0] == first_bytes
    assert json.loads(lines[1])["event_id"] == "end:3"
    assert re.search(r"audit\.jsonl shrank from \d+ to 10 bytes while open", caplog.text)
    assert not verify(tmp_path).ok


# --------------------------------------------------------------------------
# AuditSink


def test_sink_retries_until_every_record_lands_in_order(tmp_path: Path) -> None:
    healthy_seen: list[bool] = []
    sink_holder: list[AuditSink] = []

    def observe() -> None:
        if sink_holder:
            healthy_seen.append(sink_holder[0].healthy)

    hook = FailingHook(5, observe=observe)
    log = open_log(tmp_path, before_write=hook)
    sink = AuditSink(log, initial_backoff_seconds=0.001, max_backoff_seconds=0.004)
    sink_holder.append(sink)
    receipts: list[AuditReceipt] = []

    for index in range(20):
        sink.submit(f"end:{index:04d}", "end", end_fields(index), on_written=receipts.append)
    flushed = sink.flush(timeout_seconds=10)
    healthy_after = sink.healthy
    assert sink.close(timeout_seconds=5)
    log.close()

    records = [json.loads(line) for line in read_lines(tmp_path / CURRENT_FILE_NAME)]
    assert flushed
    assert [record["event_id"] for record in records] == [f"end:{index:04d}" for index in range(20)]
    assert [receipt.seq for receipt in receipts] == list(range(1, 21))
    assert hook.calls == 25
    assert False in healthy_seen
    assert healthy_after
    assert verify(tmp_path).ok


def test_sink_logs_failures_with_path_and_attempt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = open_log(tmp_path, before_write=FailingHook(12))
    sink = AuditSink(log, initial_backoff_seconds=0.001, max_backoff_seconds=0.002)

    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
        sink.submit("end:1", "end", end_fields(1))
        assert sink.flush(timeout_seconds=10)
    sink.close()
    log.close()

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "(attempt 1, 1 events pending)" in warnings[0]
    assert "(attempt 10, 1 events pending)" in warnings[1]
    assert str(tmp_path / CURRENT_FILE_NAME) in warnings[0]


def test_sink_duplicate_submission_written_once(tmp_path: Path) -> None:
    receipts: list[AuditReceipt] = []
    with open_log(tmp_path) as log:
        sink = AuditSink(log)
        sink.submit("end:1", "end", end_fields(1), on_written=receipts.append)
        sink.submit("end:1", "end", end_fields(1), on_written=receipts.append)
        assert sink.close(timeout_seconds=5)

    assert len(read_lines(tmp_path / CURRENT_FILE_NAME)) == 1
    assert [receipt.duplicate for receipt in receipts] == [False, True]


def test_sink_callback_error_does_not_stop_sink(tmp_path: Path) -> None:
    def broken_callback(receipt: AuditReceipt) -> None:
        raise RuntimeError("callback bug")

    with open_log(tmp_path) as log:
        sink = AuditSink(log)
        sink.submit("end:1", "end", end_fields(1), on_written=broken_callback)
        sink.submit("end:2", "end", end_fields(2))
        assert sink.close(timeout_seconds=5)
        last_seq = log.last_seq

    assert last_seq == 2


def test_sink_submit_after_close_raises(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        sink = AuditSink(log)
        sink.close()

        with pytest.raises(RuntimeError, match=r"^audit sink is closed"):
            sink.submit("end:1", "end", end_fields(1))


def test_sink_submit_invalid_event_raises(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        sink = AuditSink(log)

        with pytest.raises(ValueError, match=r"^field 'lease_id' is not allowed"):
            sink.submit("end:1", "end", {"lease_id": "secret"})
        assert sink.pending == 0
        sink.close()


def test_sink_close_times_out_while_disk_fails(tmp_path: Path) -> None:
    log = open_log(tmp_path, before_write=FailingHook(10**9))
    sink = AuditSink(log, initial_backoff_seconds=0.001, max_backoff_seconds=0.002)
    sink.submit("end:1", "end", end_fields(1))

    closed = sink.close(timeout_seconds=0.2)
    log.close()

    assert not closed
    assert sink.pending == 1
    assert not sink.healthy


def test_sink_rejects_invalid_backoff(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        with pytest.raises(ValueError, match=r"^max_backoff_seconds must be at least initial_backoff_seconds"):
            AuditSink(log, initial_backoff_seconds=1.0, max_backoff_seconds=0.5)


class HeldFirstWrite:
    """``before_write`` hook that keeps the first write waiting until ``release`` is set.

    It notes the file size at each call. Every call of one write finds the
    same file size, so the distinct sizes count the writes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self) -> None:
        self.sizes.append(self.path.stat().st_size)
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(timeout=10)


def test_sink_writes_queued_records_in_one_write(tmp_path: Path) -> None:
    hook = HeldFirstWrite(tmp_path / CURRENT_FILE_NAME)
    log = open_log(tmp_path, before_write=hook)
    sink = AuditSink(log)
    receipts: list[AuditReceipt] = []

    sink.submit("end:0000", "end", end_fields(0), on_written=receipts.append)
    assert hook.entered.wait(timeout=10)
    for index in range(1, 50):
        sink.submit(f"end:{index:04d}", "end", end_fields(index), on_written=receipts.append)
    hook.release.set()
    assert sink.close(timeout_seconds=10)
    log.close()

    assert len(hook.sizes) == 50
    assert len(set(hook.sizes)) == 2
    assert [receipt.seq for receipt in receipts] == list(range(1, 51))
    assert verify(tmp_path).ok


def test_sink_batch_across_rotation_once(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    hook = HeldFirstWrite(directory / CURRENT_FILE_NAME)
    log = open_log(directory, max_bytes=4096, before_write=hook)
    sink = AuditSink(log)
    receipts: list[AuditReceipt] = []

    sink.submit("end:0000", "end", end_fields(0), on_written=receipts.append)
    assert hook.entered.wait(timeout=10)
    for index in range(1, 100):
        sink.submit(f"end:{index:04d}", "end", end_fields(index), on_written=receipts.append)
    hook.release.set()
    assert sink.close(timeout_seconds=10)
    log.close()

    files = list_audit_files(directory)
    end_ids = [
        record["event_id"]
        for path in files
        for record in (json.loads(line) for line in read_lines(path))
        if record["type"] == "end"
    ]
    assert len(files) > 2
    assert end_ids == [f"end:{index:04d}" for index in range(100)]
    assert [receipt.duplicate for receipt in receipts] == [False] * 100
    assert verify(directory).ok


def test_sink_drops_only_unencodable_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hook = HeldFirstWrite(tmp_path / CURRENT_FILE_NAME)
    log = open_log(tmp_path, before_write=hook)
    sink = AuditSink(log)
    tags: list[object] = []

    sink.submit("end:0", "end", end_fields(0))
    assert hook.entered.wait(timeout=10)
    sink.submit("end:1", "end", end_fields(1))
    sink.submit("end:2", "end", {**end_fields(2), "tags": tags})
    sink.submit("end:3", "end", end_fields(3))
    # The sink copies the fields but not the list in them, so this reaches the writer.
    tags.append(object())
    with caplog.at_level(logging.ERROR, logger="session_authority.server._audit"):
        hook.release.set()
        assert sink.close(timeout_seconds=10)
    log.close()

    written = [json.loads(line)["event_id"] for line in read_lines(tmp_path / CURRENT_FILE_NAME)]
    assert written == ["end:0", "end:1", "end:3"]
    assert "dropping audit event end:2" in caplog.text


# --------------------------------------------------------------------------
# Concurrency


def test_concurrent_appends_keep_chain(tmp_path: Path) -> None:
    log = open_log(tmp_path, max_bytes=64 * 1024)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def append_many(worker: int) -> None:
        try:
            barrier.wait()
            for index in range(200):
                log.append(f"end:{worker}:{index}", "end", end_fields(index))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append_many, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    log.close()

    files = list_audit_files(tmp_path)
    result = verify(tmp_path)
    event_ids = {
        record["event_id"]
        for path in files
        for record in (json.loads(line) for line in read_lines(path))
        if record["type"] == "end"
    }
    assert errors == []
    assert result.ok, result.error
    assert result.records == 1600 + len(files) - 1
    assert len(event_ids) == 1600


# --------------------------------------------------------------------------
# Tail


def test_tail_directory_yields_all_records_in_order(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path, count=50)

    records = list(tail(directory, follow=False))

    seqs = [record["seq"] for record in records]
    assert seqs == list(range(1, len(seqs) + 1))
    assert sum(1 for record in records if record["type"] == "end") == 50


def test_tail_skips_torn_last_line(tmp_path: Path) -> None:
    write_records(tmp_path, 3)
    with (tmp_path / CURRENT_FILE_NAME).open("ab") as file:
        file.write(b'{"v":1')

    records = list(tail(tmp_path / CURRENT_FILE_NAME, follow=False))

    assert [record["seq"] for record in records] == [1, 2, 3]


def test_tail_reads_long_line_whole(tmp_path: Path) -> None:
    # The line takes 64 reads of 64 KiB and must come back whole.
    path = tmp_path / CURRENT_FILE_NAME
    note = "x" * (4 << 20)
    path.write_bytes(b'{"note":"' + note.encode() + b'"}\n{"seq":1}\n')

    records = list(tail(path, follow=False))

    assert [record.get("seq") for record in records] == [None, 1]
    assert records[0]["note"] == note


def test_tail_follow_crosses_rotation(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    log = open_log(directory, max_bytes=4096)
    for index in range(5):
        log.append(f"end:{index}", "end", end_fields(index))
    stop = threading.Event()
    seen: list[dict[str, object]] = []

    def follow() -> None:
        for record in tail(directory, follow=True, poll_seconds=0.005, stop=stop):
            seen.append(record)

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        for index in range(5, 80):
            log.append(f"end:{index}", "end", end_fields(index))
        expected = log.last_seq
        deadline = time.monotonic() + 10
        while len(seen) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        follower.join(timeout=5)
        log.close()

    assert len(list_audit_files(directory)) >= 3
    assert [record["seq"] for record in seen] == list(range(1, expected + 1))
    assert not follower.is_alive()


# --------------------------------------------------------------------------
# CLI


def test_cli_verify_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = rotated_directory(tmp_path, count=30)
    files = list_audit_files(directory)

    code = audit_main(["verify", str(directory)])

    assert code == 0
    assert capsys.readouterr().out == (
        f"OK: {30 + len(files) - 1} records in {len(files)} files, chain verified,"
        " last record matches last-hash.json\n"
    )


def test_cli_verify_fail_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 10)
    path = tmp_path / CURRENT_FILE_NAME
    lines = read_lines(path)
    del lines[6]
    write_lines(path, lines)

    code = audit_main(["verify", str(tmp_path)])

    assert code == 1
    assert capsys.readouterr().out == f"FAIL: {path} line 7: seq 8 follows seq 6 (record deleted or reordered)\n"


def test_cli_verify_data_directory_hints_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path / "audit", 3)

    code = audit_main(["verify", str(tmp_path)])

    assert code == 1
    assert capsys.readouterr().out == (
        f"FAIL: {tmp_path}: no audit files (audit.jsonl or audit-<seq>.jsonl) in this directory;"
        f" an authority's data directory keeps its audit log in audit/, so give {tmp_path / 'audit'}\n"
    )


@pytest.mark.parametrize("follow", [False, True])
def test_cli_tail_data_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], follow: bool) -> None:
    write_records(tmp_path / "audit", 3)

    code = audit_main(["tail", str(tmp_path), *(["--follow"] if follow else [])])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err == (
        f"session-authority audit tail: error: {tmp_path}: no audit files (audit.jsonl or audit-<seq>.jsonl) in this"
        f" directory; an authority's data directory keeps its audit log in audit/, so give {tmp_path / 'audit'}\n"
    )


def test_cli_tail_empty_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = audit_main(["tail", str(tmp_path)])

    assert code == 2
    assert "no audit files (audit.jsonl or audit-<seq>.jsonl) in this directory\n" in capsys.readouterr().err


def test_cli_verify_expected_last_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 3)

    code = audit_main(["verify", str(tmp_path), "--expected-last-hash", "a" * 64])

    assert code == 1
    assert "does not match the expected last hash" in capsys.readouterr().out


def test_cli_verify_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 3)

    code = audit_main(["verify", "--json", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out)

    assert code == 0
    assert summary["ok"] is True
    assert summary["records"] == 3
    assert summary["files"] == 1
    assert summary["error"] is None
    assert summary["last_hash"] == sha256_hex(read_lines(tmp_path / CURRENT_FILE_NAME)[-1])


def test_cli_verify_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = audit_main(["verify", str(tmp_path / "absent")])

    assert code == 2
    assert capsys.readouterr().err.endswith("absent: no such file or directory\n")


def test_cli_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = audit_main(["frobnicate"])

    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("session-authority audit: error: argument COMMAND: invalid choice: 'frobnicate'")
    assert error.endswith(" (see 'session-authority audit --help')\n")
    assert len(error.splitlines()) == 1


def test_cli_tail_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 2)

    code = audit_main(["tail", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()

    assert code == 0
    assert lines[0].split() == ["SEQ", "TIME", "TYPE", "FINGERPRINT", "DETAILS"]
    assert len(lines) == 3
    assert lines[1].split()[:4] == ["1", "2026-12-04T21:09:57.124456+00:00", "end", "000000000000"]
    assert "principal=spiffe://example.org/billing" in lines[1]
    assert "reason=idle_timeout" in lines[1]


def test_cli_tail_json_prints_record_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 2)

    code = audit_main(["tail", "--json", str(tmp_path)])

    assert code == 0
    assert capsys.readouterr().out.encode() == (tmp_path / CURRENT_FILE_NAME).read_bytes()


def test_cli_verify_as_subprocess(tmp_path: Path) -> None:
    write_records(tmp_path, 5)
    command = [sys.executable, "-m", "session_authority.server._audit", "verify", str(tmp_path)]

    intact = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    lines = read_lines(tmp_path / CURRENT_FILE_NAME)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(tmp_path / CURRENT_FILE_NAME, lines)
    tampered = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    assert intact.returncode == 0
    assert intact.stdout == "OK: 5 records in 1 file, chain verified, last record matches last-hash.json\n"
    assert tampered.returncode == 1
    assert tampered.stdout.startswith("FAIL: ")
    assert tampered.stdout.endswith("line 2: seq 3 follows seq 1 (record deleted or reordered)\n")


# --------------------------------------------------------------------------
# last-hash.json: records cut from the end


def cut_last_records(path: Path, count: int) -> None:
    write_lines(path, read_lines(path)[:-count])


def test_last_hash_file_names_last_record(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        for index in range(5):
            log.append(f"end:{index}", "end", end_fields(index))
        last_seq, last_hash = log.last_seq, log.last_hash

    assert read_last_hash(tmp_path) == LastHash(seq=last_seq, hash=last_hash)
    assert json.loads((tmp_path / LAST_HASH_FILE_NAME).read_bytes()) == {"v": 1, "seq": 5, "hash": last_hash}


def test_records_cut_from_end_detected(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    cut_last_records(tmp_path / CURRENT_FILE_NAME, 3)

    result = verify(tmp_path)

    assert not result.ok
    assert result.error is not None
    assert result.error.path == tmp_path / CURRENT_FILE_NAME
    assert result.error.line == 0
    assert result.error.message == (
        "records were removed from the end: the log ends at seq 7, but last-hash.json records seq 10 as written"
    )
    assert result.records == 7
    assert result.last_hash_file_seq == 10


def test_last_record_edit_detected(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    edit_last_record(tmp_path / CURRENT_FILE_NAME)

    result = verify(tmp_path)

    assert not result.ok
    assert result.error is not None
    assert result.error.line == 10
    assert result.error.message == (
        "the hash of seq 10 does not match the hash in last-hash.json"
        " (record edited, or the records at the end replaced)"
    )


def test_current_file_removed_after_rotation_detected(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)
    (directory / CURRENT_FILE_NAME).unlink()

    result = verify(directory)

    assert not result.ok
    assert result.error is not None
    assert result.error.message.startswith("records were removed from the end: the log ends at seq ")


def test_rotated_log_matches_last_hash_file(tmp_path: Path) -> None:
    directory = rotated_directory(tmp_path)

    result = verify(directory)

    assert result.ok, result.error
    assert result.last_hash_file_seq == result.last_seq


def test_log_ahead_of_last_hash_file_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A crash between a durable write and the replacement of last-hash.json
    # leaves the file naming an earlier record.
    write_records(tmp_path, 10)
    earlier = (tmp_path / LAST_HASH_FILE_NAME).read_bytes()
    with open_log(tmp_path) as log:
        log.append("end:late-1", "end", end_fields(10))
        log.append("end:late-2", "end", end_fields(11))
    (tmp_path / LAST_HASH_FILE_NAME).write_bytes(earlier)

    result = verify(tmp_path)
    code = audit_main(["verify", str(tmp_path)])

    assert result.ok, result.error
    assert result.last_seq == 12
    assert result.last_hash_file_seq == 10
    assert code == 0
    assert capsys.readouterr().out == (
        "OK: 12 records in 1 file, chain verified, seq 10 matches last-hash.json (written before the last 2)\n"
    )


def test_expected_hash_overrides_last_hash_file(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    path = tmp_path / CURRENT_FILE_NAME
    cut_last_records(path, 3)
    hash_after_cut = sha256_hex(read_lines(path)[-1])

    result = verify(tmp_path, expected_last_hash=hash_after_cut)

    assert result.ok, result.error
    assert result.last_hash_file_seq is None


def test_log_without_last_hash_file_verifies(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    (tmp_path / LAST_HASH_FILE_NAME).unlink()

    result = verify(tmp_path)

    assert result.ok, result.error
    assert result.last_hash_file_seq is None


def test_invalid_last_hash_file_fails_verify(tmp_path: Path) -> None:
    write_records(tmp_path, 3)
    (tmp_path / LAST_HASH_FILE_NAME).write_bytes(b'{"v":1,"seq":3,"hash":"abc"}\n')

    result = verify(tmp_path)

    assert not result.ok
    assert result.error is not None
    assert result.error.path == tmp_path / LAST_HASH_FILE_NAME
    assert result.error.message == "invalid last-hash file: hash must be 64 lower-case hex characters, got 'abc'"


def test_cli_verify_cut_records_as_subprocess(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    cut_last_records(tmp_path / CURRENT_FILE_NAME, 2)
    command = [sys.executable, "-m", "session_authority.server._audit", "verify", str(tmp_path)]

    finished = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    assert finished.returncode == 1
    assert finished.stdout == (
        f"FAIL: {tmp_path / CURRENT_FILE_NAME}: records were removed from the end: the log ends at seq 8,"
        " but last-hash.json records seq 10 as written\n"
    )


def test_cli_expected_hash_overrides_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 10)
    path = tmp_path / CURRENT_FILE_NAME
    cut_last_records(path, 2)

    code = audit_main(["verify", str(tmp_path), "--expected-last-hash", sha256_hex(read_lines(path)[-1])])

    assert code == 0
    assert capsys.readouterr().out == "OK: 8 records in 1 file, chain verified\n"


def test_reopen_after_records_cut_rejected(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    path = tmp_path / CURRENT_FILE_NAME
    cut_last_records(path, 3)
    after_cut = path.read_bytes()

    with pytest.raises(AuditWriteError) as caught:
        open_log(tmp_path)
    assert str(caught.value) == (
        f"records were removed from the end of the audit log in {tmp_path}: it ends at seq 7, but last-hash.json"
        f" records seq 10 as written. If audit.jsonl or a rotated file was moved out of the directory, move it"
        f" back and start again. Otherwise run 'session-authority audit verify {tmp_path}', keep the directory"
        f" {tmp_path} as evidence and move it aside (rename it), then start again to begin a new chain in its place"
    )
    assert caught.value.filename == str(tmp_path)
    assert path.read_bytes() == after_cut
    assert read_last_hash(tmp_path) is not None
    assert read_last_hash(tmp_path).seq == 10  # type: ignore[union-attr]


def test_reopen_after_last_record_edit_rejected(tmp_path: Path) -> None:
    write_records(tmp_path, 10)
    edit_last_record(tmp_path / CURRENT_FILE_NAME)

    with pytest.raises(AuditWriteError, match=r"^audit record seq 10 in .* does not have the hash that last-hash\.json"):
        open_log(tmp_path)


def test_reopen_with_invalid_last_hash_file_rejected(tmp_path: Path) -> None:
    write_records(tmp_path, 3)
    (tmp_path / LAST_HASH_FILE_NAME).write_bytes(b"garbage\n")

    with pytest.raises(AuditWriteError, match=r"^cannot check the end of the audit log in .*: .*not a JSON object"):
        open_log(tmp_path)


def test_open_close_keeps_last_hash_missing(tmp_path: Path) -> None:
    write_records(tmp_path, 4)
    (tmp_path / LAST_HASH_FILE_NAME).unlink()

    open_log(tmp_path).close()

    assert not (tmp_path / LAST_HASH_FILE_NAME).exists()
    assert not (tmp_path / (LAST_HASH_FILE_NAME + ".tmp")).exists()
    assert not verify(tmp_path, require_last_hash_file=True).ok


def test_first_append_writes_missing_last_hash(tmp_path: Path) -> None:
    write_records(tmp_path, 4)
    (tmp_path / LAST_HASH_FILE_NAME).unlink()

    with open_log(tmp_path) as log:
        log.append("end:5", "end", end_fields(5))
        last_hash = log.last_hash

    assert read_last_hash(tmp_path) == LastHash(seq=5, hash=last_hash)


def test_open_keeps_stale_last_hash(tmp_path: Path) -> None:
    write_records(tmp_path, 4)
    earlier = (tmp_path / LAST_HASH_FILE_NAME).read_bytes()
    with open_log(tmp_path) as log:
        log.append("end:5", "end", end_fields(5))
    # A crash between a write and the replacement of last-hash.json.
    (tmp_path / LAST_HASH_FILE_NAME).write_bytes(earlier)

    open_log(tmp_path).close()

    assert (tmp_path / LAST_HASH_FILE_NAME).read_bytes() == earlier


def test_failed_replacement_removes_temporary(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append("end:1", "end", end_fields(1))
        # A directory in place of last-hash.json makes the rename fail after the temporary file is written.
        (tmp_path / LAST_HASH_FILE_NAME).unlink()
        (tmp_path / LAST_HASH_FILE_NAME).mkdir()
        log.append("end:2", "end", end_fields(2))

    assert not (tmp_path / (LAST_HASH_FILE_NAME + ".tmp")).exists()


def test_last_hash_file_failure_keeps_appending(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / (LAST_HASH_FILE_NAME + ".tmp")
    with open_log(tmp_path) as log:
        log.append("end:1", "end", end_fields(1))
        # A directory where the temporary file goes makes every replacement fail.
        blocker.mkdir()
        with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
            receipt = log.append("end:2", "end", end_fields(2))
        stale = read_last_hash(tmp_path)
        blocker.rmdir()
        log.append("end:3", "end", end_fields(3))
        last_hash = log.last_hash

    assert receipt.seq == 2
    assert "failed to replace" in caplog.text
    assert "it still names seq 1 while the log is at seq 2" in caplog.text
    assert stale is not None
    assert stale.seq == 1
    assert read_last_hash(tmp_path) == LastHash(seq=3, hash=last_hash)


def test_open_warns_missing_last_hash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_records(tmp_path, 4)
    (tmp_path / LAST_HASH_FILE_NAME).unlink()

    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
        open_log(tmp_path).close()

    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert caplog.records[0].getMessage().startswith(
        f"audit log {tmp_path} has records up to seq 4 but no last-hash.json"
    )


def test_open_new_directory_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
        open_log(tmp_path / "audit").close()

    assert caplog.records == []


def test_open_last_hash_directory_rejected(tmp_path: Path) -> None:
    write_records(tmp_path, 2)
    last_hash = tmp_path / LAST_HASH_FILE_NAME
    last_hash.unlink()
    last_hash.mkdir()

    with pytest.raises(AuditWriteError) as caught:
        open_log(tmp_path)

    assert str(caught.value) == (
        f"cannot check the end of the audit log in {tmp_path}: {last_hash} is a directory, but it must be the file"
        f" that stores the seq and hash of the last record. Move that directory out of {tmp_path}, run"
        f" 'session-authority audit verify {tmp_path}', and start again"
    )
    assert caught.value.errno == errno.EISDIR
    assert caught.value.filename == str(last_hash)


def test_write_error_no_errno_prefix(tmp_path: Path) -> None:
    with open_log(tmp_path):
        with pytest.raises(AuditWriteError) as caught:
            open_log(tmp_path)

    assert not str(caught.value).startswith("[Errno")
    assert str(caught.value).startswith(f"the audit directory {tmp_path} is already open for writing")


def test_verify_notes_missing_last_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 3)
    (tmp_path / LAST_HASH_FILE_NAME).unlink()

    code = audit_main(["verify", str(tmp_path)])

    assert code == 0
    assert capsys.readouterr().out == (
        "OK: 3 records in 1 file, chain verified, but the end of the log was not checked because last-hash.json"
        " is missing, so records cut from the end would go unnoticed (--strict makes this a failure)\n"
    )


def test_verify_flags_missing_last_hash(tmp_path: Path) -> None:
    write_records(tmp_path, 3)
    (tmp_path / LAST_HASH_FILE_NAME).unlink()

    result = verify(tmp_path)

    assert result.ok
    assert result.last_hash_file_missing
    assert result.last_hash_file_seq is None


def test_verify_strict_missing_last_hash_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 3)
    (tmp_path / LAST_HASH_FILE_NAME).unlink()

    code = audit_main(["verify", "--strict", str(tmp_path)])

    assert code == 1
    assert capsys.readouterr().out == (
        f"FAIL: {tmp_path / LAST_HASH_FILE_NAME}: missing, although the log has 3 records, so records cut from its"
        " end cannot be detected (the file was deleted, or an older version wrote the log)\n"
    )


def test_verify_strict_passes_empty_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    open_log(tmp_path).close()

    code = audit_main(["verify", "--strict", str(tmp_path)])

    assert code == 0
    assert capsys.readouterr().out == "OK: 0 records in 1 file, chain verified\n"


def test_verify_strict_files_need_expected_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 2)

    code = audit_main(["verify", "--strict", str(tmp_path / CURRENT_FILE_NAME)])

    assert code == 2
    assert capsys.readouterr().err.startswith(
        "session-authority audit verify: error: --strict with audit files needs --expected-last-hash"
    )


# --------------------------------------------------------------------------
# Chain start


def test_chain_start_written_for_new_log(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        started = log.chain_start_time(1234.5)

    assert started == 1234.5
    assert read_chain_start(tmp_path) == 1234.5


def test_chain_start_kept_across_reopen(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.chain_start_time(1234.5)
        log.append("end:1", "end", end_fields(1))

    with open_log(tmp_path) as log:
        started = log.chain_start_time(9999.0)

    assert started == 1234.5


def test_chain_start_kept_for_empty_reopen(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.chain_start_time(1234.5)

    with open_log(tmp_path) as log:
        started = log.chain_start_time(9999.0)

    assert started == 1234.5


def test_chain_start_unknown_for_log_with_records(tmp_path: Path) -> None:
    write_records(tmp_path, 2)

    with open_log(tmp_path) as log:
        started = log.chain_start_time(1234.5)

    assert started is None
    assert not (tmp_path / CHAIN_START_FILE_NAME).exists()


def test_chain_start_invalid_file_rejected(tmp_path: Path) -> None:
    (tmp_path / CHAIN_START_FILE_NAME).write_bytes(b'{"authority_time":"soon","v":1}\n')

    with open_log(tmp_path) as log:
        with pytest.raises(AuditWriteError, match=r"^cannot tell when the audit chain in .* started: .*authority_time must be a number"):
            log.chain_start_time(1234.5)


# --------------------------------------------------------------------------
# Several replica directories


def write_events(directory: Path, event_ids: list[str]) -> None:
    with open_log(directory) as log:
        for index, event_id in enumerate(event_ids):
            type = event_id.split(":", 1)[0]
            log.append(event_id, type, end_fields(index))


def test_replicas_with_distinct_ends_verify(tmp_path: Path) -> None:
    write_events(tmp_path / "a", ["grant:1", "end:1"])
    write_events(tmp_path / "b", ["grant:2", "end:2"])

    result = verify_replicas([tmp_path / "a", tmp_path / "b"])

    assert result.ok
    assert [path for path, _ in result.results] == [tmp_path / "a", tmp_path / "b"]
    assert [each.records for _, each in result.results] == [2, 2]
    assert result.duplicates == ()


def test_replicas_end_in_two_directories_reported(tmp_path: Path) -> None:
    write_events(tmp_path / "a", ["grant:1", "end:1", "end:shared"])
    write_events(tmp_path / "b", ["grant:2", "end:2", "end:shared"])

    result = verify_replicas([tmp_path / "a", tmp_path / "b"])

    assert not result.ok
    assert all(each.ok for _, each in result.results)
    assert result.duplicates == (
        DuplicateEvent(
            "end:shared", "end", tmp_path / "a" / CURRENT_FILE_NAME, 3, tmp_path / "b" / CURRENT_FILE_NAME, 3
        ),
    )


def test_replicas_duplicate_grant_revoke_reported(tmp_path: Path) -> None:
    write_events(tmp_path / "a", ["grant:shared", "revoke:shared", "end:1"])
    write_events(tmp_path / "b", ["end:2", "grant:shared", "revoke:shared"])
    a_file = tmp_path / "a" / CURRENT_FILE_NAME
    b_file = tmp_path / "b" / CURRENT_FILE_NAME

    result = verify_replicas([tmp_path / "a", tmp_path / "b"])

    assert not result.ok
    assert result.duplicates == (
        DuplicateEvent("grant:shared", "grant", a_file, 1, b_file, 2),
        DuplicateEvent("revoke:shared", "revoke", a_file, 2, b_file, 3),
    )
    assert result.duplicate_ends == ()


def test_cli_verify_replicas_prints_grant_duplicate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_events(tmp_path / "a", ["grant:shared"])
    write_events(tmp_path / "b", ["grant:shared"])

    code = audit_main(["verify", str(tmp_path / "a"), str(tmp_path / "b")])
    lines = capsys.readouterr().out.splitlines()

    assert code == 1
    assert lines[2] == (
        f"DUPLICATE: grant event grant:shared is recorded twice: {tmp_path / 'a' / CURRENT_FILE_NAME} line 1"
        f" and {tmp_path / 'b' / CURRENT_FILE_NAME} line 1"
    )
    assert lines[3] == "FAIL: 0 of 2 chains broken, 1 event recorded in more than one directory"


def test_replicas_broken_chain_reported_per_directory(tmp_path: Path) -> None:
    write_events(tmp_path / "a", ["end:1", "end:2"])
    write_events(tmp_path / "b", ["end:3", "end:4", "end:5"])
    cut_last_records(tmp_path / "b" / CURRENT_FILE_NAME, 1)

    result = verify_replicas([tmp_path / "a", tmp_path / "b"])

    assert not result.ok
    assert result.results[0][1].ok
    assert not result.results[1][1].ok
    assert result.results[1][1].error is not None
    assert result.results[1][1].error.message.startswith("records were removed from the end")


def test_replicas_same_directory_twice_rejected(tmp_path: Path) -> None:
    write_events(tmp_path / "a", ["end:1"])

    with pytest.raises(ValueError, match=r"are the same directory; pass each replica's directory once$"):
        verify_replicas([tmp_path / "a", tmp_path / "." / "a"])


def test_cli_verify_replicas_prints_duplicate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_events(tmp_path / "a", ["end:1", "end:shared"])
    write_events(tmp_path / "b", ["end:shared"])

    code = audit_main(["verify", str(tmp_path / "a"), str(tmp_path / "b")])
    lines = capsys.readouterr().out.splitlines()

    assert code == 1
    assert lines == [
        f"{tmp_path / 'a'}: OK: 2 records in 1 file, chain verified, last record matches last-hash.json",
        f"{tmp_path / 'b'}: OK: 1 record in 1 file, chain verified, last record matches last-hash.json",
        f"DUPLICATE: end event end:shared is recorded twice: {tmp_path / 'a' / CURRENT_FILE_NAME} line 2"
        f" and {tmp_path / 'b' / CURRENT_FILE_NAME} line 1",
        "FAIL: 0 of 2 chains broken, 1 event recorded in more than one directory",
    ]


def test_cli_verify_replicas_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_events(tmp_path / "a", ["end:1"])
    write_events(tmp_path / "b", ["end:2"])
    write_events(tmp_path / "c", ["end:3"])

    code = audit_main(["verify", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")])
    lines = capsys.readouterr().out.splitlines()

    assert code == 0
    assert lines[-1] == "OK: 3 directories verified, and no grant, revoke or end event is recorded in more than one"


def test_cli_verify_replicas_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_events(tmp_path / "a", ["end:shared"])
    write_events(tmp_path / "b", ["end:shared"])

    code = audit_main(["verify", "--json", str(tmp_path / "a"), str(tmp_path / "b")])
    summary = json.loads(capsys.readouterr().out)

    assert code == 1
    assert summary["ok"] is False
    assert [directory["path"] for directory in summary["directories"]] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert summary["duplicates"] == [
        {
            "event_id": "end:shared",
            "type": "end",
            "first": {"path": str(tmp_path / "a" / CURRENT_FILE_NAME), "line": 1},
            "second": {"path": str(tmp_path / "b" / CURRENT_FILE_NAME), "line": 1},
        }
    ]


def test_cli_verify_directory_and_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_events(tmp_path / "a", ["end:1"])
    write_events(tmp_path / "b", ["end:2"])

    code = audit_main(["verify", str(tmp_path / "a"), str(tmp_path / "b" / CURRENT_FILE_NAME)])

    assert code == 2
    assert capsys.readouterr().err == (
        f"session-authority audit verify: error: {tmp_path / 'a'} is a directory but"
        f" {tmp_path / 'b' / CURRENT_FILE_NAME} is not; pass one directory, audit files,"
        " or only directories (one per replica)\n"
    )


def test_cli_replicas_expected_hash_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_events(tmp_path / "a", ["end:1"])
    write_events(tmp_path / "b", ["end:2"])

    code = audit_main(["verify", str(tmp_path / "a"), str(tmp_path / "b"), "--expected-last-hash", "a" * 64])

    assert code == 2
    assert "--expected-last-hash checks one log; pass a single directory with it" in capsys.readouterr().err


def test_chain_start_stored_in_last_hash(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.chain_start_time(1234.5)
        log.append("end:1", "end", end_fields(1))

    stored = read_last_hash(tmp_path)
    assert stored is not None
    assert stored.chain_start_time == 1234.5


def test_deleted_chain_start_uses_last_hash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open_log(tmp_path) as log:
        log.chain_start_time(1234.5)
        log.append("end:1", "end", end_fields(1))
    (tmp_path / CHAIN_START_FILE_NAME).unlink()

    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
        with open_log(tmp_path) as log:
            started = log.chain_start_time(9999.0)

    assert started == 1234.5
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert caplog.records[0].getMessage().startswith(
        f"{tmp_path / CHAIN_START_FILE_NAME} is missing, but last-hash.json records that the audit chain in"
        f" {tmp_path} started at authority time 1234.500000, so the file was deleted"
    )
    assert not (tmp_path / CHAIN_START_FILE_NAME).exists()


def test_deleted_chain_start_time_kept(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.chain_start_time(1234.5)
        log.append("end:1", "end", end_fields(1))
    (tmp_path / CHAIN_START_FILE_NAME).unlink()

    with open_log(tmp_path) as log:
        log.chain_start_time(9999.0)
        log.append("end:2", "end", end_fields(2))

    stored = read_last_hash(tmp_path)
    assert stored is not None
    assert stored.chain_start_time == 1234.5


def test_last_hash_invalid_chain_start_rejected(tmp_path: Path) -> None:
    write_records(tmp_path, 1)
    stored = read_last_hash(tmp_path)
    assert stored is not None
    (tmp_path / LAST_HASH_FILE_NAME).write_bytes(
        reencode({"v": 1, "seq": 1, "hash": stored.hash, "chain_start_time": "soon"}) + b"\n"
    )

    expected = f"{tmp_path / LAST_HASH_FILE_NAME}: chain_start_time must be a number of seconds, got 'soon'"
    with pytest.raises(ValueError) as caught:
        read_last_hash(tmp_path)

    assert str(caught.value) == expected


# --------------------------------------------------------------------------
# verify and chain-start.json


def test_verify_invalid_chain_start_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 3)
    (tmp_path / CHAIN_START_FILE_NAME).write_bytes(b"garbage\n")

    code = audit_main(["verify", str(tmp_path)])

    assert code == 0
    assert capsys.readouterr().out == (
        "OK: 3 records in 1 file, chain verified, last record matches last-hash.json\n"
        f"WARNING: {tmp_path / CHAIN_START_FILE_NAME}: invalid chain-start file: not a JSON object, so it was edited"
        " or corrupted (--strict makes this a failure)\n"
    )


def test_verify_strict_invalid_chain_start_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 3)
    (tmp_path / CHAIN_START_FILE_NAME).write_bytes(b'{"authority_time":"soon","v":1}\n')

    code = audit_main(["verify", "--strict", str(tmp_path)])

    assert code == 1
    assert capsys.readouterr().out == (
        f"FAIL: {tmp_path / CHAIN_START_FILE_NAME}: invalid chain-start file: authority_time must be a number of"
        " seconds, got 'soon'\n"
    )


def test_verify_strict_chain_start_directory_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 3)
    (tmp_path / CHAIN_START_FILE_NAME).mkdir()

    code = audit_main(["verify", "--strict", str(tmp_path)])

    assert code == 1
    assert capsys.readouterr().out == (
        f"FAIL: {tmp_path / CHAIN_START_FILE_NAME}: cannot read the file: Is a directory\n"
    )


def test_verify_strict_deleted_chain_start_fails(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.chain_start_time(1234.5)
        log.append("end:1", "end", end_fields(1))
    (tmp_path / CHAIN_START_FILE_NAME).unlink()

    result = verify(tmp_path, require_valid_chain_start=True)

    assert not result.ok
    assert result.error == result.chain_start_error
    assert str(result.error) == (
        f"{tmp_path / CHAIN_START_FILE_NAME}: missing, although last-hash.json records that the chain started at"
        " authority time 1234.500000 (the file was deleted)"
    )


def test_verify_valid_chain_start_no_error(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.chain_start_time(1234.5)
        log.append("end:1", "end", end_fields(1))

    result = verify(tmp_path, require_valid_chain_start=True)

    assert result.ok
    assert result.chain_start_error is None


def test_verify_json_lists_chain_start_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, 2)
    (tmp_path / CHAIN_START_FILE_NAME).write_bytes(b"garbage\n")

    code = audit_main(["verify", "--json", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out)

    assert code == 0
    assert summary["ok"] is True
    assert summary["chain_start_error"] == (
        f"{tmp_path / CHAIN_START_FILE_NAME}: invalid chain-start file: not a JSON object, so it was edited or"
        " corrupted"
    )
