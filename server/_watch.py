"""Fan-out of session ends to watch streams, with a replay buffer for resumes."""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import Callable

from ._table import SessionEnd

logger = logging.getLogger(__name__)

DEFAULT_REPLAY_SIZE = 65536
"""Ends kept for watchers that reconnect with ``after_sequence``."""

DEFAULT_SUBSCRIBER_BACKLOG = 100_000
"""Ends queued for one slow watcher before its stream is closed."""

REORDER_WAIT_SECONDS = 0.1
"""How long an end waits for the ends numbered before it, which another thread may still be handing over."""

WatchedEnd = tuple[int, bytes]
"""An end as the hub keeps it: its sequence, and the message that carries it, encoded once.

Measured with tracemalloc, such a tuple takes about 310 bytes, against about
580 for a :class:`SessionEnd` with its snapshot, and the replay buffer keeps
up to 65,536 of them by default.
"""


class Subscription:
    """One watch stream's queue. Owned by the event loop thread."""

    def __init__(self, backlog: int) -> None:
        self.queue: asyncio.Queue[WatchedEnd] = asyncio.Queue()
        self.backlog = backlog
        self.overflowed = False

    def put(self, end: WatchedEnd) -> None:
        # After the first dropped end the stream must stop at the gap, so every
        # later end is dropped too. The watcher resumes from the last end it
        # received, and the replay buffer fills the gap.
        if self.overflowed:
            return
        if self.queue.qsize() >= self.backlog:
            self.overflowed = True
            logger.warning("a watcher fell %d ends behind; its stream closes once it reaches the gap", self.backlog)
            return
        self.queue.put_nowait(end)


class WatchHub:
    """Receives ends from any thread and hands them to every subscriber.

    ``on_end`` is a lease table listener and may be called from any thread;
    it encodes the end and forwards it to the event loop. Everything else
    runs on the loop.

    Args:
        loop: The event loop of the authority's gRPC server.
        encode: Returns the encoded message that carries an end to watchers.
            Called once per end, on the thread that ended the lease.
        replay_size: Number of recent ends kept for resuming watchers.
        first_sequence: Sequence of the first end the table will report.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        encode: Callable[[SessionEnd], bytes],
        *,
        replay_size: int = DEFAULT_REPLAY_SIZE,
        subscriber_backlog: int = DEFAULT_SUBSCRIBER_BACKLOG,
        first_sequence: int = 1,
    ) -> None:
        self.instance_id = secrets.token_hex(8)
        self._loop = loop
        self._encode = encode
        self._recent: collections.deque[WatchedEnd] = collections.deque(maxlen=replay_size)
        self._subscribers: set[Subscription] = set()
        self._backlog = subscriber_backlog
        self.latest_sequence = first_sequence - 1
        # Watchers resume after the highest sequence they received, so ends
        # are sent in sequence order: one that overtook an earlier one waits.
        self._next_sequence = first_sequence
        self._waiting: dict[int, WatchedEnd] = {}
        self._release_timer: asyncio.TimerHandle | None = None

    # Table listener interface.

    def on_grant(self, lease: object) -> None:
        """Ignore grants: watchers only hear of ends."""

    def on_end(self, end: SessionEnd) -> None:
        """Encode an end and forward it to the event loop (any thread)."""
        watched = (end.sequence, self._encode(end))
        try:
            self._loop.call_soon_threadsafe(self._publish, watched)
        except RuntimeError:
            logger.debug("watch hub dropped end %d: event loop closed", end.sequence)

    # Event loop side.

    def _publish(self, end: WatchedEnd) -> None:
        # Two threads that end leases at once may hand their ends over in
        # either order. An end ahead of the next sequence waits, at most
        # REORDER_WAIT_SECONDS, for the ones before it.
        sequence = end[0]
        if sequence > self._next_sequence:
            self._waiting[sequence] = end
            if self._release_timer is None:
                self._release_timer = self._loop.call_later(REORDER_WAIT_SECONDS, self._release_waiting)
            return
        self._deliver(end)
        self._deliver_waiting()

    def _deliver_waiting(self) -> None:
        waiting = self._waiting
        while self._next_sequence in waiting:
            self._deliver(waiting.pop(self._next_sequence))
        if not waiting and self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None

    def _release_waiting(self) -> None:
        # The ends before the waiting ones did not come (an end whose
        # encoding failed is never handed over), so skip the gap.
        self._release_timer = None
        if not self._waiting:
            return
        first = min(self._waiting)
        logger.warning(
            "session ends %d to %d never reached the watch hub, so watchers get the ends after them without these",
            self._next_sequence,
            first - 1,
        )
        self._next_sequence = first
        self._deliver_waiting()

    def _deliver(self, end: WatchedEnd) -> None:
        sequence = end[0]
        recent = self._recent
        if recent and recent[-1][0] > sequence:
            # It came after the hub gave up waiting for it. Keep the replay buffer sorted anyway.
            logger.warning("session end %d reached the watch hub after later ends and is sent out of order", sequence)
            ordered = sorted([*recent, end], key=lambda e: e[0])
            recent.clear()
            recent.extend(ordered)
        else:
            recent.append(end)
        self._next_sequence = max(self._next_sequence, sequence + 1)
        self.latest_sequence = max(self.latest_sequence, sequence)
        for subscription in self._subscribers:
            subscription.put(end)

    def subscribe(self, after_sequence: int, instance_id: str) -> tuple[Subscription, list[WatchedEnd], bool]:
        """Register a watcher.

        Returns:
            The subscription, the ends to replay first, and whether the watcher
            must reset its cache because the ends it missed cannot be replayed.
        """
        subscription = Subscription(self._backlog)
        self._subscribers.add(subscription)
        if after_sequence == 0:
            return subscription, [], False
        if instance_id != self.instance_id or after_sequence > self.latest_sequence:
            return subscription, [], True
        replay = [end for end in self._recent if end[0] > after_sequence]
        oldest = self._recent[0][0] if self._recent else self.latest_sequence + 1
        complete = after_sequence + 1 >= oldest or after_sequence == self.latest_sequence
        return subscription, replay, not complete

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
