"""Blocking client for the SessionAuthority RPCs, over a ``grpc.Channel``."""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import queue
import threading
import time
from types import TracebackType
from typing import Iterator, Protocol, Sequence

import grpc

from session_authority.clients import _common
from session_authority.clients._errors import AuthorityError, AuthorityUnavailable, translate_rpc_error
from session_authority.clients._types import (
    GrantedLease,
    LeaseInfo,
    PolicyInfo,
    RenewResult,
    RevokeResult,
    ValidateResult,
    WatchEvent,
    timestamp_to_datetime,
    watch_event_from_proto,
)
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_Options = Sequence[tuple[str, object]]


class AuthorityClient:
    """Typed, blocking client for the session authority.

    Every method sends the client's API key and principal (when set), applies
    a deadline and raises :class:`AuthorityError` subclasses instead of
    ``grpc.RpcError``.

    Threading: one instance may be used from many threads at once, as a
    ``grpc.Channel`` may. ``close()`` must not race with calls in progress.

    Args:
        target: ``host:port`` of the authority. The client opens a channel to
            it (TLS when ``credentials`` is given, else plaintext) and closes
            it in :meth:`close`.
        channel: An existing channel to use instead of ``target``; the caller
            keeps ownership and closes it.
        credentials: TLS credentials for the channel opened to ``target``.
        api_key: Sent as ``authorization: Bearer <key>`` on every call.
        principal: Sent as ``x-session-principal`` on every call; only an
            authority in insecure development mode honours it.
        timeout_seconds: Deadline of each unary call unless the call sets its own.
        options: gRPC channel options for the channel opened to ``target``.

    Raises:
        ValueError: Not exactly one of ``target`` and ``channel`` was given,
            ``credentials`` or ``options`` were given with ``channel``, or a
            value is out of range.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        principal: str | None = None,
        timeout_seconds: float = _common.DEFAULT_TIMEOUT_SECONDS,
        options: _Options = (),
    ) -> None:
        self._metadata = _common.build_metadata(api_key, principal)
        self._timeout_seconds = _common.check_timeout_seconds(timeout_seconds)
        if (target is None) == (channel is None):
            raise ValueError("AuthorityClient needs exactly one of target='host:port' or channel=")
        if channel is not None:
            if credentials is not None or options:
                raise ValueError(
                    "credentials and options apply only to the channel opened for target=; "
                    "configure the channel you pass yourself"
                )
            self._channel = channel
            self._owns_channel = False
        else:
            assert target is not None
            _common.warn_if_key_sent_in_clear(target, api_key, secure=credentials is not None)
            if credentials is not None:
                self._channel = grpc.secure_channel(target, credentials, options=list(options))
            else:
                self._channel = grpc.insecure_channel(target, options=list(options))
            self._owns_channel = True
        self._stub = pb_grpc.SessionAuthorityStub(self._channel)
        self._closed = False

    def __enter__(self) -> AuthorityClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel if this client opened it; idempotent."""
        self._closed = True
        if self._owns_channel:
            self._channel.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called, even when the channel was the caller's and stays open."""
        return self._closed

    def _timeout(self, timeout_seconds: float | None) -> float | None:
        if timeout_seconds is None:
            return self._timeout_seconds
        return _common.check_timeout_seconds(timeout_seconds)

    def grant(
        self,
        tier: str = "",
        *,
        principal: str = "",
        idle_timeout_seconds: float | None = None,
        timeout_seconds: float | None = None,
    ) -> GrantedLease:
        """Ask the authority for a new lease.

        Args:
            tier: A tier named in the policy; empty lets the authority pick its default.
            principal: The principal to grant to, honoured only in insecure
                development mode; empty uses the authenticated principal.
            idle_timeout_seconds: Ask for a shorter idle timeout than the tier's.
            timeout_seconds: Deadline of this call; defaults to the client's.

        Returns:
            The lease with its ID, and the local monotonic time the request was sent.

        Raises:
            InvalidArgument: The tier is unknown or the idle timeout is out of range.
            AuthorityError: Any other failure of the call.
        """
        request = _common.grant_request(tier, principal, idle_timeout_seconds)
        timeout = self._timeout(timeout_seconds)

        sent_at_monotonic = time.monotonic()
        try:
            response = self._stub.Grant(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Grant") from exc
        granted = GrantedLease(
            lease_id=response.lease_id,
            lease=LeaseInfo.from_proto(response.lease),
            sent_at_monotonic=sent_at_monotonic,
        )
        logger.debug("granted lease %s in tier %s", granted.fingerprint, granted.lease.tier)
        return granted

    def renew(
        self, entries: Sequence[tuple[str, float]], *, timeout_seconds: float | None = None
    ) -> RenewResult:
        """Report activity on several leases in one call.

        Args:
            entries: ``(lease_id, idle_for_seconds)`` pairs, where
                ``idle_for_seconds`` is how long ago the activity happened.
            timeout_seconds: Deadline of this call; defaults to the client's.

        Returns:
            One lease per entry, in order. Unknown leases come back with state
            ``not_found`` and ended ones with state ``ended``; neither raises.
            An empty ``entries`` returns an empty result without a call.

        Raises:
            ValueError: An entry is malformed.
            AuthorityError: The call failed.
        """
        messages = _common.renew_entries(entries)
        timeout = self._timeout(timeout_seconds)

        sent_at_monotonic = time.monotonic()
        if not messages:
            return RenewResult(leases=[], sent_at_monotonic=sent_at_monotonic)
        try:
            response = self._stub.Renew(
                pb.RenewRequest(entries=messages), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Renew") from exc
        return _common.renew_result(response.leases, sent_at_monotonic)

    def keep_alive(self) -> KeepAliveStream:
        """Open the batched renewal stream.

        The stream has no deadline and does not reconnect: when it breaks,
        open a new one.

        Returns:
            A stream on which to send renewal batches from any thread.
        """
        return KeepAliveStream(self._stub, self._metadata)

    def revoke(
        self,
        lease_id: str | None = None,
        *,
        fingerprint: str | None = None,
        release: bool = False,
        timeout_seconds: float | None = None,
    ) -> RevokeResult:
        """End a lease now.

        Args:
            lease_id: The lease to end (the holder's own, or any for an admin).
            fingerprint: Admins only: name the lease by its fingerprint instead.
            release: End it with reason ``released`` (holder closing its own
                lease) instead of ``revoked``.
            timeout_seconds: Deadline of this call; defaults to the client's.

        Returns:
            The ended lease, and whether it had already ended before. A lease
            ID the authority has no record of comes back with state
            ``not_found``.

        Raises:
            ValueError: Not exactly one of ``lease_id`` and ``fingerprint`` was given.
            FailedPrecondition: No lease, or more than one, has the fingerprint.
            PermissionDenied: The caller may not end this lease.
            AuthorityError: Any other failure of the call.
        """
        request = _common.revoke_request(lease_id, fingerprint, release)
        timeout = self._timeout(timeout_seconds)

        try:
            response = self._stub.Revoke(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Revoke") from exc
        return RevokeResult(
            lease=LeaseInfo.from_proto(response.lease), already_ended=response.already_ended
        )

    def time_to_live(self, lease_id: str, *, timeout_seconds: float | None = None) -> LeaseInfo:
        """Describe one lease; unlike :meth:`renew`, this is not activity.

        Raises:
            ValueError: ``lease_id`` is empty.
            AuthorityError: The call failed.
        """
        request = pb.TimeToLiveRequest(lease_id=_common.check_lease_id(lease_id))
        timeout = self._timeout(timeout_seconds)

        try:
            response = self._stub.TimeToLive(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "TimeToLive") from exc
        return LeaseInfo.from_proto(response.lease)

    def list_leases_page(
        self,
        *,
        principal: str = "",
        tier: str = "",
        page_size: int = 100,
        page_token: str = "",
        timeout_seconds: float | None = None,
    ) -> tuple[list[LeaseInfo], str]:
        """Fetch one page of live leases.

        Args:
            principal: Only leases of this principal, when non-empty.
            tier: Only leases in this tier, when non-empty.
            page_size: At most this many leases; 0 means the authority's default.
            page_token: The token returned with the previous page, or empty for the first.
            timeout_seconds: Deadline of this call; defaults to the client's.

        Returns:
            The leases and the token of the next page, empty on the last page.

        Raises:
            ValueError: ``page_size`` is out of range.
            AuthorityError: The call failed.
        """
        request = _common.list_leases_request(principal, tier, page_size, page_token)
        timeout = self._timeout(timeout_seconds)

        try:
            response = self._stub.ListLeases(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "ListLeases") from exc
        return [LeaseInfo.from_proto(lease) for lease in response.leases], response.next_page_token

    def list_leases(
        self,
        *,
        principal: str = "",
        tier: str = "",
        page_size: int = 100,
        timeout_seconds: float | None = None,
    ) -> Iterator[LeaseInfo]:
        """Iterate over all live leases, fetching pages lazily.

        Each page is a separate call with its own deadline, so a lease may be
        missed or seen twice if the set changes between pages.

        Raises:
            ValueError: ``page_size`` is out of range (raised on the first ``next()``).
            AuthorityError: A page could not be fetched.
        """
        page_token = ""
        while True:
            leases, page_token = self.list_leases_page(
                principal=principal,
                tier=tier,
                page_size=page_size,
                page_token=page_token,
                timeout_seconds=timeout_seconds,
            )
            yield from leases
            if not page_token:
                return

    def validate(
        self,
        lease_id: str,
        method: str,
        *,
        caller_principal: str = "",
        timeout_seconds: float | None = None,
    ) -> ValidateResult:
        """Ask whether a call to ``method`` may proceed under a lease (for enforcers).

        Args:
            lease_id: The lease the call carries.
            method: Full method name, ``/package.Service/Method``.
            caller_principal: The caller's identity as the enforcer determined
                it (mTLS peer identity); empty skips the principal check.
            timeout_seconds: Deadline of this call; defaults to the client's.

        Raises:
            ValueError: ``lease_id`` is empty or ``method`` is malformed.
            AuthorityError: The call failed.
        """
        request = _common.validate_request(lease_id, method, caller_principal)
        timeout = self._timeout(timeout_seconds)

        try:
            response = self._stub.Validate(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Validate") from exc
        return ValidateResult.from_proto(response)

    def watch_session_ends(
        self, *, after_sequence: int = 0, instance_id: str = ""
    ) -> WatchStream:
        """Open the stream of session ends and heartbeats.

        The stream has no deadline and does not reconnect; a watcher that
        needs one resumes with the last sequence it saw.

        Args:
            after_sequence: Replay ends after this sequence; 0 starts from now.
            instance_id: The ``instance_id`` of the heartbeats seen before,
                when resuming. If the authority restarted since, sequences
                began again and the first event carries ``reset``.

        Raises:
            ValueError: ``after_sequence`` is negative.
        """
        request = _common.watch_request(after_sequence, instance_id)
        call = self._stub.WatchSessionEnds(request, metadata=self._metadata)
        return WatchStream(call)

    def now(self, *, timeout_seconds: float | None = None) -> datetime.datetime:
        """Return the authority's wall time (UTC-aware).

        Raises:
            AuthorityError: The call failed.
        """
        timeout = self._timeout(timeout_seconds)
        try:
            response = self._stub.Now(pb.NowRequest(), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Now") from exc
        return timestamp_to_datetime(response.now)

    def get_policy(self, *, timeout_seconds: float | None = None) -> PolicyInfo:
        """Return the tiers and method rules the authority enforces.

        Raises:
            AuthorityError: The call failed.
        """
        timeout = self._timeout(timeout_seconds)
        try:
            response = self._stub.GetPolicy(
                pb.GetPolicyRequest(), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "GetPolicy") from exc
        return PolicyInfo.from_proto(response)


_END_OF_REQUESTS = object()


class _ResponseStream(Protocol):
    # The part of a sync server-streaming call that WatchStream uses.
    def __next__(self) -> pb.WatchSessionEndsResponse: ...

    def cancel(self) -> bool: ...


class KeepAliveStream:
    """The ``KeepAlive`` bidirectional stream, matching each reply to its batch by sequence number.

    Threading: :meth:`send` and :meth:`close` may be called from any thread.
    A daemon thread reads the replies and completes the futures, so callbacks
    added to them run on that thread and must not block.

    When the stream breaks, every waiting future fails with the translated
    :class:`AuthorityError`, :attr:`error` stores it and later sends fail the
    same way. Reconnecting is the caller's job.
    """

    def __init__(self, stub: pb_grpc.SessionAuthorityStub, metadata: _common.Metadata) -> None:
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending: _common.PendingBatches[concurrent.futures.Future[RenewResult]] = (
            _common.PendingBatches()
        )
        self._state_lock = threading.Lock()
        self._closed_by_caller = False
        self._error: AuthorityError | None = None
        self._call = stub.KeepAlive(self._request_iterator(), metadata=metadata)
        self._reader = threading.Thread(
            target=self._read_responses, name="session-authority-keepalive", daemon=True
        )
        self._reader.start()

    def __enter__(self) -> KeepAliveStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once the stream can send no more: closed by the caller or broken."""
        with self._state_lock:
            return self._closed_by_caller or self._error is not None

    @property
    def error(self) -> AuthorityError | None:
        """The error that broke the stream, or None while it works or after a plain close()."""
        with self._state_lock:
            return self._error

    def send(self, entries: Sequence[tuple[str, float]]) -> concurrent.futures.Future[RenewResult]:
        """Send one renewal batch.

        Args:
            entries: ``(lease_id, idle_for_seconds)`` pairs.

        Returns:
            A future for the authority's reply. It fails with the stream's
            :class:`AuthorityError` if the stream breaks (or is already broken)
            before the reply arrives.

        Raises:
            ValueError: An entry is malformed.
            RuntimeError: :meth:`close` was called on this stream.
        """
        messages = _common.renew_entries(entries)
        future: concurrent.futures.Future[RenewResult] = concurrent.futures.Future()

        with self._state_lock:
            if self._closed_by_caller:
                raise RuntimeError("send() on a closed KeepAliveStream; open a new one with keep_alive()")
            error = self._error
            if error is None:
                sent_at_monotonic = time.monotonic()
                sequence = self._pending.add(future, sent_at_monotonic)
                self._requests.put(
                    pb.KeepAliveRequest(sequence=sequence, entries=messages)
                )
        if error is not None:
            future.set_exception(error)
        return future

    def close(self) -> None:
        """Cancel the stream; replies not yet received fail with a CANCELLED error. Idempotent."""
        with self._state_lock:
            if self._closed_by_caller:
                return
            self._closed_by_caller = True
        self._requests.put(_END_OF_REQUESTS)
        self._call.cancel()
        # A future's callback may call close() on the reader thread itself.
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def _request_iterator(self) -> Iterator[pb.KeepAliveRequest]:
        # gRPC pulls from this generator on its own thread; the sentinel ends
        # it on close() or when the reader finds the stream broken.
        while True:
            request = self._requests.get()
            if request is _END_OF_REQUESTS:
                return
            assert isinstance(request, pb.KeepAliveRequest)
            yield request

    def _read_responses(self) -> None:
        try:
            for response in self._call:
                self._complete(response)
        except grpc.RpcError as exc:
            error = self._stream_error(exc)
        else:
            error = AuthorityUnavailable(
                grpc.StatusCode.UNAVAILABLE,
                "the authority ended the KeepAlive stream",
                operation="KeepAlive",
            )
        finally:
            self._requests.put(_END_OF_REQUESTS)

        # Publish the error before draining: a send() that finds no error has
        # registered its future already, so the drain below reaches it.
        with self._state_lock:
            if not self._closed_by_caller:
                self._error = error
        logger.debug("KeepAlive stream ended: %s", error)
        for future in self._pending.drain():
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _stream_error(self, exc: grpc.RpcError) -> AuthorityError:
        with self._state_lock:
            closed_by_caller = self._closed_by_caller
        if closed_by_caller:
            return AuthorityError(
                grpc.StatusCode.CANCELLED,
                "the KeepAlive stream was closed before the reply arrived",
                operation="KeepAlive",
            )
        return translate_rpc_error(exc, "KeepAlive")

    def _complete(self, response: pb.KeepAliveResponse) -> None:
        pending = self._pending.pop(response.sequence)
        if pending is None:
            logger.warning(
                "KeepAlive reply with sequence %d matches no batch sent on this stream",
                response.sequence,
            )
            return
        future, sent_at_monotonic = pending
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = _common.renew_result(response.leases, sent_at_monotonic)
        except ValueError as exc:
            future.set_exception(exc)
            return
        future.set_result(result)


class WatchStream:
    """The ``WatchSessionEnds`` server stream, as an iterator of typed events.

    Iteration blocks until the next event. It stops after :meth:`cancel`
    (which any thread may call) or when the authority ends the stream, and
    raises :class:`AuthorityError` when the stream breaks. Events of kinds
    this client does not know are skipped.
    """

    def __init__(self, call: _ResponseStream) -> None:
        self._call = call
        self._cancelled = False

    def __iter__(self) -> WatchStream:
        return self

    def __next__(self) -> WatchEvent:
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as exc:
                if self._cancelled:
                    raise StopIteration from None
                raise translate_rpc_error(exc, "WatchSessionEnds") from exc
            event = watch_event_from_proto(message)
            if event is not None:
                return event
            logger.debug("skipping a WatchSessionEnds event of unknown kind")

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop the stream; a blocked iteration ends with StopIteration. Idempotent."""
        self._cancelled = True
        self._call.cancel()
