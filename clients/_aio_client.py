"""Asyncio client for the SessionAuthority RPCs, over a ``grpc.aio.Channel``."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from types import TracebackType
from typing import AsyncIterator, Sequence

import grpc
import grpc.aio

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


class AioAuthorityClient:
    """Typed asyncio client for the session authority; the mirror of :class:`AuthorityClient`.

    Every method sends the client's API key and principal (when set), applies
    a deadline and raises :class:`AuthorityError` subclasses instead of
    ``grpc.RpcError``.

    Threading: create and use an instance on one event loop only, as a
    ``grpc.aio.Channel`` requires. Cancelling a method's task cancels its RPC.

    Args:
        target: ``host:port`` of the authority. The client opens a channel to
            it (TLS when ``credentials`` is given, else plaintext) and closes
            it in :meth:`close`.
        channel: An existing ``grpc.aio`` channel to use instead of ``target``;
            the caller keeps ownership and closes it.
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
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        principal: str | None = None,
        timeout_seconds: float = _common.DEFAULT_TIMEOUT_SECONDS,
        options: _Options = (),
    ) -> None:
        self._metadata = _common.build_metadata(api_key, principal)
        self._timeout_seconds = _common.check_timeout_seconds(timeout_seconds)
        if (target is None) == (channel is None):
            raise ValueError("AioAuthorityClient needs exactly one of target='host:port' or channel=")
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
                self._channel = grpc.aio.secure_channel(target, credentials, options=list(options))
            else:
                self._channel = grpc.aio.insecure_channel(target, options=list(options))
            self._owns_channel = True
        self._stub = pb_grpc.SessionAuthorityStub(self._channel)
        self._closed = False

    async def __aenter__(self) -> AioAuthorityClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel if this client opened it; idempotent."""
        self._closed = True
        if self._owns_channel:
            await self._channel.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called, even when the channel was the caller's and stays open."""
        return self._closed

    def _timeout(self, timeout_seconds: float | None) -> float | None:
        if timeout_seconds is None:
            return self._timeout_seconds
        return _common.check_timeout_seconds(timeout_seconds)

    async def grant(
        self,
        tier: str = "",
        *,
        principal: str = "",
        idle_timeout_seconds: float | None = None,
        timeout_seconds: float | None = None,
    ) -> GrantedLease:
        """Ask the authority for a new lease; see :meth:`AuthorityClient.grant`."""
        request = _common.grant_request(tier, principal, idle_timeout_seconds)
        timeout = self._timeout(timeout_seconds)

        sent_at_monotonic = time.monotonic()
        try:
            response = await self._stub.Grant(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Grant") from exc
        granted = GrantedLease(
            lease_id=response.lease_id,
            lease=LeaseInfo.from_proto(response.lease),
            sent_at_monotonic=sent_at_monotonic,
        )
        logger.debug("granted lease %s in tier %s", granted.fingerprint, granted.lease.tier)
        return granted

    async def renew(
        self, entries: Sequence[tuple[str, float]], *, timeout_seconds: float | None = None
    ) -> RenewResult:
        """Report activity on several leases in one call; see :meth:`AuthorityClient.renew`."""
        messages = _common.renew_entries(entries)
        timeout = self._timeout(timeout_seconds)

        sent_at_monotonic = time.monotonic()
        if not messages:
            return RenewResult(leases=[], sent_at_monotonic=sent_at_monotonic)
        try:
            response = await self._stub.Renew(
                pb.RenewRequest(entries=messages), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Renew") from exc
        return _common.renew_result(response.leases, sent_at_monotonic)

    def keep_alive(self) -> AioKeepAliveStream:
        """Open the batched renewal stream; call it from a coroutine on the client's loop.

        The stream has no deadline and does not reconnect: when it breaks,
        open a new one.
        """
        return AioKeepAliveStream(self._stub, self._metadata)

    async def revoke(
        self,
        lease_id: str | None = None,
        *,
        fingerprint: str | None = None,
        release: bool = False,
        timeout_seconds: float | None = None,
    ) -> RevokeResult:
        """End a lease now; see :meth:`AuthorityClient.revoke`."""
        request = _common.revoke_request(lease_id, fingerprint, release)
        timeout = self._timeout(timeout_seconds)

        try:
            response = await self._stub.Revoke(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Revoke") from exc
        return RevokeResult(
            lease=LeaseInfo.from_proto(response.lease), already_ended=response.already_ended
        )

    async def time_to_live(
        self, lease_id: str, *, timeout_seconds: float | None = None
    ) -> LeaseInfo:
        """Describe one lease without counting as activity; see :meth:`AuthorityClient.time_to_live`."""
        request = pb.TimeToLiveRequest(lease_id=_common.check_lease_id(lease_id))
        timeout = self._timeout(timeout_seconds)

        try:
            response = await self._stub.TimeToLive(
                request, metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "TimeToLive") from exc
        return LeaseInfo.from_proto(response.lease)

    async def list_leases_page(
        self,
        *,
        principal: str = "",
        tier: str = "",
        page_size: int = 100,
        page_token: str = "",
        timeout_seconds: float | None = None,
    ) -> tuple[list[LeaseInfo], str]:
        """Fetch one page of live leases; see :meth:`AuthorityClient.list_leases_page`."""
        request = _common.list_leases_request(principal, tier, page_size, page_token)
        timeout = self._timeout(timeout_seconds)

        try:
            response = await self._stub.ListLeases(
                request, metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "ListLeases") from exc
        return [LeaseInfo.from_proto(lease) for lease in response.leases], response.next_page_token

    async def list_leases(
        self,
        *,
        principal: str = "",
        tier: str = "",
        page_size: int = 100,
        timeout_seconds: float | None = None,
    ) -> AsyncIterator[LeaseInfo]:
        """Iterate over all live leases, fetching pages lazily; see :meth:`AuthorityClient.list_leases`."""
        page_token = ""
        while True:
            leases, page_token = await self.list_leases_page(
                principal=principal,
                tier=tier,
                page_size=page_size,
                page_token=page_token,
                timeout_seconds=timeout_seconds,
            )
            for lease in leases:
                yield lease
            if not page_token:
                return

    async def validate(
        self,
        lease_id: str,
        method: str,
        *,
        caller_principal: str = "",
        timeout_seconds: float | None = None,
    ) -> ValidateResult:
        """Ask whether a call may proceed under a lease; see :meth:`AuthorityClient.validate`."""
        request = _common.validate_request(lease_id, method, caller_principal)
        timeout = self._timeout(timeout_seconds)

        try:
            response = await self._stub.Validate(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Validate") from exc
        return ValidateResult.from_proto(response)

    def watch_session_ends(
        self, *, after_sequence: int = 0, instance_id: str = ""
    ) -> AioWatchStream:
        """Open the stream of session ends and heartbeats; see :meth:`AuthorityClient.watch_session_ends`.

        Call it from a coroutine on the client's loop and iterate with ``async for``.
        """
        request = _common.watch_request(after_sequence, instance_id)
        call = self._stub.WatchSessionEnds(request, metadata=self._metadata)
        return AioWatchStream(call)

    async def now(self, *, timeout_seconds: float | None = None) -> datetime.datetime:
        """Return the authority's wall time (UTC-aware)."""
        timeout = self._timeout(timeout_seconds)
        try:
            response = await self._stub.Now(
                pb.NowRequest(), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "Now") from exc
        return timestamp_to_datetime(response.now)

    async def get_policy(self, *, timeout_seconds: float | None = None) -> PolicyInfo:
        """Return the tiers and method rules the authority enforces."""
        timeout = self._timeout(timeout_seconds)
        try:
            response = await self._stub.GetPolicy(
                pb.GetPolicyRequest(), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, "GetPolicy") from exc
        return PolicyInfo.from_proto(response)


class AioKeepAliveStream:
    """The ``KeepAlive`` bidirectional stream, matching each reply to its batch by sequence number.

    Threading: use it on the event loop that opened it. Any number of tasks
    may await :meth:`send` at once. A writer task sends the batches, so
    cancelling a waiting :meth:`send` abandons that reply without cancelling
    the stream (``grpc.aio`` cancels the whole call when a task is cancelled
    inside ``write()``).

    When the stream breaks, every waiting :meth:`send` raises the translated
    :class:`AuthorityError`, :attr:`error` stores it and later sends raise it
    too. Reconnecting is the caller's job.
    """

    def __init__(self, stub: pb_grpc.SessionAuthorityStub, metadata: _common.Metadata) -> None:
        loop = asyncio.get_running_loop()
        self._call = stub.KeepAlive(metadata=metadata)
        self._outbox: asyncio.Queue[pb.KeepAliveRequest | None] = asyncio.Queue()
        self._pending: _common.PendingBatches[asyncio.Future[RenewResult]] = (
            _common.PendingBatches()
        )
        self._closed_by_caller = False
        self._error: AuthorityError | None = None
        self._reader = loop.create_task(self._read_responses())
        self._writer = loop.create_task(self._write_requests())

    async def __aenter__(self) -> AioKeepAliveStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True once the stream can send no more: closed by the caller or broken."""
        return self._closed_by_caller or self._error is not None

    @property
    def error(self) -> AuthorityError | None:
        """The error that broke the stream, or None while it works or after a plain close()."""
        return self._error

    async def send(self, entries: Sequence[tuple[str, float]]) -> RenewResult:
        """Send one renewal batch and wait for the authority's reply.

        Args:
            entries: ``(lease_id, idle_for_seconds)`` pairs.

        Returns:
            One lease per entry, in order, with the local monotonic send time.

        Raises:
            ValueError: An entry is malformed.
            RuntimeError: :meth:`close` was called on this stream.
            AuthorityError: The stream broke before the reply arrived.
        """
        messages = _common.renew_entries(entries)
        if self._closed_by_caller:
            raise RuntimeError(
                "send() on a closed AioKeepAliveStream; open a new one with keep_alive()"
            )
        if self._error is not None:
            raise self._error

        future: asyncio.Future[RenewResult] = asyncio.get_running_loop().create_future()
        sent_at_monotonic = time.monotonic()
        sequence = self._pending.add(future, sent_at_monotonic)
        self._outbox.put_nowait(pb.KeepAliveRequest(sequence=sequence, entries=messages))
        # A cancelled wait cancels the future but leaves it registered, so its
        # late reply is recognised and dropped.
        return await future

    async def close(self) -> None:
        """Cancel the stream; sends still waiting raise a CANCELLED error. Idempotent."""
        if self._closed_by_caller:
            return
        self._closed_by_caller = True
        self._outbox.put_nowait(None)
        self._call.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)

    async def _write_requests(self) -> None:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            try:
                await self._call.write(request)
            except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                # The reader receives the call's final status and fails the batches.
                logger.debug("KeepAlive write failed, stream is over: %r", exc)
                return

    async def _read_responses(self) -> None:
        error: AuthorityError
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                self._complete(response)
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from read() after call.cancel().
            error = self._cancelled_error()
            if not self._closed_by_caller:
                self._fail(error)
                raise
        except grpc.RpcError as exc:
            if self._closed_by_caller:
                error = self._cancelled_error()
            else:
                error = translate_rpc_error(exc, "KeepAlive")
        else:
            error = AuthorityUnavailable(
                grpc.StatusCode.UNAVAILABLE,
                "the authority ended the KeepAlive stream",
                operation="KeepAlive",
            )
        self._fail(error)

    def _fail(self, error: AuthorityError) -> None:
        if not self._closed_by_caller:
            self._error = error
        logger.debug("KeepAlive stream ended: %s", error)
        self._outbox.put_nowait(None)
        for future in self._pending.drain():
            if not future.done():
                future.set_exception(error)

    @staticmethod
    def _cancelled_error() -> AuthorityError:
        return AuthorityError(
            grpc.StatusCode.CANCELLED,
            "the KeepAlive stream was closed before the reply arrived",
            operation="KeepAlive",
        )

    def _complete(self, response: pb.KeepAliveResponse) -> None:
        pending = self._pending.pop(response.sequence)
        if pending is None:
            logger.warning(
                "KeepAlive reply with sequence %d matches no batch waiting on this stream",
                response.sequence,
            )
            return
        future, sent_at_monotonic = pending
        if future.done():
            return
        try:
            future.set_result(_common.renew_result(response.leases, sent_at_monotonic))
        except ValueError as exc:
            future.set_exception(exc)


def _current_task_cancelling() -> bool:
    # Task.cancelling() exists from Python 3.11. On 3.10 this returns False,
    # so a cancelled reading task that also cancelled the stream stops quietly.
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if callable(cancelling) else False


class AioWatchStream:
    """The ``WatchSessionEnds`` server stream, as an async iterator of typed events.

    Iteration stops after :meth:`cancel` or when the authority ends the
    stream, and raises :class:`AuthorityError` when the stream breaks. Events
    of kinds this client does not know are skipped.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._cancelled = False

    def __aiter__(self) -> AioWatchStream:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            try:
                message = await self._call.read()
            except asyncio.CancelledError:
                # Raised both when this task is cancelled and after cancel();
                # only the second ends the iteration quietly.
                if self._cancelled and not _current_task_cancelling():
                    raise StopAsyncIteration from None
                raise
            except grpc.RpcError as exc:
                if self._cancelled:
                    raise StopAsyncIteration from None
                raise translate_rpc_error(exc, "WatchSessionEnds") from exc
            if message is grpc.aio.EOF:
                raise StopAsyncIteration
            event = watch_event_from_proto(message)
            if event is not None:
                return event
            logger.debug("skipping a WatchSessionEnds event of unknown kind")

    async def __aenter__(self) -> AioWatchStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop the stream; a waiting iteration ends with StopAsyncIteration. Idempotent."""
        self._cancelled = True
        self._call.cancel()
