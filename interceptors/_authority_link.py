"""The enforcer's connection to the authority: watch stream, batched activity reports, Validate."""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
from typing import Callable, Protocol, Sequence

import grpc

from session_authority.clients._client import AuthorityClient, KeepAliveStream, WatchStream
from session_authority.clients._common import build_metadata
from session_authority.clients._errors import AuthorityError, PermissionDenied, Unauthenticated
from session_authority.clients._keeper import MAX_BATCH_ENTRIES
from session_authority.clients._types import (
    HeartbeatEvent,
    PolicyInfo,
    RenewResult,
    SessionEndEvent,
    ValidateResult,
)
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

RenewalBatch = Sequence[tuple[str, float]]
"""``(lease_id, idle_for_seconds)`` pairs of one KeepAlive message."""


class LinkListener(Protocol):
    """The enforcer's side of the link: the events the link reports.

    The watch methods run on the link's watch thread and the renewal methods
    on its reporter thread or the KeepAlive reader thread; none may block.
    """

    def watch_message_received(self, instance_id: str, interval_seconds: float | None) -> None:
        """Record that the watch stream is alive (any message, heartbeat or end)."""

    def watch_reset(self) -> None:
        """Drop cached leases: the authority could not replay every end since the last resume."""

    def watch_rejected(self, error: AuthorityError) -> None:
        """Stop trusting the cache: the authority refused this enforcer's watch stream (its credentials or the policy)."""

    def session_ended(self, event: SessionEndEvent) -> None:
        """Apply an end pushed by the authority."""

    def collect_renewals(self, now: float) -> list[tuple[object, str, float]]:
        """Return ``(token, lease_id, idle_for_seconds)`` for every lease with activity to report."""

    def renewals_answered(self, tokens: Sequence[object], sent_at: float, result: RenewResult) -> None:
        """Apply the authority's answer to one renewal batch."""

    def renewals_failed(self, tokens: Sequence[object], error: BaseException) -> None:
        """Put the entries of a failed batch back so the next batch carries them."""


def reconnect_delay(failures: int, initial_seconds: float, max_seconds: float) -> float:
    """Return the pause before reconnect attempt ``failures + 1``: doubling from ``initial_seconds`` up to ``max_seconds``.

    The pause is drawn from the upper half of that ceiling (jitter), so a
    fleet of enforcers that lost the same authority does not reconnect in
    lockstep.
    """
    ceiling = min(max_seconds, initial_seconds * 2 ** min(failures - 1, 30))
    return random.uniform(ceiling / 2, ceiling)


def _log_watch_failure(failures: int, text: str) -> None:
    # One warning per outage: an authority that stays down makes every
    # attempt fail, and the reconnect that ends the outage is logged too.
    if failures == 0:
        logger.warning("%s; reconnecting (further failed attempts are logged at DEBUG)", text)
    else:
        logger.debug("%s; reconnect attempt %d failed", text, failures)


