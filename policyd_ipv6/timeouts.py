"""Many timeouts of a few durations, with one reactor timer per duration.

Contract: ``Timeouts(clock).call(seconds, f, *args)`` calls ``f(*args)`` once, ``seconds``
from now (never earlier), unless the ``Timeout`` it returns is cancelled first; ``cancel()``
and ``active()`` mean what they mean on Twisted's ``DelayedCall``. A timeout that goes off
and raises is logged and does not stop the others.

Why not ``clock.callLater`` for each: the daemon arms a timeout for every DNS try and every
message's deadline, and nearly all of them are cancelled long before they go off. A
``DelayedCall`` costs a Python-level comparison for every step of the reactor's heap, on the
way in, on the way out and when the reactor rebuilds the heap after many cancellations. The
timeouts of one duration go off in the order they were armed, so each duration keeps its
own first-in first-out queue with a single reactor timer, set for the earliest live entry;
arming is an append and cancelling is one assignment. A cancelled entry stays in its queue
until its due time comes round (its callable and arguments are let go at once), and a queue
with no live entry drops its entries and its reactor timer, so an idle daemon keeps none.
The clock is anything with Twisted's ``seconds()`` and ``callLater()``; no other I/O.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from policyd_ipv6.vocabulary import Clock, DelayedCall

__all__ = ["Timeouts", "Timeout"]


class Timeout:
    """One armed timeout: ``cancel()`` stops it, ``active()`` until it went off or was
    cancelled."""

    __slots__ = ("due", "call", "args", "queue")

    def __init__(self, due: float, call: Any, args: tuple, queue: _Queue) -> None:
        self.due = due
        self.call = call
        self.args = args
        self.queue = queue

    def active(self) -> bool:
        return self.call is not None

    def cancel(self) -> None:
        if self.call is not None:
            self.call = None
            self.args = ()
            self.queue.cancelled()


class _Queue:
    """The timeouts of one duration, in the order they are due."""

    def __init__(self, clock: Clock, seconds: float, on_error: Any) -> None:
        self.clock = clock
        self.seconds = seconds
        self.on_error = on_error
        self.entries: deque[Timeout] = deque()
        self.live = 0
        self.timer: DelayedCall | None = None
        self.firing = False

    def add(self, call: Any, args: tuple) -> Timeout:
        entry = Timeout(self.clock.seconds() + self.seconds, call, args, self)
        self.entries.append(entry)
        self.live += 1
        if self.timer is None and not self.firing:
            self.timer = self.clock.callLater(self.seconds, self._fire)
        return entry

    def cancelled(self) -> None:
        self.live -= 1
        if self.live == 0 and not self.firing:
            self.entries.clear()
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    def _fire(self) -> None:
        self.timer = None
        self.firing = True
        entries = self.entries
        try:
            now = self.clock.seconds()
            while entries:
                head = entries[0]
                if head.call is None:
                    entries.popleft()
                    continue
                if head.due > now:
                    break
                entries.popleft()
                call, args = head.call, head.args
                head.call, head.args = None, ()
                self.live -= 1
                try:
                    call(*args)
                except Exception:
                    self.on_error()
        finally:
            self.firing = False
            while entries and entries[0].call is None:
                entries.popleft()
            if entries:
                self.timer = self.clock.callLater(max(0.0, entries[0].due - self.clock.seconds()),
                                                  self._fire)


class Timeouts:
    """See the module docstring. ``on_error`` is called (in the ``except`` block) when a
    timeout's callable raises; by default the exception is logged."""

    def __init__(self, clock: Clock, on_error: Any = None) -> None:
        self.clock = clock
        self.on_error = on_error or _log_failure
        self.queues: dict[float, _Queue] = {}

    def call(self, seconds: float, call: Any, *args: Any) -> Timeout:
        queue = self.queues.get(seconds)
        if queue is None:
            # A duration comes from the configuration: a reload may add one, and the old
            # one's queue empties by itself; queues without an entry are dropped here.
            for stale in [s for s, q in self.queues.items() if not q.entries]:
                del self.queues[stale]
            queue = self.queues[seconds] = _Queue(self.clock, seconds, self.on_error)
        return queue.add(call, args)


def _log_failure() -> None:
    from twisted.logger import Logger  # only on a bug: this module stays free of Twisted

    Logger(namespace="policyd-ipv6").failure("internal error in a timeout")
