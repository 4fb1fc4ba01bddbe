"""The lease holder for ``grpc.aio`` channels, over the same core and keeper as :class:`Session`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Sequence

from session_authority.clients._errors import AuthorityError, NotFound
from session_authority.clients._keeper import WatchedEndCallback
from session_authority.clients._metadata import EndReason
from session_authority.clients._session import (
    DEFAULT_DRIFT_MARGIN_FIXED_SECONDS,
    DEFAULT_DRIFT_MARGIN_RATIO,
    Clock,
    EndCallback,
    EndPolicy,
    LeaseHolder,
    LeaseSnapshot,
    _SessionBase,
    warn_release_skipped,
)
from session_authority.clients._types import GrantedLease, RenewResult, SessionEndEvent

if TYPE_CHECKING:
    import grpc
    import grpc.aio

    from session_authority.clients._aio_client import AioAuthorityClient, AioKeepAliveStream
    from session_authority.clients._keeper import LeaseKeeper
    from session_authority.interceptors._aio_lease_channel import AioLeaseChannel

logger = logging.getLogger(__name__)


class AioSession(_SessionBase):
    """Holds one session lease for a principal and tier, for ``grpc.aio`` channels.

    The mirror of :class:`Session`::

        session = AioSession(AioAuthorityClient("authority:7000", api_key=key), tier="standard")
        channel = grpc.aio.insecure_channel(target, interceptors=session.aio_interceptors())

    Renewals run on the process-wide keeper thread, which sends them over the
    client's ``KeepAlive`` stream on the event loop that granted the lease.

    Threading: use the session on one event loop, the one its client belongs
    to. Properties may be read from any thread. ``on_end`` runs on that event
    loop; when it returns an awaitable, the session schedules it as a task.

    Args:
        client: The asyncio authority client used to grant, release and renew.
            The session does not close it.
        tier: The tier to ask for; empty lets the authority choose its default.
        principal: The principal to ask for, honoured only by an authority in
            insecure development mode.
        idle_timeout_seconds: Ask for a shorter idle timeout than the tier's.
        on_end: Called with the :class:`EndReason` when a lease ends, including
            ``released`` after :meth:`close`.
        end_policy: ``"raise"`` or ``"reauthenticate"``, as for :class:`Session`.
        watch: Subscribe to the authority's session ends (one stream per client).
        keeper: The keeper that renews; defaults to the process-wide one.
        drift_margin_ratio: Share of the remaining time subtracted from each
            local deadline.
        drift_margin_fixed_seconds: Fixed time subtracted from each local deadline.
        clock: Monotonic clock; must share ``time.monotonic``'s time base.

    Raises:
        ValueError: ``end_policy`` or a drift margin is invalid.
        TypeError: ``client`` is a blocking ``AuthorityClient``; use ``Session`` with it.
    """

    def __init__(
        self,
        client: AioAuthorityClient,
        *,
        tier: str = "",
        principal: str = "",
        idle_timeout_seconds: float | None = None,
        on_end: EndCallback | None = None,
        end_policy: EndPolicy = "raise",
        watch: bool = True,
        keeper: LeaseKeeper | None = None,
        drift_margin_ratio: float = DEFAULT_DRIFT_MARGIN_RATIO,
        drift_margin_fixed_seconds: float = DEFAULT_DRIFT_MARGIN_FIXED_SECONDS,
        clock: Clock = time.monotonic,
    ) -> None:
        from session_authority.clients._client import AuthorityClient

        if isinstance(client, AuthorityClient):
            # Its methods block and return results, which the first grant would fail to await.
            raise TypeError(
                "AioSession needs an AioAuthorityClient, got a blocking AuthorityClient;"
                " use Session with an AuthorityClient, or AioSession with an AioAuthorityClient"
            )
        super().__init__(
            tier=tier,
            principal=principal,
            idle_timeout_seconds=idle_timeout_seconds,
            on_end=on_end,
            end_policy=end_policy,
            watch=watch,
            keeper=keeper,
            drift_margin_ratio=drift_margin_ratio,
            drift_margin_fixed_seconds=drift_margin_fixed_seconds,
            clock=clock,
        )
        self._client = client
        self._grant_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callback_tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> AioSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AioSession lease={self.fingerprint} state={self.state.value}>"

    async def open(self) -> AioSession:
        """Grant the lease now instead of on the first call; a no-op while a lease is alive.

        Raises:
            SessionEnded: The session is closed, or the lease ended under the ``raise`` policy.
            AuthorityError: The grant failed.
            ValueError: The drift margin is at least the granted lease's time
                to live; the lease was released.
        """
        await self._lease_for_call()
        return self

    def aio_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Return the four interceptors to pass as ``interceptors=`` to a ``grpc.aio`` channel.

        ``grpc.aio`` files each interceptor under the first of the four call
        shapes it implements, so each shape needs its own object.
        """
        from session_authority.interceptors._aio_client import aio_lease_interceptors

        return aio_lease_interceptors(self)

    def channel(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        compression: grpc.Compression | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> AioLeaseChannel:
        """Open a ``grpc.aio`` channel to ``target`` that carries this session's lease on every call.

        Calls behave as on a channel opened with ``interceptors=self.aio_interceptors()``
        and cost less client CPU while the lease is alive (see
        :class:`~session_authority.interceptors.AioLeaseChannel`). Close it
        like any ``grpc.aio`` channel.

        Args:
            target: The server address.
            credentials: Channel credentials; None opens an insecure channel.
            options: gRPC channel options.
            compression: The channel's default compression.
            interceptors: Client interceptors to run after the session's.
        """
        from session_authority.interceptors._aio_lease_channel import AioLeaseChannel

        return AioLeaseChannel(
            self, target, credentials=credentials, options=options, compression=compression, interceptors=interceptors
        )

    async def _lease_for_call(self) -> LeaseSnapshot:
        snapshot = self._lease_for_call_nowait()
        if snapshot is not None:
            return snapshot
        async with self._grant_lock:
            if self._needs_grant_locked():
                self._loop = asyncio.get_running_loop()
                granted = await self._client.grant(**self._grant_kwargs())
                error = self._margin_error(granted)
                if error is not None:
                    await self._release_unused(granted)
                    raise error
                self._install(granted)
        snapshot = self._lease_for_call_nowait(granted_for_this_call=True)
        assert snapshot is not None
        return snapshot

    async def _release_unused(self, granted: GrantedLease) -> None:
        try:
            await self._client.revoke(granted.lease_id, release=True)
        except AuthorityError as exc:
            logger.warning("releasing unused lease %s failed: %s", granted.lease.fingerprint, exc)

    def _register(self, holder: LeaseHolder) -> None:
        loop = self._loop
        assert loop is not None
        self._keeper.register(
            holder,
            link_key=self._client,
            link_factory=lambda: AioLink(self._client, loop),
            on_watched_end=self._report_watched_end if self._watch else None,
        )

    def _dispatch_on_end(self, reason: EndReason) -> None:
        if self._on_end is None:
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            self._run_on_end(reason)
            return
        try:
            loop.call_soon_threadsafe(self._run_on_end, reason)
        except RuntimeError:
            logger.debug("event loop closed; on_end(%s) not delivered", reason.value)

    def _run_on_end(self, reason: EndReason) -> None:
        assert self._on_end is not None
        try:
            result = self._on_end(reason)
        except Exception:
            logger.exception("on_end callback failed")
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    async def close(self) -> None:
        """Release the lease (end reason ``released``) and refuse later calls. Idempotent.

        A release the authority cannot receive is logged. So is a release not
        sent because the authority client was closed first. In both cases the
        lease ends at the authority by its idle timeout.
        """
        holder = self._begin_close()
        if holder is None:
            return
        try:
            if self._client.closed:
                warn_release_skipped(holder.fingerprint)
            else:
                await self._client.revoke(holder.lease_id, release=True)
        except NotFound:
            logger.debug("lease %s was already gone at release", holder.fingerprint)
        except AuthorityError as exc:
            logger.warning("releasing lease %s failed: %s", holder.fingerprint, exc)
        finally:
            # As in Session.close, the lease ends here even when the release
            # raised, so on_end runs and the keeper drops it.
            holder.end(EndReason.RELEASED)


class AioLink:
    """A renewal link over an :class:`AioAuthorityClient`, driven from the keeper's thread.

    Every stream operation is handed to the client's event loop; the keeper
    receives ``concurrent.futures.Future`` objects it can wait on from its
    thread. As with the blocking link, a watch reconnect starts from now.
    """

    def __init__(self, client: AioAuthorityClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._stream: AioKeepAliveStream | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False
        self._background: set[asyncio.Task[Any]] = set()
        self.streams_opened = 0

    def send(self, entries: Sequence[tuple[str, float]]) -> concurrent.futures.Future[RenewResult]:
        coroutine = self._send(list(entries))
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:
            coroutine.close()
            raise

    async def _send(self, entries: list[tuple[str, float]]) -> RenewResult:
        if self._stream is None or self._stream.closed:
            old, self._stream = self._stream, self._client.keep_alive()
            self.streams_opened += 1
            if old is not None:
                self._spawn(old.close())
        return await self._stream.send(entries)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def reset(self) -> None:
        self._call_on_loop(self._reset_on_loop)

    def _reset_on_loop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._spawn(stream.close())

    def start_watch(self, on_end: WatchedEndCallback) -> None:
        self._call_on_loop(self._start_watch_on_loop, on_end)

    def _start_watch_on_loop(self, on_end: WatchedEndCallback) -> None:
        # A keeper may ask after the caller closed the client, as late as
        # asyncio.run's shutdown: a task created then would never run.
        if self._closed or self._client.closed or self._watch_task is not None:
            return
        self._watch_task = asyncio.ensure_future(self._watch(on_end))

    async def _watch(self, on_end: WatchedEndCallback) -> None:
        backoff = 0.1
        while not self._closed:
            if self._client.closed:
                logger.debug("session watch stopped: the authority client was closed")
                return
            try:
                async for event in self._client.watch_session_ends():
                    backoff = 0.1
                    if isinstance(event, SessionEndEvent):
                        on_end(event.lease.digest, event.lease.end_reason or EndReason.UNKNOWN)
            except AuthorityError as exc:
                logger.debug("session watch stream broke: %s; reconnecting in %.1f s", exc, backoff)
            except Exception:
                logger.exception("session watch failed; reconnecting in %.1f s", backoff)
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    def close(self) -> None:
        self._call_on_loop(self._close_on_loop)

    def _close_on_loop(self) -> None:
        self._closed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._reset_on_loop()

    def _call_on_loop(self, callback: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            logger.debug("event loop of a renewal link is closed; nothing to do")
