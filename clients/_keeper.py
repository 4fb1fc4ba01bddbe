"""The process-wide lease keeper: renews the leases of all sessions in batches over shared streams."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import grpc

from session_authority.clients._errors import AuthorityError
from session_authority.clients._metadata import EndReason
from session_authority.clients._types import RenewResult, SessionEndEvent

if TYPE_CHECKING:
    from session_authority.clients._client import AuthorityClient, KeepAliveStream, WatchStream
    from session_authority.clients._session import LeaseHolder

logger = logging.getLogger(__name__)

MAX_BATCH_ENTRIES = 1000
"""Renewal entries per ``KeepAlive`` message; the authority rejects larger messages."""

DEFAULT_RENEWAL_TIMEOUT_SECONDS = 5.0
"""Maximum wait for a renewal reply before the batch counts as failed and the stream is reopened."""

MIN_RENEWAL_TIMEOUT_SECONDS = 0.25
"""Shortest wait for a renewal reply, however short the idle timeouts are."""

MAX_SLEEP_SECONDS = 1.0
"""Maximum time the keeper thread sleeps between two looks at its leases."""

WatchedEndCallback = Callable[[str, EndReason], None]
"""Called with a lease digest and the reason when the watch stream reports an end."""


class RenewalLink(Protocol):
    """One connection to one authority: a ``KeepAlive`` stream and an optional watch stream.

    Threading: the keeper calls every method from its own thread. Futures may
    complete on any thread.
    """

    streams_opened: int

    def send(self, entries: Sequence[tuple[str, float]]) -> concurrent.futures.Future[RenewResult]:
        """Send one batch, opening (or reopening) the stream when needed."""
        ...

    def reset(self) -> None:
        """Drop the current stream (it seems hung); the next send opens a new one."""
        ...

    def start_watch(self, on_end: WatchedEndCallback) -> None:
        """Start following the authority's session ends, reconnecting until closed."""
        ...

    def close(self) -> None:
        """Close both streams; never raises."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class KeeperStats:
    """Counters of one keeper, for tests and diagnostics.

    Attributes:
        batches_sent: Renewal batches sent over all links.
        renewals_failed: Batches that failed (error or timeout).
        streams_opened: ``KeepAlive`` streams opened over all links, past and present.
        links: Links currently open (one per authority client with live leases).
        leases: Leases currently kept.
    """

    batches_sent: int
    renewals_failed: int
    streams_opened: int
    links: int
    leases: int


@dataclasses.dataclass(eq=False)
class _Batch:
    holders: list[tuple[LeaseHolder, float]]
    timeout_at: float
    finished: bool = False


@dataclasses.dataclass(eq=False)
class _LinkEntry:
    key: object
    factory: Callable[[], RenewalLink]
    link: RenewalLink | None = None
    holders: dict[int, LeaseHolder] = dataclasses.field(default_factory=dict)
    watchers: dict[int, WatchedEndCallback] = dataclasses.field(default_factory=dict)
    watching: bool = False
    in_flight: list[_Batch] = dataclasses.field(default_factory=list)
    reset_needed: bool = False


class LeaseKeeper:
    """Renews the leases of many sessions from one background thread, in batches.

    Each authority client gets one link: one ``KeepAlive`` stream shared by
    every lease granted through that client, and one watch stream shared by
    the sessions that asked to watch. A lease is renewed only when activity
    happened since its last successful renewal and a third of its idle
    timeout has passed since the previous renewal was sent; each entry
    carries ``idle_for``, the time since the latest activity, so batching
    never stretches an idle timeout. Failed renewals (the authority
    unreachable, a broken or silent stream) are retried with exponential
    backoff and jitter until the lease's local deadline; the stream is
    reopened on the next send. The keeper also ends leases locally when
    their deadline passes.

    Threading: every public method may be called from any thread. The
    thread starts with the first registration and is a daemon thread.

    Args:
        clock: Monotonic clock; must share ``time.monotonic``'s time base.
        renewal_timeout_seconds: Maximum wait for a renewal reply. Each
            batch waits at most a third of the shortest idle timeout in it,
            and at least 0.25 s.
    """

    _shared: LeaseKeeper | None = None
    _shared_lock = threading.Lock()

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        renewal_timeout_seconds: float = DEFAULT_RENEWAL_TIMEOUT_SECONDS,
    ) -> None:
        if not renewal_timeout_seconds > 0:
            raise ValueError(
                f"renewal_timeout_seconds must be > 0, got {renewal_timeout_seconds!r}"
            )
        self._clock = clock
        self._renewal_timeout = renewal_timeout_seconds
        self._condition = threading.Condition()
        self._links: dict[int, _LinkEntry] = {}
        self._holder_links: dict[int, _LinkEntry] = {}
        self._woken = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._batches_sent = 0
        self._renewals_failed = 0
        self._closed_streams_opened = 0

    @classmethod
    def shared(cls) -> LeaseKeeper:
        """Return the keeper of this process, creating it on first use."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared._stopped:
                cls._shared = cls()
            return cls._shared

    # -- registration ------------------------------------------------------------

    def register(
        self,
        holder: LeaseHolder,
        *,
        link_key: object,
        link_factory: Callable[[], RenewalLink],
        on_watched_end: WatchedEndCallback | None = None,
    ) -> None:
        """Keep ``holder`` renewed over the link of ``link_key`` (an authority client).

        Args:
            holder: The lease to keep.
            link_key: Leases with the same key share one link; use the
                authority client object.
            link_factory: Builds the link the first time the key is seen.
            on_watched_end: When given, the link watches session ends and
                calls this for each; the session matches the digest.

        Raises:
            RuntimeError: The keeper was closed.
        """
        with self._condition:
            if self._stopped:
                raise RuntimeError("register() on a closed LeaseKeeper; use a new keeper")
            entry = self._links.get(id(link_key))
            if entry is None or entry.key is not link_key:
                entry = _LinkEntry(key=link_key, factory=link_factory)
                self._links[id(link_key)] = entry
            entry.holders[id(holder)] = holder
            if on_watched_end is not None:
                entry.watchers[id(holder)] = on_watched_end
            self._holder_links[id(holder)] = entry
            self._start_thread_locked()
            self._woken = True
            self._condition.notify()

    def unregister(self, holder: LeaseHolder) -> None:
        """Stop keeping ``holder``; its link closes when no lease uses it any more."""
        with self._condition:
            entry = self._holder_links.pop(id(holder), None)
            if entry is not None:
                entry.holders.pop(id(holder), None)
                entry.watchers.pop(id(holder), None)
            self._woken = True
            self._condition.notify()

    def wake(self) -> None:
        """Make the keeper look at its leases now (a lease became due for renewal)."""
        with self._condition:
            self._woken = True
            self._condition.notify()

    def close(self) -> None:
        """Stop the thread and close every link. Leases then end by their local deadlines."""
        with self._condition:
            self._stopped = True
            self._condition.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def stats(self) -> KeeperStats:
        """A snapshot of the keeper's counters."""
        with self._condition:
            streams = self._closed_streams_opened + sum(
                entry.link.streams_opened for entry in self._links.values() if entry.link
            )
            return KeeperStats(
                batches_sent=self._batches_sent,
                renewals_failed=self._renewals_failed,
                streams_opened=streams,
                links=sum(1 for entry in self._links.values() if entry.link is not None),
                leases=len(self._holder_links),
            )

    def _start_thread_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="session-authority-lease-keeper", daemon=True
            )
            self._thread.start()

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._condition:
                    if self._stopped:
                        break
                    self._woken = False
                    entries = list(self._links.values())
                next_wake = self._clock() + MAX_SLEEP_SECONDS
                for entry in entries:
                    try:
                        next_wake = min(next_wake, self._serve(entry))
                    except Exception:
                        logger.exception("lease keeper failed to serve a link; retrying later")
                with self._condition:
                    if not self._woken and not self._stopped:
                        self._condition.wait(max(0.0, next_wake - self._clock()))
        finally:
            self._close_all()

    def _serve(self, entry: _LinkEntry) -> float:
        """Renew what is due on one link; return when the keeper must look again."""
        now = self._clock()
        next_wake = now + MAX_SLEEP_SECONDS
        self._expire_batches(entry, now)
        with self._condition:
            holders = list(entry.holders.values())
            watchers = bool(entry.watchers)
            in_flight = [batch.timeout_at for batch in entry.in_flight]

        if not holders and not in_flight:
            self._drop_link(entry)
            return next_wake
        link = self._link_of(entry)
        if entry.reset_needed:
            entry.reset_needed = False
            link.reset()
        if watchers and not entry.watching:
            entry.watching = True
            link.start_watch(lambda digest, reason: self._dispatch_watched_end(entry, digest, reason))

        due: list[LeaseHolder] = []
        # Leases whose renewal is not due yet but may go early with a batch that is sent anyway.
        early: list[LeaseHolder] = []
        for holder in holders:
            if holder.check_deadline(now):
                continue
            next_wake = min(next_wake, holder.local_deadline)
            due_at = holder.renewal_due_at()
            if due_at is None:
                continue
            if due_at <= now:
                due.append(holder)
                continue
            next_wake = min(next_wake, due_at)
            # A regular renewal may go out up to half its interval early. So leases
            # due within that window join the batch of a due lease, instead of one
            # batch per lease when leases were granted at different moments.
            if not holder.renewal_failures and due_at - holder.idle_timeout_seconds / 6 <= now:
                early.append(holder)
        if due:
            due += early
        for start in range(0, len(due), MAX_BATCH_ENTRIES):
            self._send(entry, link, due[start : start + MAX_BATCH_ENTRIES], now)
        # Read the in-flight batches again: the ones just sent must time out
        # on schedule too, not a full idle sleep later.
        with self._condition:
            in_flight = [batch.timeout_at for batch in entry.in_flight]
        for timeout_at in in_flight:
            next_wake = min(next_wake, timeout_at)
        return next_wake

    def _link_of(self, entry: _LinkEntry) -> RenewalLink:
        if entry.link is None:
            entry.link = entry.factory()
        return entry.link

    def _send(self, entry: _LinkEntry, link: RenewalLink, due: list[LeaseHolder], now: float) -> None:
        sent: list[tuple[LeaseHolder, float]] = []
        entries: list[tuple[str, float]] = []
        for holder in due:
            renewal = holder.begin_renewal(now)
            if renewal is None:
                continue
            lease_id, idle_for, activity_time = renewal
            entries.append((lease_id, idle_for))
            sent.append((holder, activity_time))
        if not sent:
            return
        shortest_idle = min(holder.idle_timeout_seconds for holder, _ in sent)
        timeout = max(MIN_RENEWAL_TIMEOUT_SECONDS, min(self._renewal_timeout, shortest_idle / 3))
        batch = _Batch(holders=sent, timeout_at=now + timeout)
        with self._condition:
            self._batches_sent += 1
        try:
            future = link.send(entries)
        except Exception as exc:
            logger.debug("renewal batch of %d leases not sent: %r", len(sent), exc)
            self._fail_batch(entry, batch, exc)
            return
        with self._condition:
            entry.in_flight.append(batch)
        future.add_done_callback(lambda done: self._batch_done(entry, batch, done))

    def _batch_done(
        self, entry: _LinkEntry, batch: _Batch, future: concurrent.futures.Future[RenewResult]
    ) -> None:
        # Runs on the thread that completed the future (a gRPC reader thread or an event loop).
        with self._condition:
            if batch.finished:
                return
            batch.finished = True
            if batch in entry.in_flight:
                entry.in_flight.remove(batch)
        if future.cancelled():
            self._fail_batch(entry, batch, concurrent.futures.CancelledError(), finished=True)
            return
        error = future.exception()
        if error is not None:
            self._fail_batch(entry, batch, error, finished=True)
            return
        result = future.result()
        if len(result.leases) != len(batch.holders):
            self._fail_batch(
                entry,
                batch,
                AuthorityError(
                    grpc.StatusCode.INTERNAL,
                    f"the authority returned {len(result.leases)} leases for "
                    f"{len(batch.holders)} renewal entries",
                    operation="KeepAlive",
                ),
                finished=True,
            )
            return
        for (holder, activity_time), lease in zip(batch.holders, result.leases):
            holder.finish_renewal(lease, result.sent_at_monotonic, activity_time)
        self.wake()

    def _fail_batch(
        self, entry: _LinkEntry, batch: _Batch, error: BaseException, *, finished: bool = False
    ) -> None:
        with self._condition:
            if not finished:
                batch.finished = True
            self._renewals_failed += 1
        for holder, _ in batch.holders:
            holder.fail_renewal(error)
        self.wake()

    def _expire_batches(self, entry: _LinkEntry, now: float) -> None:
        with self._condition:
            expired = [batch for batch in entry.in_flight if batch.timeout_at <= now and not batch.finished]
            for batch in expired:
                batch.finished = True
                entry.in_flight.remove(batch)
            if expired:
                entry.reset_needed = True
        for batch in expired:
            logger.debug("renewal batch of %d leases timed out; reopening the stream", len(batch.holders))
            self._fail_batch(
                entry, batch, TimeoutError("no renewal reply in time"), finished=True
            )

    def _dispatch_watched_end(self, entry: _LinkEntry, digest: str, reason: EndReason) -> None:
        with self._condition:
            watchers = list(entry.watchers.values())
        for on_end in watchers:
            try:
                on_end(digest, reason)
            except Exception:
                logger.exception("a session's watched-end callback failed")

    def _drop_link(self, entry: _LinkEntry) -> None:
        with self._condition:
            if entry.holders or entry.in_flight:
                return
            if self._links.get(id(entry.key)) is entry:
                del self._links[id(entry.key)]
            link, entry.link = entry.link, None
            if link is not None:
                self._closed_streams_opened += link.streams_opened
        if link is not None:
            link.close()

    def _close_all(self) -> None:
        with self._condition:
            entries = list(self._links.values())
            self._links.clear()
        for entry in entries:
            if entry.link is not None:
                entry.link.close()


