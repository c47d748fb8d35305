"""The garbage collection policy (daemon.collector): short automatic collections only, the
old generation collected and frozen on the reactor, frozen garbage found by a rare full
collection, every pause counted; and a decision that leaves no cyclic garbage behind."""

from __future__ import annotations

import gc
import weakref

import pytest
from test_policy_server import Harness, replies, request
from twisted.internet import task
from twisted.logger import globalLogPublisher

from policyd_ipv6.daemon.collector import (
    BUCKETS,
    CHECK_SECONDS,
    MIDDLE,
    MIN_GROWTH,
    NEVER,
    PROMOTIONS,
    TICK_SECONDS,
    WARN_SECONDS,
    YOUNG,
    Collector,
)

pytestmark = pytest.mark.unit


class FakeGc:
    """The parts of the gc module the collector uses, recording what it was asked."""

    def __init__(self, frozen: int = 60_000) -> None:
        self.callbacks: list = []
        self.calls: list = []
        self.count = [0, 0, 0]
        self.frozen = frozen
        self.threshold = (700, 10, 10)

    def collect(self, generation: int = 2) -> int:
        self.calls.append(("collect", generation))
        self.run(generation, 0.0, [0.0])
        for younger in range(generation + 1):
            self.count[younger] = 0
        return 0

    def freeze(self) -> None:
        self.calls.append(("freeze",))

    def unfreeze(self) -> None:
        self.calls.append(("unfreeze",))

    def get_freeze_count(self) -> int:
        return self.frozen

    def get_count(self) -> tuple[int, int, int]:
        return tuple(self.count)  # type: ignore[return-value]

    def set_threshold(self, *threshold: int) -> None:
        self.threshold = threshold

    def run(self, generation: int, seconds: float, timer: list[float]) -> None:
        """One collection of ``generation`` lasting ``seconds``, as CPython reports it."""
        for callback in list(self.callbacks):
            callback("start", {"generation": generation})
        timer[0] += seconds
        if generation < 2:
            self.count[generation + 1] += 1
        for callback in list(self.callbacks):
            callback("stop", {"generation": generation, "collected": 0, "uncollectable": 0})


class FakeReactor:
    def __init__(self) -> None:
        self.clock = task.Clock()
        self.pending: list = []

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay, f, *args):
        return self.clock.callLater(delay, f, *args)

    def callFromThread(self, f, *args) -> None:
        self.pending.append((f, args))

    def turn(self) -> None:
        pending, self.pending = self.pending, []
        for f, args in pending:
            f(*args)


def started(frozen: int = 60_000):
    fake, reactor, timer = FakeGc(frozen), FakeReactor(), [0.0]
    c = Collector(reactor, gc_module=fake, timer=lambda: timer[0])
    c.start()
    fake.calls.clear()
    return c, fake, reactor, timer


def test_start_freezes_start_up_and_never_collects_the_old_generation_by_itself():
    """start() collects, freezes, hooks its callback and sets thresholds that leave the old
    generation to the collector."""
    fake, reactor = FakeGc(), FakeReactor()
    c = Collector(reactor, gc_module=fake)
    c.start()
    assert fake.calls == [("collect", 2), ("freeze",)]
    assert fake.threshold == (YOUNG, MIDDLE, NEVER)
    assert c._callback in fake.callbacks and c.baseline == 60_000
    c.stop()
    assert fake.callbacks == [] and reactor.clock.getDelayedCalls() == []


def test_survivors_are_frozen_on_the_reactor_after_a_middle_collection():
    """After PROMOTIONS middle collections one collection and a freeze are scheduled, and
    they run on the reactor's next turn, not inside the collector's callback."""
    c, fake, reactor, timer = started()
    for _ in range(PROMOTIONS - 1):
        fake.run(1, 0.001, timer)
    assert reactor.pending == []
    fake.run(1, 0.001, timer)
    fake.run(1, 0.001, timer)  # already due: scheduled once
    assert fake.calls == [] and len(reactor.pending) == 1
    reactor.turn()
    assert fake.calls == [("collect", 1), ("freeze",)]


def test_every_pause_is_counted_in_its_generation_and_bucket():
    """Each collection's duration lands in its generation's bucket; longest keeps the max."""
    c, fake, reactor, timer = started()
    fake.run(0, 0.0004, timer)
    fake.run(0, 0.003, timer)
    fake.run(2, 0.2, timer)
    assert sum(c.pauses[0]) == 2 and sum(c.pauses[2]) == 1 and sum(c.pauses[1]) == 0
    assert c.pauses[0][0] == 1 and c.pauses[0][BUCKETS.index(.005)] == 1
    assert c.pauses[2][BUCKETS.index(.25)] == 1
    assert c.longest == pytest.approx(0.2)
    assert c.pause_sum[0] == pytest.approx(0.0034)


