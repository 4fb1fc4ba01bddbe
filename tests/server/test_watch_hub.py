"""WatchHub: ends reach watchers in sequence order, and resumes never skip one."""

from __future__ import annotations

import asyncio
import logging

import pytest

from session_authority.server._table import NOT_FOUND, SessionEnd
from session_authority.server._watch import REORDER_WAIT_SECONDS, WatchHub


def end(sequence: int) -> SessionEnd:
    return SessionEnd(sequence=sequence, lease=NOT_FOUND, ended_at=float(sequence))


def encode(session_end: SessionEnd) -> bytes:
    return str(session_end.sequence).encode()


def drain(queue: asyncio.Queue[tuple[int, bytes]]) -> list[int]:
    sequences = []
    while queue.qsize():
        sequences.append(queue.get_nowait()[0])
    return sequences


async def settle() -> None:
    # call_soon_threadsafe callbacks run on the next passes of the loop.
    for _ in range(3):
        await asyncio.sleep(0)


def test_overtaking_end_waits_for_earlier() -> None:
    async def scenario() -> tuple[list[int], list[int], list[int]]:
        hub = WatchHub(asyncio.get_running_loop(), encode, first_sequence=10)
        watcher, _, _ = hub.subscribe(0, hub.instance_id)
        hub.on_end(end(11))
        await settle()
        before = drain(watcher.queue)
        hub.on_end(end(10))
        await settle()
        after = drain(watcher.queue)
        # A watcher whose stream broke after end 10 resumes after it.
        _, replay, reset = hub.subscribe(10, hub.instance_id)
        assert not reset
        return before, after, [sequence for sequence, _ in replay]

    before, after, replayed = asyncio.run(scenario())

    assert before == []
    assert after == [10, 11]
    assert replayed == [11]


def test_missing_end_released_after_wait(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        hub = WatchHub(asyncio.get_running_loop(), encode, first_sequence=1)
        watcher, _, _ = hub.subscribe(0, hub.instance_id)
        hub.on_end(end(1))
        hub.on_end(end(3))
        await settle()
        early = drain(watcher.queue)
        await asyncio.sleep(REORDER_WAIT_SECONDS * 3)
        return early, drain(watcher.queue)

    with caplog.at_level(logging.WARNING, logger="session_authority.server._watch"):
        early, late = asyncio.run(scenario())

    assert early == [1]
    assert late == [3]
    assert "session ends 2 to 2 never reached the watch hub" in caplog.text


def test_in_order_ends_sent_at_once() -> None:
    async def scenario() -> list[int]:
        hub = WatchHub(asyncio.get_running_loop(), encode, first_sequence=5)
        watcher, _, _ = hub.subscribe(0, hub.instance_id)
        for sequence in range(5, 9):
            hub.on_end(end(sequence))
        await settle()
        return drain(watcher.queue)

    assert asyncio.run(scenario()) == [5, 6, 7, 8]