class SyncLink:
    """A :class:`RenewalLink` over a blocking :class:`AuthorityClient`.

    The watch runs on its own daemon thread and reconnects with backoff.
    Sequences restart when the authority restarts, so a reconnect starts
    from now instead of resuming; ends missed while disconnected still reach
    the session through its renewals and rejected calls.
    """

    def __init__(self, client: AuthorityClient) -> None:
        self._client = client
        self._stream: KeepAliveStream | None = None
        self._closed = threading.Event()
        self._watch_lock = threading.Lock()
        self._watch_stream: WatchStream | None = None
        self._watch_thread: threading.Thread | None = None
        self.streams_opened = 0

    def send(self, entries: Sequence[tuple[str, float]]) -> concurrent.futures.Future[RenewResult]:
        if self._stream is None or self._stream.closed:
            if self._stream is not None:
                self._stream.close()
            self._stream = self._client.keep_alive()
            self.streams_opened += 1
        return self._stream.send(entries)

    def reset(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def start_watch(self, on_end: WatchedEndCallback) -> None:
        self._watch_thread = threading.Thread(
            target=self._watch, args=(on_end,), name="session-authority-session-watch", daemon=True
        )
        self._watch_thread.start()

    def _watch(self, on_end: WatchedEndCallback) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            with self._watch_lock:
                if self._closed.is_set():
                    return
                if self._client.closed:
                    logger.debug("session watch stopped: the authority client was closed")
                    return
                stream = self._client.watch_session_ends()
                self._watch_stream = stream
            try:
                for event in stream:
                    backoff = 0.1
                    if isinstance(event, SessionEndEvent):
                        on_end(event.lease.digest, event.lease.end_reason or EndReason.UNKNOWN)
            except AuthorityError as exc:
                logger.debug("session watch stream broke: %s; reconnecting in %.1f s", exc, backoff)
            except Exception:
                logger.exception("session watch failed; reconnecting in %.1f s", backoff)
            if self._closed.wait(backoff):
                return
            backoff = min(2.0, backoff * 2)

    def close(self) -> None:
        self._closed.set()
        with self._watch_lock:
            watch_stream = self._watch_stream
        if watch_stream is not None:
            watch_stream.cancel()
        self.reset()