class AuthorityLink:
    """Background threads that keep an enforcer in touch with the authority.

    Threads: ``session-lease-watch`` reads ``WatchSessionEnds`` and reconnects
    with exponential backoff and full jitter, resuming after the last sequence
    seen on the same authority instance; ``session-lease-reporter`` sends the
    enforcer's activity every ``batch_interval_seconds`` over one ``KeepAlive``
    stream, reopened when it breaks. :meth:`validate` and :meth:`get_policy`
    block the calling thread. :meth:`close` stops and joins every thread.

    Args:
        listener: The enforcer that receives what the link learns.
        client: The typed client used for Validate, GetPolicy and KeepAlive.
        watch_stub: A raw stub on the same channel, for the watch stream,
            which resumes with ``instance_id`` as well as ``after_sequence``.
        watch_metadata: The request metadata of the client (API key).
        batch_interval_seconds: Pause between two activity batches.
        backoff_initial_seconds: First reconnect delay of the watch stream.
        backoff_max_seconds: Largest reconnect delay.
        backoff_cap: Returns a second, current limit on the reconnect delay:
            the enforcer keeps it well under its staleness bound, so that a
            short outage ends before the enforcer stops trusting its cache.
        clock: Monotonic clock in seconds.
    """

    def __init__(
        self,
        listener: LinkListener,
        client: AuthorityClient,
        watch_stub: pb_grpc.SessionAuthorityStub,
        watch_metadata: tuple[tuple[str, str], ...],
        *,
        batch_interval_seconds: float,
        backoff_initial_seconds: float,
        backoff_max_seconds: float,
        backoff_cap: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._listener = listener
        self._client = client
        self._watch_stub = watch_stub
        self._watch_metadata = watch_metadata
        self._batch_interval_seconds = batch_interval_seconds
        self._backoff_initial_seconds = backoff_initial_seconds
        self._backoff_max_seconds = backoff_max_seconds
        self._backoff_cap = backoff_cap
        self._clock = clock

        self._closed = threading.Event()
        self._flush_requested = threading.Event()
        self._lock = threading.Lock()
        self._watch: WatchStream | None = None
        self._dropped: WatchStream | None = None
        self._validate_calls = 0
        self._keep_alive: KeepAliveStream | None = None
        self._after_sequence = 0
        self._instance_id = ""
        self._threads: list[threading.Thread] = []

    @classmethod
    def open_client(
        cls,
        target: str | None,
        channel: grpc.Channel | None,
        credentials: grpc.ChannelCredentials | None,
        api_key: str | None,
        validate_timeout_seconds: float,
    ) -> tuple[AuthorityClient, pb_grpc.SessionAuthorityStub, tuple[tuple[str, str], ...], grpc.Channel | None]:
        """Open the typed client and the watch stub on one channel.

        Returns:
            The client, the stub, the request metadata and the channel that the
            link owns (None when the caller passed its own channel).
        """
        owned: grpc.Channel | None = None
        if channel is None:
            assert target is not None
            # Short channel backoff so that the link notices a restarted
            # authority within half a second instead of gRPC's default of
            # up to two minutes. The channel shares its connection attempts
            # with every channel of the process that has the same target and
            # options, so a fleet of enforcers in one process adds none.
            options = [
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500),
            ]
            if credentials is not None:
                owned = grpc.secure_channel(target, credentials, options=options)
            else:
                owned = grpc.insecure_channel(target, options=options)
            channel = owned
        client = AuthorityClient(channel=channel, api_key=api_key, timeout_seconds=validate_timeout_seconds)
        metadata = build_metadata(api_key, None)
        return client, pb_grpc.SessionAuthorityStub(channel), metadata, owned

    def start(self) -> None:
        """Start the watch and reporter threads."""
        for name, target in (
            ("session-lease-watch", self._run_watch),
            ("session-lease-reporter", self._run_reporter),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the streams and join the threads; idempotent."""
        self._closed.set()
        self._flush_requested.set()
        with self._lock:
            watch, self._watch = self._watch, None
            keep_alive, self._keep_alive = self._keep_alive, None
        if watch is not None:
            watch.cancel()
        if keep_alive is not None:
            keep_alive.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)
        self._threads.clear()

    # -- calls on the caller's thread ----------------------------------------

    def validate(
        self, lease_id: str, method: str, caller_principal: str, timeout_seconds: float | None = None
    ) -> ValidateResult:
        """Ask the authority about one call (blocks at most ``timeout_seconds``, default the client's timeout).

        Raises:
            AuthorityError: The call failed.
            ValueError: The answer carries a verdict or state this client does not know.
        """
        with self._lock:
            self._validate_calls += 1
        return self._client.validate(lease_id, method, caller_principal=caller_principal, timeout_seconds=timeout_seconds)

    @property
    def validate_calls(self) -> int:
        """How many ``Validate`` calls this link has sent to the authority, for tests and operators."""
        with self._lock:
            return self._validate_calls

    def get_policy(self, timeout_seconds: float) -> PolicyInfo:
        """Fetch the tiers and method rules (blocks).

        Raises:
            AuthorityError: The call failed.
        """
        return self._client.get_policy(timeout_seconds=timeout_seconds)

    def request_flush(self) -> None:
        """Ask the reporter to send a batch now instead of at the next interval."""
        self._flush_requested.set()

    # -- watch thread ---------------------------------------------------------

    def _run_watch(self) -> None:
        # Streams in a row that ended before a message arrived (they set the
        # backoff), and how many of them failed rather than being dropped for
        # silence (they are what the log counts).
        failures = 0
        failed_attempts = 0
        while not self._closed.is_set():
            request = pb.WatchSessionEndsRequest(
                after_sequence=self._after_sequence, instance_id=self._instance_id
            )
            # wait_for_ready: while the authority cannot be reached, the call
            # waits for the channel to connect instead of failing at once, so
            # the stream opens as soon as the authority accepts connections.
            call = self._watch_stub.WatchSessionEnds(request, metadata=self._watch_metadata, wait_for_ready=True)
            stream = WatchStream(call)
            with self._lock:
                if self._closed.is_set():
                    stream.cancel()
                    return
                self._watch = stream
            try:
                for event in stream:
                    if failed_attempts:
                        logger.info("watch stream to the authority is back after %d failed attempt(s)", failed_attempts)
                    failures = failed_attempts = 0
                    self._handle_watch_event(event)
                if self._closed.is_set():
                    pass
                elif self._dropped is stream:
                    logger.info("dropped the watch stream, silent past the staleness bound; reconnecting")
                else:
                    _log_watch_failure(failed_attempts, "the authority ended the watch stream")
                    failed_attempts += 1
            except AuthorityError as exc:
                if not self._closed.is_set():
                    _log_watch_failure(failed_attempts, f"watch stream to the authority failed: {exc}")
                    failed_attempts += 1
                    if isinstance(exc, (Unauthenticated, PermissionDenied)):
                        self._listener.watch_rejected(exc)
            except Exception:  # noqa: BLE001 - a bug here must not end watching for good
                logger.exception("unexpected error on the watch stream; reconnecting")
            finally:
                with self._lock:
                    if self._watch is stream:
                        self._watch = None
                    if self._dropped is stream:
                        self._dropped = None
                stream.cancel()
            failures += 1
            self._closed.wait(self._backoff_delay(failures))

    def _backoff_delay(self, failures: int) -> float:
        maximum = self._backoff_max_seconds
        if self._backoff_cap is not None:
            maximum = min(maximum, self._backoff_cap())
        return reconnect_delay(failures, self._backoff_initial_seconds, maximum)

    def cancel_watch(self) -> None:
        """Drop the current watch stream (silent past the staleness bound) so the thread reconnects."""
        with self._lock:
            watch = self._watch
            # Remembered so that the watch thread does not report the end of
            # this stream as the authority's doing.
            self._dropped = watch
        if watch is not None:
            watch.cancel()

    def _handle_watch_event(self, event: HeartbeatEvent | SessionEndEvent) -> None:
        new_instance = (
            isinstance(event, HeartbeatEvent) and bool(self._instance_id) and event.instance_id != self._instance_id
        )
        if event.reset:
            logger.warning("the authority could not replay every session end; dropping cached leases")
            self._listener.watch_reset()
        elif new_instance:
            # A new authority run that had no ends before we reconnected sends
            # no reset (we resume from sequence 0), yet ends between its start
            # and our reconnect would be lost: reset all the same.
            logger.warning("the authority restarted (new instance); dropping cached leases")
            self._listener.watch_reset()
        if isinstance(event, HeartbeatEvent):
            # Sequences restart with every authority run.
            previous = 0 if event.reset or new_instance else self._after_sequence
            self._instance_id = event.instance_id
            self._after_sequence = max(previous, event.sequence)
            self._listener.watch_message_received(event.instance_id, event.interval_seconds)
            return
        self._after_sequence = max(self._after_sequence, event.sequence)
        self._listener.watch_message_received(self._instance_id, None)
        self._listener.session_ended(event)

    # -- reporter thread ------------------------------------------------------

    def _run_reporter(self) -> None:
        while not self._closed.is_set():
            self._flush_requested.wait(self._batch_interval_seconds)
            self._flush_requested.clear()
            if self._closed.is_set():
                return
            try:
                self._send_batch()
            except Exception:  # noqa: BLE001 - reporting must outlive a bug in one batch
                logger.exception("unexpected error while reporting activity")

    def _send_batch(self) -> None:
        now = self._clock()
        collected = self._listener.collect_renewals(now)
        # In order, on one stream: the authority applies the messages, and the
        # reports of one lease within them, in the order they were collected.
        for start in range(0, len(collected), MAX_BATCH_ENTRIES):
            self._send_chunk(collected[start : start + MAX_BATCH_ENTRIES])

    def _send_chunk(self, collected: Sequence[tuple[object, str, float]]) -> None:
        tokens = [token for token, _, _ in collected]
        entries = [(lease_id, idle_for) for _, lease_id, idle_for in collected]

        stream = self._keep_alive_stream()
        sent_at = self._clock()
        try:
            future = stream.send(entries)
        except (RuntimeError, ValueError) as exc:
            self._listener.renewals_failed(tokens, exc)
            return
        future.add_done_callback(lambda done: self._batch_done(tokens, sent_at, done))

    def _keep_alive_stream(self) -> KeepAliveStream:
        with self._lock:
            stream = self._keep_alive
            if stream is None or stream.closed:
                if stream is not None:
                    logger.debug("KeepAlive stream broke (%s); opening a new one", stream.error)
                stream = self._client.keep_alive()
                self._keep_alive = stream
            return stream

    def _batch_done(
        self, tokens: Sequence[object], sent_at: float, future: concurrent.futures.Future[RenewResult]
    ) -> None:
        error = future.exception()
        if error is not None:
            logger.debug("activity batch of %d leases failed: %s", len(tokens), error)
            self._listener.renewals_failed(tokens, error)
            return
        self._listener.renewals_answered(tokens, sent_at, future.result())
