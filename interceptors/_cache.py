"""Bounded caches of the enforcer: a least-recently-used map whose items expire."""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


class ExpiringLru(Generic[_Key, _Value]):
    """A map of at most ``max_size`` items, each dropped ``ttl_seconds`` after it was put.

    Putting an item into a full map drops the least recently used one. Not
    thread-safe: the enforcer calls it under its own lock.

    Args:
        max_size: Most items kept; at least 1.
        ttl_seconds: Lifetime of an item, or None to keep items until they
            are pushed out by newer ones.
    """

    def __init__(self, max_size: int, ttl_seconds: float | None) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self._max_size = max_size
        self._ttl_seconds = ttl_seconds
        self._items: collections.OrderedDict[_Key, tuple[_Value, float]] = collections.OrderedDict()

    def get(self, key: _Key, now: float) -> _Value | None:
        """Return the live value for ``key`` and mark it recently used, or None."""
        item = self._items.get(key)
        if item is None:
            return None
        value, expires_at = item
        if now >= expires_at:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: _Key, value: _Value, now: float) -> None:
        """Insert or replace ``key``, dropping the least recently used item when full."""
        expires_at = float("inf") if self._ttl_seconds is None else now + self._ttl_seconds
        self._items[key] = (value, expires_at)
        self._items.move_to_end(key)
        while len(self._items) > self._max_size:
            self._items.popitem(last=False)

    def discard(self, key: _Key) -> None:
        """Remove ``key`` if present."""
        self._items.pop(key, None)

    def clear(self) -> None:
        """Remove every item."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