def test_a_long_pause_is_logged_as_a_warning_once_the_reactor_runs():
    """A pause over WARN_SECONDS gives one warning naming its generation and length, logged
    from the reactor, never from inside the collection."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        c, fake, reactor, timer = started()
        fake.run(0, WARN_SECONDS / 2, timer)
        fake.run(1, 0.12, timer)
        assert [e for e in events if "garbage collection" in e.get("log_format", "")] == []
        reactor.turn()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if "garbage collection" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert warnings[0]["generation"] == 1 and warnings[0]["ms"] == pytest.approx(120)


def test_frozen_garbage_is_looked_for_when_the_frozen_objects_grew_by_half():
    """A full collection (unfreeze, collect, freeze) runs once the frozen objects grew past
    half again their number after the last one, checked at most every CHECK_SECONDS."""
    c, fake, reactor, timer = started(frozen=200_000)
    fake.frozen = 290_000  # +45 %: not yet
    reactor.clock.advance(CHECK_SECONDS)
    c._collect_old()
    assert ("unfreeze",) not in fake.calls
    fake.frozen = 310_000  # +55 %, but checked less than CHECK_SECONDS ago
    reactor.clock.advance(CHECK_SECONDS / 2)
    c._collect_old()
    assert ("unfreeze",) not in fake.calls
    reactor.clock.advance(CHECK_SECONDS / 2)
    fake.calls.clear()
    c._collect_old()
    assert fake.calls == [("collect", 1), ("freeze",), ("unfreeze",), ("collect", 2),
                          ("freeze",)]
    assert c.full_collections == 1 and c.baseline == 310_000


def test_a_small_heap_grows_by_at_least_min_growth_before_a_full_collection():
    """With few frozen objects the bound is MIN_GROWTH more, not half again."""
    c, fake, reactor, timer = started(frozen=10_000)
    fake.frozen = 10_000 + MIN_GROWTH
    reactor.clock.advance(CHECK_SECONDS)
    c._collect_old()
    assert c.full_collections == 0
    fake.frozen += 1
    reactor.clock.advance(CHECK_SECONDS)
    c._collect_old()
    assert c.full_collections == 1


class Node:
    def __init__(self) -> None:
        self.other: object = self


@pytest.fixture
def real_gc():
    threshold = gc.get_threshold()
    yield gc
    gc.unfreeze()
    gc.set_threshold(*threshold)
    gc.collect()


def test_real_gc_cycle_frozen_while_alive_is_freed_by_the_full_collection(real_gc):
    """With the real gc: a cycle alive at the freeze survives the old collection, and
    collect_all frees it once it is garbage."""
    reactor = FakeReactor()
    c = Collector(reactor)
    try:
        c.start()
        node = Node()
        alive = weakref.ref(node)
        c._collect_old()  # node is frozen now
        del node
        gc.collect()
        assert alive() is not None  # frozen objects are out of every collection
        c.collect_all()
        assert alive() is None
        assert gc.get_threshold() == (YOUNG, MIDDLE, NEVER)
    finally:
        c.stop()
    assert c._callback not in gc.callbacks


def test_real_gc_collections_are_timed(real_gc):
    """With the real gc: the callback times a collection it did not start itself."""
    c = Collector(FakeReactor())
    try:
        c.start()
        before = sum(c.pauses[1])
        gc.collect(1)
        assert sum(c.pauses[1]) == before + 1
        assert c.pause_sum[1] > 0
    finally:
        c.stop()


def test_a_decision_from_known_facts_leaves_no_cyclic_garbage():
    """Decisions answered from known facts (the warm path) free everything they built by
    reference counting: the garbage collector finds nothing after them."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(request())
    gc.collect()
    gc.disable()
    try:
        for i in range(20):
            proto.dataReceived(request(instance=f"i{i}"))
            proto.dataReceived(request(instance=f"j{i}", recipient="x@fabrikam.com"))
        found = gc.collect()
    finally:
        gc.enable()
    assert len(replies(transport)) == 41
    assert found == 0


def test_the_young_generation_is_collected_every_tick_whatever_the_count():
    """Each TICK_SECONDS the young generation is collected (the middle one when MIDDLE young
    collections are behind it), and everything is frozen after PROMOTIONS middle ones."""
    c, fake, reactor, timer = started()
    for _ in range(MIDDLE + 1):
        reactor.clock.advance(TICK_SECONDS)
    assert fake.calls == [("collect", 0)] * MIDDLE + [("collect", 1)]
    assert PROMOTIONS == 1 and len(reactor.pending) == 1
    reactor.turn()
    assert fake.calls[-2:] == [("collect", 1), ("freeze",)]
    assert reactor.pending == []  # its own middle collection schedules no other freeze
    c.stop()
    calls = len(fake.calls)
    reactor.clock.advance(TICK_SECONDS * 10)
    assert len(fake.calls) == calls
