"""A bounded mapping whose entries expire: the one cache shape the daemon uses.

Contract: ``ExpiringCache(max_entries, clock)``; ``put(key, value, ttl_seconds)`` stores (and
evicts the least recently used entry when full); ``get(key)`` returns the value or ``None`` once
it has expired or been evicted. Time comes from the injected clock (``clock.seconds()``), so
tests use ``twisted.internet.task.Clock``. Not thread-safe: it lives on the reactor thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from policyd_ipv6.vocabulary import Clock

__all__ = ["ExpiringCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    def __init__(self, max_entries: int, clock: Clock) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        """The live value for ``key``, or None; a hit becomes the most recently used entry."""
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self.clock.seconds():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V, ttl_seconds: float) -> None:
        """Store ``value`` for ``ttl_seconds`` (nothing is stored for a TTL of 0 or less)."""
        if ttl_seconds <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self.clock.seconds() + ttl_seconds, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)
