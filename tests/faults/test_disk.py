"""A full or read-only data directory: grants fail cleanly and nothing already stored is damaged.

The data directory lives on a small tmpfs that each test mounts and unmounts
itself, so the filesystem limits are real: the disk fills up by writing a
filler file until ``ENOSPC``, and "read-only" is ``mount -o remount,ro``.
Mounting needs root (or ``CAP_SYS_ADMIN``); where the sandbox does not
allow the mount, the tests skip with the reason. CI runs as root, so there they run.

Linux refuses to remount a filesystem read-only while a process has a file
on it open for writing. The authority keeps its database and audit log open,
so the read-only case covers an authority started on a directory that is
already read-only.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from policies import TEST_POLICY
from session_authority.clients._client import AuthorityClient
from session_authority.clients._errors import AuthorityError
from session_authority.clients._metadata import EndReason
from session_authority.clients._types import LeaseState
from session_authority.server import AuthorityConfig, AuthorityThread, InsecureDevAuthenticator, parse_policy
from session_authority.server._audit import verify

FILESYSTEM_SIZE = "4m"
AUDIT_FLUSH_TIMEOUT_SECONDS = 10.0


def run_mount(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *arguments], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def small_filesystem(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A tmpfs of a few MiB mounted under ``tmp_path``; unmounted after the test."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    mounted = run_mount("-t", "tmpfs", "-o", f"size={FILESYSTEM_SIZE}", "tmpfs", str(mount_point))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True, timeout=30)
        if unmounted.returncode != 0:
            # A file still open on it (a leaked thread's database handle) must not leave the mount behind.
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30, check=False)


def start_authority(data_dir: pathlib.Path) -> AuthorityThread:
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=parse_policy(TEST_POLICY),
        data_dir=data_dir,
        admin_everyone=True,
        heartbeat_interval_seconds=0.2,
    )
    return AuthorityThread(config).start()


def fill_filesystem(path: pathlib.Path) -> None:
    """Write ``path`` until the filesystem has no free block left."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    os.write(descriptor, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, f"filling {path} failed: {exc}"
                    break
    finally:
        os.close(descriptor)


def audit_event_ids(audit_dir: pathlib.Path) -> list[str]:
    ids = []
    for file in sorted(audit_dir.glob("audit*.jsonl")):
        for line in file.read_bytes().splitlines():
            if line.strip():
                ids.append(json.loads(line)["event_id"])
    return ids


def wait_for_audit(audit_dir: pathlib.Path, expected: set[str]) -> list[str]:
    """Poll the audit log until it contains every event ID in ``expected``; return all event IDs."""
    deadline = time.monotonic() + AUDIT_FLUSH_TIMEOUT_SECONDS
    while True:
        ids = audit_event_ids(audit_dir)
        missing = expected - set(ids)
        if not missing:
            return ids
        assert time.monotonic() < deadline, f"audit records {sorted(missing)} not written within the timeout"
        time.sleep(0.05)


def test_full_disk_grant_unavailable(small_filesystem: pathlib.Path) -> None:
    data_dir = small_filesystem / "data"
    authority = start_authority(data_dir)
    try:
        with AuthorityClient(authority.target, principal="svc-disk", timeout_seconds=5) as client:
            before = [client.grant("standard") for _ in range(3)]
            fill_filesystem(small_filesystem / "filler")
            # A grant whose pages need no new disk block can still succeed.
            refused = None
            for _ in range(100):
                try:
                    before.append(client.grant("standard"))
                except AuthorityError as exc:
                    refused = exc
                    break
            still_served = [client.time_to_live(lease.lease_id) for lease in before]
    finally:
        (small_filesystem / "filler").unlink(missing_ok=True)
        authority.stop()

    assert refused is not None, "every grant succeeded on a full disk"
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert str(data_dir / "leases.db") in refused.details
    assert "full" in refused.details
    assert [lease.state for lease in still_served] == [LeaseState.ALIVE] * len(before)


