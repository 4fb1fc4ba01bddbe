"""The operator's view of the authority through a generic gRPC reflection client."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool

from session_authority.server import AuthorityThread

SERVICE = "session_authority.v1.SessionAuthority"


def test_reflection_lists_session_authority(authority: AuthorityThread) -> None:
    with grpc.insecure_channel(authority.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()

    assert SERVICE in services
    assert "grpc.health.v1.Health" in services


def test_reflection_describes_session_authority(authority: AuthorityThread) -> None:
    with grpc.insecure_channel(authority.target) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName(SERVICE)
        grant = service.methods_by_name["Grant"]

        assert grant.input_type.full_name == "session_authority.v1.GrantRequest"
        assert "principal" in grant.input_type.fields_by_name
        watch = service.methods_by_name["WatchSessionEnds"]
        assert watch.server_streaming
        assert not watch.client_streaming
