"""When Python's cyclic garbage collector runs, so that no collection holds the reactor long.

Contract: ``Collector(reactor, gc_module=gc, timer=time.perf_counter)``; ``start()`` (once,
when start-up is over) collects, freezes what start-up built (modules, configuration,
tables: they never die), sets the thresholds and hooks ``gc.callbacks``; ``stop()`` unhooks
it. The reactor needs ``seconds()``, ``callLater`` (the tick) and ``callFromThread(f)``
(thread-safe: a collection may run on any thread).
Every collection is timed: ``pauses`` counts them per generation in the histogram buckets
``BUCKETS`` (with ``pause_sum``), ``longest`` is the longest pause so far (seconds), and a
pause over ``WARN_SECONDS`` is logged once the reactor gets control back. It never collects
inside a callback and never logs or takes a lock there (the callback runs in the middle of
whatever code allocated; ``metrics`` reads the plain counts at scrape time).

Why (issue 12, item 5): a collection walks every tracked object of its generation with the
reactor stopped. The caches hold hundreds of thousands of tracked objects, so a full
collection took 0.1-0.5 s, and a young threshold of 20,000 made each young collection free
some 20,000 objects of cyclic garbage at once (20-120 ms). The policy:

- The young and middle generations are collected automatically, with thresholds that keep
  them small (``YOUNG``, ``MIDDLE``): their pauses stay at a few milliseconds (15 at most at
  100 connections of cold mail, the code making no cyclic garbage). CPython counts
  allocations minus deallocations, so while frozen cache entries die as fast as new ones are
  made the young generation grows without ever reaching its threshold: every ``TICK_SECONDS``
  the reactor collects the young generation (the middle one when it is due) all the same.
- The old generation is never collected automatically. After ``PROMOTIONS`` middle
  collection (it moves its survivors to the old generation), the next reactor turn collects
  the young and middle generations once more and freezes everything (``gc.freeze``): the
  old generation holds nothing unfrozen, a frozen object is never walked again, and it is
  still freed the usual way when its last reference goes. So each object is walked at most
  a few times while young, in batches the thresholds and the tick keep small.
- A cycle that becomes garbage after it was frozen is only found by a full collection
  (``gc.unfreeze``, collect, freeze again). One runs when the frozen objects have grown by
  ``GROWTH`` over their number after the last full one (checked at most every
  ``CHECK_SECONDS``), so such garbage never holds more than half the live heap again: memory
  stays bounded. Its pause is that of a full collection; it is logged if long, and is rare
  once the caches are full and the code makes little cyclic garbage.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

__all__ = ["Collector", "BUCKETS", "YOUNG", "MIDDLE", "PROMOTIONS", "GROWTH", "TICK_SECONDS",
           "WARN_SECONDS"]

_log = Logger(namespace="policyd-ipv6")

# A young collection walks the tracked objects alive at that moment (a cold decision under way
# holds a few dozen: its Deferreds, closures, generators), so its pause hardly depends on how
# long since the last one: at 100 connections of cold mail, 2 ms every 0.1 s, 7 ms every
# second. Rarer collections are nearly free of cost: 2,000 and 0.1 s spent 8 % of the CPU of
# cold decisions collecting, 10,000 and 1 s spend 1.5 %, with pauses under 15 ms (bench/README).
YOUNG = 10_000  # net new tracked objects between young collections
MIDDLE = 4  # young collections between middle collections
PROMOTIONS = 1  # middle collections between freezes
GROWTH = 0.5  # frozen objects may grow by half before a full collection looks at them
MIN_GROWTH = 50_000  # ... and by at least this many (start-up alone freezes ~60,000)
CHECK_SECONDS = 60.0  # counting the frozen objects walks them: at most once a minute
TICK_SECONDS = 1.0  # the young generation is collected at least this often
WARN_SECONDS = 0.05  # a pause this long is logged (smtpd clients all wait meanwhile)
NEVER = 1 << 30  # the old generation's threshold: never reached
BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5)


class Collector:
    """See the module docstring."""

    def __init__(self, reactor: Any, gc_module: Any = gc,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.reactor = reactor
        self.gc = gc_module
        self.timer = timer
        # Per generation: how many pauses fell in each bucket (the last one: over them all).
        self.pauses = [[0] * (len(BUCKETS) + 1) for _ in range(3)]
        self.pause_sum = [0.0, 0.0, 0.0]
        self.longest = 0.0
        self.full_collections = 0
        self.baseline = 0  # frozen objects after the last full collection
        self._started = 0.0  # perf counter at the start of the collection under way
        self._old_due = False
        self._middles = 0  # middle collections since the last freeze
        self._warn_due: list[tuple[int, float]] = []
        self._checked_at = 0.0
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = reactor

    def start(self) -> None:
        """Collect and freeze what start-up built; from now on, this policy."""
        gc_ = self.gc
        gc_.collect()
        gc_.freeze()
        self.baseline = gc_.get_freeze_count()
        self._checked_at = self.reactor.seconds()
        gc_.set_threshold(YOUNG, MIDDLE, NEVER)
        gc_.callbacks.append(self._callback)
        self._ticker.start(TICK_SECONDS, now=False)

    def stop(self) -> None:
        if self._ticker.running:
            self._ticker.stop()
        if self._callback in self.gc.callbacks:
            self.gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        # Runs inside the collector, on whatever thread allocated: plain arithmetic only.
        now = self.timer()
        if phase == "start":
            self._started = now
            return
        generation = min(int(info.get("generation", 0)), 2)
        pause = now - self._started
        self._count(generation, pause)
        if generation == 1:
            self._middles += 1
            if not self._old_due and self._middles >= PROMOTIONS:
                self._old_due = True
                self.reactor.callFromThread(self._collect_old)
        if pause > WARN_SECONDS:
            if not self._warn_due:
                self.reactor.callFromThread(self._warn)
            if len(self._warn_due) < 10:
                self._warn_due.append((generation, pause))

    def _count(self, generation: int, pause: float) -> None:
        bucket = 0
        while bucket < len(BUCKETS) and pause > BUCKETS[bucket]:
            bucket += 1
        self.pauses[generation][bucket] += 1
        self.pause_sum[generation] += pause
        if pause > self.longest:
            self.longest = pause

    def _tick(self) -> None:
        """The young generation (with the middle one when due), whatever CPython's count."""
        gc_ = self.gc
        gc_.collect(1 if gc_.get_count()[1] >= MIDDLE else 0)
        if not self._old_due and self._middles >= PROMOTIONS:
            self._collect_old()

    def _collect_old(self) -> None:
        """The young and middle generations' garbage collected, then everything frozen."""
        gc_ = self.gc
        gc_.collect(1)  # its own callback must not schedule another: still due meanwhile
        gc_.freeze()
        self._middles = 0
        self._old_due = False
        now = self.reactor.seconds()
        if now - self._checked_at < CHECK_SECONDS:
            return
        self._checked_at = now
        frozen = gc_.get_freeze_count()
        if frozen > self.baseline + max(MIN_GROWTH, self.baseline * GROWTH):
            self.collect_all()

    def collect_all(self) -> int:
        """A full collection, frozen objects included, then freeze again; returns how many
        objects it found unreachable."""
        gc_ = self.gc
        gc_.unfreeze()
        found = gc_.collect()
        gc_.freeze()
        self.baseline = gc_.get_freeze_count()
        self.full_collections += 1
        return int(found)

    def _warn(self) -> None:
        due, self._warn_due = self._warn_due, []
        for generation, pause in due:
            _log.warn("garbage collection of generation {generation} held every connection "
                      "for {ms:.0f} ms (longest so far {longest:.0f} ms)",
                      generation=generation, ms=pause * 1000, longest=self.longest * 1000)

