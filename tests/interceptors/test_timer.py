"""The enforcer's timer thread: order, cancellation and the memory a cancelled callback holds."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

from session_authority.interceptors._timer import Timer


@pytest.fixture
def timer() -> Iterator[Timer]:
    running = Timer()
    running.start()
    yield running
    running.close()


class _Callback:
    def __init__(self, ran: list[str], name: str) -> None:
        self.ran = ran
        self.name = name

    def __call__(self) -> None:
        self.ran.append(self.name)


def test_timer_runs_due_callbacks_in_time_order(timer: Timer) -> None:
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    timer.schedule(now + 0.02, _Callback(ran, "second"))
    timer.schedule(now, _Callback(ran, "first"))
    timer.schedule(now + 0.04, done.set)

    assert done.wait(5)
    assert ran == ["first", "second"]


def test_cancelled_callback_never_runs(timer: Timer) -> None:
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    handle = timer.schedule(now + 0.02, _Callback(ran, "cancelled"))
    timer.schedule(now + 0.04, done.set)
    timer.cancel(handle)
    timer.cancel(handle)

    assert done.wait(5)
    assert ran == []


def test_cancelled_callbacks_are_freed_before_their_time(timer: Timer) -> None:
    far = time.monotonic() + 3600.0
    pending = timer.schedule(far, _Callback([], "pending"))
    callbacks = [_Callback([], str(index)) for index in range(1000)]
    references = [weakref.ref(callback) for callback in callbacks]
    handles = [timer.schedule(far, callback) for callback in callbacks]
    del callbacks
    for handle in handles:
        timer.cancel(handle)
    gc.collect()

    assert all(reference() is None for reference in references)
    assert len(timer) == 1
    assert pending[0] is not None