def test_full_disk_keeps_stored_leases_and_audit(small_filesystem: pathlib.Path) -> None:
    data_dir = small_filesystem / "data"
    audit_dir = data_dir / "audit"
    authority = start_authority(data_dir)
    try:
        with AuthorityClient(authority.target, principal="svc-disk", timeout_seconds=5) as client:
            stored_before = [client.grant("standard") for _ in range(3)]
            revoked = client.grant("standard")
            client.revoke(revoked.lease_id)
            wait_for_audit(audit_dir, {f"end:{revoked.lease.digest}"})

            fill_filesystem(small_filesystem / "filler")
            # SQLite can still commit a grant whose pages need no new disk
            # block; such a grant must be as durable as any other.
            stored_while_full = []
            failures = 0
            for _ in range(100):
                try:
                    stored_while_full.append(client.grant("standard"))
                except AuthorityError as exc:
                    assert exc.code is grpc.StatusCode.UNAVAILABLE
                    failures += 1
                    if failures == 5:
                        break
            (small_filesystem / "filler").unlink()
            after_fault = client.grant("standard")
            wait_for_audit(audit_dir, {f"grant:{after_fault.lease.digest}"})
    finally:
        (small_filesystem / "filler").unlink(missing_ok=True)
        authority.stop()
    authority = start_authority(data_dir)
    try:
        with AuthorityClient(authority.target, principal="svc-disk", timeout_seconds=5) as client:
            stored = [*stored_before, *stored_while_full, after_fault]
            after_restart = [client.time_to_live(lease.lease_id) for lease in stored]
            revoked_after = client.time_to_live(revoked.lease_id)
    finally:
        authority.stop()
    ids = audit_event_ids(audit_dir)
    result = verify(audit_dir)

    assert failures == 5
    assert [lease.state for lease in after_restart] == [LeaseState.ALIVE] * len(stored)
    assert [lease.principal for lease in after_restart] == ["svc-disk"] * len(stored)
    assert revoked_after.end_reason is EndReason.REVOKED
    assert len(ids) == len(set(ids)), "an audit event was written twice"
    assert {f"grant:{lease.lease.digest}" for lease in stored} <= set(ids)
    assert result.ok, str(result.error)


def test_full_disk_revoke_survives_restart(small_filesystem: pathlib.Path) -> None:
    data_dir = small_filesystem / "data"
    audit_dir = data_dir / "audit"
    authority = start_authority(data_dir)
    try:
        with AuthorityClient(authority.target, principal="svc-disk", timeout_seconds=5) as client:
            lease = client.grant("standard")
            wait_for_audit(audit_dir, {f"grant:{lease.lease.digest}"})
            fill_filesystem(small_filesystem / "filler")
            with pytest.raises(AuthorityError) as refused:
                client.revoke(lease.lease_id)
            during = client.time_to_live(lease.lease_id)
            (small_filesystem / "filler").unlink()
            wait_for_audit(audit_dir, {f"end:{lease.lease.digest}"})
    finally:
        (small_filesystem / "filler").unlink(missing_ok=True)
        authority.stop()
    authority = start_authority(data_dir)
    try:
        with AuthorityClient(authority.target, principal="svc-disk", timeout_seconds=5) as client:
            after_restart = client.time_to_live(lease.lease_id)
    finally:
        authority.stop()

    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
    assert during.end_reason is EndReason.REVOKED
    # The audit log already contains this lease's end, so the lease must not live again.
    assert after_restart.state is LeaseState.ENDED
    assert after_restart.end_reason is EndReason.REVOKED
    assert verify(audit_dir).ok


def test_read_only_data_dir_fails_start(small_filesystem: pathlib.Path, policy_file: pathlib.Path) -> None:
    data_dir = small_filesystem / "data"
    authority = start_authority(data_dir)
    try:
        with AuthorityClient(authority.target, principal="svc-disk", timeout_seconds=5) as client:
            lease = client.grant("standard")
    finally:
        authority.stop()

    remounted = run_mount("-o", "remount,ro", str(small_filesystem))
    assert remounted.returncode == 0, remounted.stderr
    try:
        started = subprocess.run(
            [
                sys.executable,
                "-m",
                "session_authority.server._main",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(data_dir),
                "--policy",
                str(policy_file),
                "--insecure-dev",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        assert run_mount("-o", "remount,rw", str(small_filesystem)).returncode == 0
    authority = start_authority(data_dir)
    try:
        with AuthorityClient(authority.target, principal="svc-disk", timeout_seconds=5) as client:
            after = client.time_to_live(lease.lease_id)
    finally:
        authority.stop()

    assert started.returncode != 0
    assert f"cannot open lease store {data_dir / 'leases.db'}" in started.stderr
    assert f"the data directory {data_dir} is not writable" in started.stderr
    assert after.state is LeaseState.ALIVE
    assert verify(data_dir / "audit").ok
