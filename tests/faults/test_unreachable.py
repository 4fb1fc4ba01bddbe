"""The authority out of reach: enforcers fail closed and recover, holders ride out short outages.

Two kinds of outage: the authority process is stopped and later restarted on
the same port, or its port is black-holed (or refused) by a loopback proxy
between the enforcer or holder and the authority while the authority keeps
running.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from faults._proxy import ProxyMode, TcpProxy
from lease_harness import AioServer
from session_authority.clients._client import AuthorityClient
from session_authority.clients._keeper import LeaseKeeper
from session_authority.clients._metadata import END_REASON_TRAILER_KEY, LEASE_METADATA_KEY
from session_authority.clients._session import Session, SessionState
from session_authority.clients._types import LeaseState
from session_authority.interceptors import EnforcerConfig, LeaseServerInterceptor

STALENESS_BOUND_SECONDS = 1.0
RECOVERY_TIMEOUT_SECONDS = 15.0
"""Maximum wait for an enforcer or holder to work again once the authority is back."""

ECHO_METHOD = "/test.Fault/Echo"
LINK_LOGGER = "session_authority.interceptors._authority_link"
ENFORCER_LOGGER = "session_authority.interceptors._enforcer"

# Short channel backoff, so that a client notices the returned authority within
# about a second instead of after gRPC's default backoff of up to two minutes.
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


class ProtectedServer:
    """A ``grpc.server`` on loopback with one unary method behind a :class:`LeaseServerInterceptor`."""

    def __init__(
        self,
        authority_target: str,
        *,
        reconnect_backoff_seconds: tuple[float, float] = (0.05, 0.5),
        config: EnforcerConfig | None = None,
    ) -> None:
        if config is None:
            config = EnforcerConfig(
                authority_target=authority_target,
                staleness_bound_seconds=STALENESS_BOUND_SECONDS,
                activity_batch_interval_seconds=0.05,
                reconnect_backoff_initial_seconds=reconnect_backoff_seconds[0],
                reconnect_backoff_max_seconds=reconnect_backoff_seconds[1],
                validate_timeout_seconds=1.0,
            )
        self.interceptor = LeaseServerInterceptor(config)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        self.server = grpc.server(self.executor, interceptors=[self.interceptor])
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
        chat = grpc.stream_stream_rpc_method_handler(lambda requests, context: (request for request in requests))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Fault", {"Echo": handler, "Chat": chat})]
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def call(self, lease_id: str) -> tuple[grpc.StatusCode, str, str | None]:
        """Call the protected method; return the status, its details and the end-reason trailer."""
        return call_unary(self.channel, ECHO_METHOD, lease_id)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(grace=None).wait(10)
        self.executor.shutdown(wait=True)
        self.interceptor.close()


class AioProtectedServer:
    """The same surface as :class:`ProtectedServer` for a ``grpc.aio`` server behind an :class:`AioLeaseServerInterceptor`."""

    def __init__(self, config: EnforcerConfig) -> None:
        self.server = AioServer(config)
        self.interceptor = self.server.interceptor
        self.channel = grpc.insecure_channel(self.server.target)

    def call(self, lease_id: str) -> tuple[grpc.StatusCode, str, str | None]:
        """Call the protected method; return the status, its details and the end-reason trailer."""
        return call_unary(self.channel, "/test.Lease/unary_coroutine", lease_id)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop()


def call_unary(channel: grpc.Channel, method: str, lease_id: str) -> tuple[grpc.StatusCode, str, str | None]:
    """Call ``method`` with the lease; return the status, its details and the end-reason trailer."""
    try:
        _, call = channel.unary_unary(method).with_call(b"ping", metadata=((LEASE_METADATA_KEY, lease_id),), timeout=5)
    except grpc.RpcError as exc:
        trailers = {item.key: item.value for item in exc.trailing_metadata() or ()}
        return exc.code(), exc.details() or "", trailers.get(END_REASON_TRAILER_KEY)
    return call.code(), "", None


def wait_for_call(
    server: ProtectedServer,
    lease_id: str,
    accept: Callable[[tuple[grpc.StatusCode, str, str | None]], bool],
    timeout_seconds: float,
    description: str,
) -> tuple[grpc.StatusCode, str, str | None]:
    """Call every 50 ms until ``accept`` returns True for an outcome; fail after ``timeout_seconds``."""
    deadline = time.monotonic() + timeout_seconds
    outcome = server.call(lease_id)
    while not accept(outcome):
        assert time.monotonic() < deadline, f"{description} not seen within {timeout_seconds} s; last outcome {outcome}"
        time.sleep(0.05)
        outcome = server.call(lease_id)
    return outcome


def is_unreachable(outcome: tuple[grpc.StatusCode, str, str | None]) -> bool:
    return outcome[0] is grpc.StatusCode.UNAUTHENTICATED and outcome[2] == "authority_unreachable"


def is_ok(outcome: tuple[grpc.StatusCode, str, str | None]) -> bool:
    return outcome[0] is grpc.StatusCode.OK


@pytest.fixture
def proxy(authority_process) -> Iterator[TcpProxy]:  # type: ignore[no-untyped-def]
    running = TcpProxy(authority_process.target)
    yield running
    running.close()


@pytest.fixture
def direct_client(authority_process) -> Iterator[AuthorityClient]:  # type: ignore[no-untyped-def]
    client = AuthorityClient(authority_process.target, principal="svc-fault", timeout_seconds=5, options=FAST_RECONNECT)
    yield client
    client.close()


# -- enforcer ---------------------------------------------------------------------


def test_enforcer_rejects_then_recovers_on_restart(authority_process, direct_client) -> None:  # type: ignore[no-untyped-def]
    lease_id = direct_client.grant("standard").lease_id
    server = ProtectedServer(authority_process.target)
    try:
        assert server.call(lease_id)[0] is grpc.StatusCode.OK

        assert authority_process.stop() == 0
        rejected = wait_for_call(server, lease_id, is_unreachable, STALENESS_BOUND_SECONDS + 5, "authority_unreachable")
        authority_process.restart()
        recovered = wait_for_call(server, lease_id, is_ok, RECOVERY_TIMEOUT_SECONDS, "an admitted call")
    finally:
        server.stop()

    assert rejected[0] is grpc.StatusCode.UNAUTHENTICATED
    assert rejected[2] == "authority_unreachable"
    assert "authority_unreachable" in rejected[1]
    assert recovered[0] is grpc.StatusCode.OK


@pytest.mark.parametrize("fault", [ProxyMode.BLACKHOLE, ProxyMode.REFUSE], ids=lambda mode: mode.value)
def test_enforcer_rejects_then_recovers_behind_proxy(proxy, direct_client, fault: ProxyMode) -> None:  # type: ignore[no-untyped-def]
    lease_id = direct_client.grant("standard").lease_id
    server = ProtectedServer(proxy.target)
    try:
        assert server.call(lease_id)[0] is grpc.StatusCode.OK

        proxy.set_mode(fault)
        started = time.monotonic()
        rejected = wait_for_call(server, lease_id, is_unreachable, STALENESS_BOUND_SECONDS + 5, "authority_unreachable")
        rejected_after = time.monotonic() - started
        proxy.set_mode(ProxyMode.PASS)
        recovered = wait_for_call(server, lease_id, is_ok, RECOVERY_TIMEOUT_SECONDS, "an admitted call")
    finally:
        server.stop()

    assert rejected[2] == "authority_unreachable"
    # The watch stream was silent for at most one heartbeat (0.2 s) before
    # the fault, so the enforcer cannot have given up much earlier than the bound.
    assert rejected_after >= STALENESS_BOUND_SECONDS - 0.3
    assert recovered[0] is grpc.StatusCode.OK


def test_enforcer_reconnect_delay_stays_under_bound(proxy, direct_client, caplog) -> None:  # type: ignore[no-untyped-def]
    # Configured alone, the first reconnect would wait 10 to 20 s. The
    # enforcer keeps it under a quarter of the staleness bound, so it is back
    # on the watch stream, and admits calls again, soon after the outage.
    caplog.set_level(logging.INFO, logger=LINK_LOGGER)
    lease_id = direct_client.grant("standard").lease_id
    server = ProtectedServer(proxy.target, reconnect_backoff_seconds=(20.0, 60.0))
    try:
        assert server.call(lease_id)[0] is grpc.StatusCode.OK

        proxy.set_mode(ProxyMode.REFUSE)
        wait_for_call(server, lease_id, is_unreachable, STALENESS_BOUND_SECONDS + 5, "authority_unreachable")
        proxy.set_mode(ProxyMode.PASS)
        recovered = wait_for_call(server, lease_id, is_ok, 8.0, "an admitted call")
    finally:
        server.stop()

    assert recovered[0] is grpc.StatusCode.OK
    link_records = [record for record in caplog.records if record.name == LINK_LOGGER]
    # The outage lasted past several reconnect attempts, and it is one warning, then one line when it ends.
    assert len([record for record in link_records if record.levelno == logging.WARNING]) == 1
    assert any("is back after" in record.getMessage() for record in link_records)


def test_enforcer_admits_cached_lease_before_bound(proxy, direct_client) -> None:  # type: ignore[no-untyped-def]
    lease_id = direct_client.grant("standard").lease_id
    server = ProtectedServer(proxy.target)
    try:
        assert server.call(lease_id)[0] is grpc.StatusCode.OK

        proxy.set_mode(ProxyMode.BLACKHOLE)
        started = time.monotonic()
        during = server.call(lease_id)
        elapsed = time.monotonic() - started
        proxy.set_mode(ProxyMode.PASS)
    finally:
        server.stop()

    if elapsed >= STALENESS_BOUND_SECONDS - 0.3:
        pytest.skip(f"the call took {elapsed:.2f} s, too close to the staleness bound to decide")
    assert during[0] is grpc.StatusCode.OK


def test_activity_before_staleness_cut_off_reported(proxy, direct_client) -> None:  # type: ignore[no-untyped-def]
    """Calls admitted while the authority was out of reach still count once it is back.

    The enforcer drops its cached leases when the staleness bound runs out.
    The activity it could not report before then must reach the authority
    afterwards: after a restart, that activity decides whether the lease
    outlived the outage.
    """
    lease_id = direct_client.grant("standard", idle_timeout_seconds=30.0).lease_id
    server = ProtectedServer(proxy.target)
    try:
        assert server.call(lease_id)[0] is grpc.StatusCode.OK
        time.sleep(0.3)

        proxy.set_mode(ProxyMode.REFUSE)
        last_admitted = time.monotonic()
        outcome = server.call(lease_id)
        while not is_unreachable(outcome):
            assert is_ok(outcome), outcome
            last_admitted = time.monotonic()
            time.sleep(0.05)
            outcome = server.call(lease_id)
            assert time.monotonic() - last_admitted < STALENESS_BOUND_SECONDS + 5
        cut_off_at = time.monotonic()
        proxy.set_mode(ProxyMode.PASS)
        # No call until the authority has the resent reports: a new call
        # would be newer activity and hide whether they arrived.
        back_by = time.monotonic() + RECOVERY_TIMEOUT_SECONDS
        while server.interceptor.enforcer.stale:
            assert time.monotonic() < back_by, "the enforcer did not hear from the authority again"
            time.sleep(0.05)
        time.sleep(0.5)
        at_authority = direct_client.time_to_live(lease_id)
        stored_activity = time.monotonic() - at_authority.idle_for_seconds
    finally:
        server.stop()

    # The proxy refused every report sent after the fault, so the calls
    # admitted since then reached the authority only in the reports sent again.
    assert cut_off_at - last_admitted < 0.5
    assert stored_activity >= last_admitted - 0.3, (last_admitted - stored_activity, cut_off_at - last_admitted)


# -- holder -----------------------------------------------------------------------


class ActiveSession:
    """A :class:`Session` in tier ``standard`` whose holder marks activity every 50 ms."""

    IDLE_TIMEOUT_SECONDS = 8.0
    """Renewals go out every third of this, so an outage of about 5 s fits before the local deadline."""

    def __init__(self, target: str, *, idle_timeout_seconds: float = IDLE_TIMEOUT_SECONDS) -> None:
        self.idle_timeout_seconds = idle_timeout_seconds
        self.client = AuthorityClient(target, principal="holder-fault", timeout_seconds=2, options=FAST_RECONNECT)
        # A renewal reply later than this counts as a failure, so a black hole
        # shorter than the default timeout is still noticed as one.
        self.keeper = LeaseKeeper(renewal_timeout_seconds=0.5)
        self.ends: list[str] = []
        self.session = Session(
            self.client,
            tier="standard",
            idle_timeout_seconds=idle_timeout_seconds,
            keeper=self.keeper,
            on_end=lambda reason: self.ends.append(reason.value),
        ).open()
        assert self.session.lease_id is not None
        self.lease_id: str = self.session.lease_id

    def active_for(self, seconds: float) -> list[SessionState]:
        """Mark activity for ``seconds``; return the states seen meanwhile."""
        states = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.session.mark_activity()
            states.append(self.session.state)
            time.sleep(0.05)
        return states

    def renewed_since(self, moment: float, timeout_seconds: float) -> bool:
        """Mark activity until a renewal reply received after ``moment`` moved the local deadline; return whether one did.

        Only a renewal sent after ``moment`` can put the local deadline more
        than 80 % of the idle timeout past it.
        """
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            self.session.mark_activity()
            remaining = self.session.remaining_seconds or 0.0
            if time.monotonic() + remaining > moment + self.idle_timeout_seconds * 0.8:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.session.close()
        self.keeper.close()
        self.client.close()


def test_holder_survives_authority_restart(authority_process, direct_client) -> None:  # type: ignore[no-untyped-def]
    # A longer idle timeout than the other tests: stopping and restarting a
    # process takes seconds on a loaded machine, and the lease must outlive both.
    holder = ActiveSession(authority_process.target, idle_timeout_seconds=12.0)
    try:
        holder.active_for(0.5)

        assert authority_process.stop() == 0
        # Long enough that the first renewal (a third of the idle timeout after the grant) falls in the outage.
        during = holder.active_for(4.0)
        authority_process.restart()
        back_at = time.monotonic()
        renewed = holder.renewed_since(back_at, RECOVERY_TIMEOUT_SECONDS)
        at_authority = direct_client.time_to_live(holder.lease_id)
        ends = list(holder.ends)
        failed = holder.keeper.stats.renewals_failed
    finally:
        holder.close()

    assert failed > 0, "no renewal failed, so the outage was never felt"
    assert set(during) == {SessionState.ALIVE}
    assert renewed, "the holder did not renew after the authority came back"
    assert ends == []
    assert at_authority.state is LeaseState.ALIVE
    assert at_authority.idle_for_seconds < 2.0


@pytest.mark.parametrize("fault", [ProxyMode.BLACKHOLE, ProxyMode.REFUSE], ids=lambda mode: mode.value)
def test_holder_survives_proxy_outage(proxy, direct_client, fault: ProxyMode) -> None:  # type: ignore[no-untyped-def]
    holder = ActiveSession(proxy.target)
    try:
        holder.active_for(0.5)

        proxy.set_mode(fault)
        # The first renewal goes out about 2.7 s after the grant; the keeper may
        # notice its missing reply up to 1.5 s later.
        during = holder.active_for(4.0)
        proxy.set_mode(ProxyMode.PASS)
        back_at = time.monotonic()
        renewed = holder.renewed_since(back_at, RECOVERY_TIMEOUT_SECONDS)
        at_authority = direct_client.time_to_live(holder.lease_id)
        ends = list(holder.ends)
        failed = holder.keeper.stats.renewals_failed
    finally:
        holder.close()

    assert failed > 0, "no renewal failed, so the outage was never felt"
    assert set(during) == {SessionState.ALIVE}
    assert renewed, "the holder did not renew after the proxy passed traffic again"
    assert ends == []
    assert at_authority.state is LeaseState.ALIVE
    assert at_authority.idle_for_seconds < 2.0


def test_holder_ends_unreachable_after_deadline(proxy, direct_client) -> None:  # type: ignore[no-untyped-def]
    holder = ActiveSession(proxy.target, idle_timeout_seconds=2.0)
    try:
        holder.active_for(0.3)

        proxy.set_mode(ProxyMode.BLACKHOLE)
        states = holder.active_for(4.0)
        ended_reason = holder.session.end_reason
        proxy.set_mode(ProxyMode.PASS)
        at_authority = direct_client.time_to_live(holder.lease_id)
    finally:
        holder.close()

    assert states[0] is SessionState.ALIVE
    assert states[-1] is SessionState.ENDED
    assert ended_reason is not None
    assert ended_reason.value == "authority_unreachable"
    # The renewals never arrived, so the authority ended the lease at its
    # idle deadline, which lies after the holder's conservative local one.
    assert at_authority.state is LeaseState.ENDED
    assert at_authority.end_reason is not None
    assert at_authority.end_reason.value == "idle_timeout"


def test_enforcer_raises_bound_below_two_heartbeats(authority, caplog) -> None:  # type: ignore[no-untyped-def]
    # The in-process authority sends a heartbeat every 0.2 s. A bound of one
    # interval would run out between heartbeats of a healthy stream.
    caplog.set_level(logging.INFO, logger=ENFORCER_LOGGER)
    with AuthorityClient(authority.target, principal="svc-fault") as client:
        lease_id = client.grant("standard").lease_id
    config = EnforcerConfig(authority_target=authority.target, staleness_bound_seconds=0.2)
    server = ProtectedServer(authority.target, config=config)
    try:
        for _ in range(40):
            assert server.call(lease_id)[0] is grpc.StatusCode.OK
            time.sleep(0.05)
    finally:
        server.stop()

    messages = [record.getMessage() for record in caplog.records if record.name == ENFORCER_LOGGER]
    assert not [message for message in messages if "no word from the authority" in message]
    assert len([message for message in messages if "using 0.4 s" in message]) == 1


def restart_config(authority_target: str) -> EnforcerConfig:
    """Enforcer settings for riding out a restart: a staleness bound longer than the outage."""
    return EnforcerConfig(
        authority_target=authority_target,
        staleness_bound_seconds=8.0,
        activity_batch_interval_seconds=0.05,
        reconnect_backoff_initial_seconds=0.05,
        reconnect_backoff_max_seconds=0.5,
        validate_timeout_seconds=1.0,
    )


@pytest.mark.parametrize(("kind", "away_seconds"), [("sync", 1.6), ("sync", 3.5), ("aio", 3.5)])
def test_unary_lease_outlives_restart(authority_process, direct_client, kind: str, away_seconds: float) -> None:  # type: ignore[no-untyped-def]
    """A lease in use through a restart survives although its stored activity is older than its idle timeout.

    The authority is away about 2 s or about 4 s, while the lease's idle
    timeout is 2 s, so the activity it stored before the kill has run out
    when it serves again. The enforcer reports the calls it admitted
    meanwhile once it reconnects, within the restart grace. In the longer
    outage it refuses calls once the lease's last reply has run out, but the
    holder keeps calling, and those refused calls count as activity too.
    """
    config = restart_config(authority_process.target)
    server: ProtectedServer | AioProtectedServer
    if kind == "sync":
        server = ProtectedServer(authority_process.target, config=config)
    else:
        server = AioProtectedServer(config)
    lease_id = direct_client.grant("standard", idle_timeout_seconds=2.0).lease_id
    outcomes: list[tuple[grpc.StatusCode, str, str | None]] = []
    try:
        for _ in range(5):
            outcomes.append(server.call(lease_id))
            time.sleep(0.1)
        authority_process.kill()
        away_until = time.monotonic() + away_seconds
        while time.monotonic() < away_until:
            outcomes.append(server.call(lease_id))
            time.sleep(0.1)
        authority_process.restart()
        # Calls refused while the enforcer could not confirm the lease are fine;
        # an end of the lease is not.
        after = wait_for_call(server, lease_id, lambda o: is_ok(o) or o[2] not in (None, "authority_unreachable"), 10.0, "an answer")
        for _ in range(30):
            outcomes.append(server.call(lease_id))
            time.sleep(0.1)
        at_authority = direct_client.time_to_live(lease_id)
    finally:
        server.stop()

    if away_seconds > 2.0:
        assert any(is_unreachable(o) for o in outcomes), "no call was refused while the authority was away"
    assert after[0] is grpc.StatusCode.OK, after
    assert [o for o in outcomes if not is_ok(o) and not is_unreachable(o)] == []
    assert at_authority.state is LeaseState.ALIVE


@pytest.mark.parametrize("away_seconds", [1.2, 1.8])
def test_busy_stream_outlives_restart(authority_process, direct_client, away_seconds: float) -> None:  # type: ignore[no-untyped-def]
    """A bidi stream that carries messages through a restart keeps its lease.

    The enforcer admits the messages while the authority is away and reports
    them once it reconnects, oldest first, so the restarted authority can
    extend the lease from its stored deadline onwards.
    """
    server = ProtectedServer(authority_process.target, config=restart_config(authority_process.target))
    lease_id = direct_client.grant("standard", idle_timeout_seconds=2.0).lease_id
    sending = threading.Event()
    sending.set()

    def messages() -> Iterator[bytes]:
        # Bounded: at most 20 s of messages even if the test fails to stop it.
        for _ in range(200):
            if not sending.is_set():
                return
            yield b"tick"
            time.sleep(0.1)

    call = server.channel.stream_stream("/test.Fault/Chat")(messages(), metadata=((LEASE_METADATA_KEY, lease_id),), timeout=30)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.extend(call), daemon=True)
    try:
        reader.start()
        time.sleep(0.5)
        authority_process.kill()
        time.sleep(away_seconds)
        authority_process.restart()
        # Past the restart grace (2 s) and past the lease's idle timeout.
        time.sleep(3.5)
        sending.clear()
        reader.join(timeout=10)
        at_authority = direct_client.time_to_live(lease_id)
        code = call.code()
        trailers = {item.key: item.value for item in call.trailing_metadata() or ()}
    finally:
        sending.clear()
        server.stop()

    assert code is grpc.StatusCode.OK, (code, trailers.get(END_REASON_TRAILER_KEY))
    assert at_authority.state is LeaseState.ALIVE
    assert len(received) > 30
