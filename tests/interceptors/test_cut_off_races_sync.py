"""Cut-offs on a sync ``grpc.server`` that race with the handler's own end.

The enforcer collects the calls of an ended lease under its lock and ends
them after releasing it. A handler that raises or aborts in between has
already ended when its cut-off runs, so the status it chose must reach the
client. Each test holds the enforcer inside that gap with a logging handler
that blocks on the enforcer's "cutting off" record. The handler then ends,
and its wrapper waits for the enforcer's lock. An interceptor placed before
ours keeps the exception between the wrapper and grpcio until the cut-off
has run.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from lease_harness import GUARD_SECONDS, SyncServer, enforcer_config, lease_metadata, wait_for
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from session_authority.clients._client import AuthorityClient
from session_authority.clients._metadata import END_REASON_TRAILER_KEY
from session_authority.interceptors._telemetry import CUT_OFF_CALLS_METRIC

ENFORCER_LOGGER = "session_authority.interceptors._enforcer"


class _BlockCutOffs(logging.Handler):
    """Blocks the enforcer's thread on its "cutting off" record, after it collected the calls."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.blocked = threading.Event()
        self.unblock = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("cutting off"):
            self.blocked.set()
            self.unblock.wait(GUARD_SECONDS)


class _HoldExceptions(grpc.ServerInterceptor):
    """Holds an exception of the wrapped unary handler until the test lets it reach grpcio."""

    def __init__(self) -> None:
        self.caught = threading.Event()
        self.proceed = threading.Event()

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        inner = handler.unary_unary

        def held(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return inner(request, context)
            except Exception:
                self.caught.set()
                self.proceed.wait(GUARD_SECONDS)
                raise

        return grpc.unary_unary_rpc_method_handler(
            held, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _cut_off_count(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    total = 0
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == CUT_OFF_CALLS_METRIC:
                    total += sum(point.value for point in metric.data.data_points)
    return total


class _Handler:
    """Where the test's handler thread is."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.go = threading.Event()
        self.thread_id: int | None = None

    def hold(self) -> None:
        self.thread_id = threading.get_ident()
        self.holding.set()
        self.go.wait(GUARD_SECONDS)

    def waits_in_release(self) -> bool:
        """Return whether the handler thread's innermost Python frame is ``Enforcer.release``."""
        assert self.thread_id is not None
        frame = sys._current_frames().get(self.thread_id)
        return frame is not None and frame.f_code.co_name == "release" and "_enforcer" in frame.f_code.co_filename


def _ending_handlers(handler: _Handler) -> dict[str, grpc.RpcMethodHandler]:
    def raise_after_hold(request: bytes, context: grpc.ServicerContext) -> bytes:
        handler.hold()
        raise ValueError("handler failed")

    def abort_after_hold(request: bytes, context: grpc.ServicerContext) -> bytes:
        handler.hold()
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler's own abort")
        raise AssertionError("context.abort returned")

    return {
        "raise_after_hold": grpc.unary_unary_rpc_method_handler(raise_after_hold),
        "abort_after_hold": grpc.unary_unary_rpc_method_handler(abort_after_hold),
    }


@pytest.mark.parametrize(
    ("form", "code", "details"),
    [
        ("raise_after_hold", grpc.StatusCode.UNKNOWN, "Exception calling application: handler failed"),
        ("abort_after_hold", grpc.StatusCode.PERMISSION_DENIED, "handler's own abort"),
    ],
)
def test_ended_handler_keeps_own_status(
    form: str, code: grpc.StatusCode, details: str, authority: Any
) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    handler = _Handler()
    hold_exceptions = _HoldExceptions()
    block_cut_offs = _BlockCutOffs()
    enforcer_logger = logging.getLogger(ENFORCER_LOGGER)
    server = SyncServer(
        enforcer_config(authority.target, meter_provider=meter_provider),
        extra=_ending_handlers(handler),
        outer=[hold_exceptions],
    )
    channel = grpc.insecure_channel(server.target)
    enforcer_logger.addHandler(block_cut_offs)
    try:
        lease_id = admin.grant("standard", principal="svc").lease_id
        future = channel.unary_unary(f"/test.Lease/{form}").future(b"", metadata=lease_metadata(lease_id), timeout=20)
        assert handler.holding.wait(10), "the handler never started"
        admin.revoke(lease_id)
        assert block_cut_offs.blocked.wait(10), "the enforcer never collected the call"

        # The handler ends, and its wrapper waits for the enforcer's lock.
        handler.go.set()
        wait_for(handler.waits_in_release, message="wrapper waiting for the enforcer's lock")
        block_cut_offs.unblock.set()
        assert hold_exceptions.caught.wait(10), "the handler's exception never left the wrapper"
        wait_for(lambda: _cut_off_count(reader) == 1, message="cut-off ran")
        hold_exceptions.proceed.set()
        error = future.exception(timeout=15)

        assert isinstance(error, grpc.Call)
        assert error.code() is code
        assert error.details() == details
        assert END_REASON_TRAILER_KEY not in dict(error.trailing_metadata() or ())
    finally:
        enforcer_logger.removeHandler(block_cut_offs)
        block_cut_offs.unblock.set()
        hold_exceptions.proceed.set()
        handler.go.set()
        channel.close()
        server.stop()
        admin.close()
        meter_provider.shutdown()
