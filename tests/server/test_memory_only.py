"""An authority without a data directory keeps nothing on disk and still serves."""

from __future__ import annotations

import logging

import grpc
import pytest

from session_authority.server import AuthorityConfig, AuthorityThread, InsecureDevAuthenticator
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc


def test_memory_only_grant_and_revoke_log_no_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    config = AuthorityConfig(authenticator=InsecureDevAuthenticator(), admin_everyone=True)

    with AuthorityThread(config) as authority, grpc.insecure_channel(authority.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        granted = stub.Grant(pb.GrantRequest(principal="svc-a"), timeout=5)
        revoked = stub.Revoke(pb.RevokeRequest(lease_id=granted.lease_id), timeout=5)

    assert revoked.lease.end_reason == pb.END_REASON_REVOKED
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "insecure" not in r.getMessage()] == []
