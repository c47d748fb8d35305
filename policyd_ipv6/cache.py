"""A bounded mapping whose entries expire: the one cache shape the daemon uses.

Contract: ``ExpiringCache(max_entries, clock, max_bytes=None)``; ``put(key, value,
ttl_seconds, size=0)`` stores (and evicts least recently used entries while there are more
than ``max_entries``, or their sizes add up to more than ``max_bytes``); ``get(key)`` returns
the value or ``None`` once it has expired or been evicted. ``size`` is the caller's estimate
of the memory an entry holds (``bytes`` tells the running total); ``hits`` and ``misses``
count the calls of ``get`` that found a live entry and those that did not (the metrics read
them). Time comes from the
injected clock (``clock.seconds()``), so tests use ``twisted.internet.task.Clock``. Not
thread-safe: it lives on the reactor thread.

With ``pack`` and ``unpack`` (inverse functions between a value and a plain tuple of
strings, bytes, numbers, booleans, None and tuples of them), a value is stored as the bytes of
``marshal.dumps(pack(value))`` and ``get`` returns ``unpack(marshal.loads(...))``: an entry is
then a tuple of a float, bytes and an int, which the garbage collector stops tracking at the
first collection that sees it, whatever the order it meets them in. A full cache of class
instances (or of nested tuples, which CPython untracks one level per collection) is hundreds
of thousands of objects that every full collection walks with the reactor stopped; as bytes it
is none, and smaller. With ``memo`` (a number of entries), the values most recently put or
unpacked are also kept as they are, so that the recipients of one message, arriving one after
another, do not unpack the same bytes again: at most ``memo`` objects, each dropped with its
entry, so ``get`` returns exactly what it would without them.
"""

from __future__ import annotations

import marshal
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from policyd_ipv6.vocabulary import Clock

__all__ = ["ExpiringCache", "MEMO"]

# The ``memo`` of the daemon's caches of facts: the messages and SPF results of the last few
# hundred requests, a few thousand small objects at most.
MEMO = 256

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    def __init__(self, max_entries: int, clock: Clock, max_bytes: int | None = None,
                 pack: Callable[[V], Any] | None = None,
                 unpack: Callable[[Any], V] | None = None, memo: int = 0) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if (pack is None) != (unpack is None):
            raise ValueError("pack and unpack go together")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self._pack, self._unpack = pack, unpack
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[K, tuple[float, Any, int]] = OrderedDict()
        # Unpacked values of live entries, most recent last (only with pack and unpack).
        self._memo: OrderedDict[K, V] = OrderedDict()
        self._memo_size = memo if pack is not None else 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        """The live value for ``key``, or None; a hit becomes the most recently used entry."""
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        expires, value, _size = item
        if expires <= self.clock.seconds():
            self.pop(key)
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        if self._unpack is None:
            return value
        found = self._memo.get(key)
        if found is None:
            found = self._unpack(marshal.loads(value))
            self._remember(key, found)
        return found

    def _remember(self, key: K, value: V) -> None:
        if self._memo_size:
            memo = self._memo
            memo[key] = value
            if len(memo) > self._memo_size:
                memo.popitem(last=False)

    def put(self, key: K, value: V, ttl_seconds: float, size: int = 0) -> None:
        """Store ``value`` for ``ttl_seconds`` (nothing is stored for a TTL of 0 or less, nor
        an entry larger than ``max_bytes`` on its own)."""
        # pop() and _remember() written out: a cold message stores three or four entries.
        data, memo = self._data, self._memo
        old = data.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
            memo.pop(key, None)
        max_bytes = self.max_bytes
        if ttl_seconds <= 0 or (max_bytes is not None and size > max_bytes):
            return
        stored = value if self._pack is None else marshal.dumps(self._pack(value))
        data[key] = (self.clock.seconds() + ttl_seconds, stored, size)
        self.bytes += size
        if self._memo_size:
            memo[key] = value
            if len(memo) > self._memo_size:
                memo.popitem(last=False)
        while len(data) > self.max_entries or (max_bytes is not None and self.bytes > max_bytes):
            evicted_key, (_expires, _value, evicted) = data.popitem(last=False)
            self.bytes -= evicted
            memo.pop(evicted_key, None)

    def pop(self, key: K) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self.bytes -= item[2]
            self._memo.pop(key, None)
