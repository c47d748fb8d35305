"""timeouts: each goes off once, never early, in arming order per duration; cancelled ones
never; an idle Timeouts keeps no reactor timer; a raising callable is reported and the
others still run. A property test holds it to Twisted's own callLater on random schedules."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task

from policyd_ipv6.timeouts import Timeouts

pytestmark = pytest.mark.unit


def test_goes_off_once_at_its_time_and_in_order() -> None:
    clock = task.Clock()
    timeouts, fired = Timeouts(clock), []
    timeouts.call(2.0, fired.append, "a")
    clock.advance(0.5)
    b = timeouts.call(2.0, fired.append, "b")
    clock.advance(1.4)
    assert fired == []
    clock.advance(0.1)  # 2.0 after a
    assert fired == ["a"] and b.active()
    clock.advance(0.4)
    assert fired == ["a"]
    clock.advance(0.1)
    assert fired == ["a", "b"] and not b.active()
    clock.advance(10)
    assert fired == ["a", "b"] and clock.getDelayedCalls() == []


def test_cancelled_never_fires_and_the_last_cancel_drops_the_timer() -> None:
    clock = task.Clock()
    timeouts, fired = Timeouts(clock), []
    a = timeouts.call(1.0, fired.append, "a")
    timeouts.call(1.0, fired.append, "b")
    assert len(clock.getDelayedCalls()) == 1  # one reactor timer for the duration
    a.cancel()
    a.cancel()  # twice: no effect
    assert not a.active() and a.args == ()
    clock.advance(1.0)
    assert fired == ["b"]
    c = timeouts.call(1.0, fired.append, "c")
    c.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(5)
    assert fired == ["b"]


def test_durations_have_queues_of_their_own() -> None:
    clock = task.Clock()
    timeouts, fired = Timeouts(clock), []
    timeouts.call(5.0, fired.append, "slow")
    timeouts.call(1.0, fired.append, "fast")
    assert len(clock.getDelayedCalls()) == 2
    clock.advance(1.0)
    assert fired == ["fast"]
    clock.advance(4.0)
    assert fired == ["fast", "slow"]


def test_arming_from_a_timeout_and_a_raising_one() -> None:
    clock = task.Clock()
    errors = []
    timeouts, fired = Timeouts(clock, on_error=lambda: errors.append(1)), []

    def again(name: str) -> None:
        fired.append(name)
        timeouts.call(1.0, fired.append, name + "+")

    def boom() -> None:
        raise RuntimeError("bug")

    timeouts.call(1.0, again, "a")
    timeouts.call(1.0, boom)
    timeouts.call(1.0, fired.append, "c")
    clock.advance(1.0)
    assert fired == ["a", "c"] and errors == [1]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)
    assert fired == ["a", "c", "a+"] and clock.getDelayedCalls() == []


def test_a_raising_timeout_is_logged_by_default() -> None:
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = task.Clock()
        timeouts = Timeouts(clock)
        timeouts.call(1.0, lambda: 1 / 0)
        clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("log_format") == "internal error in a timeout"
               and e["log_failure"].check(ZeroDivisionError) for e in events)


def test_a_stale_duration_queue_is_dropped() -> None:
    clock = task.Clock()
    timeouts = Timeouts(clock)
    timeouts.call(1.0, lambda: None)
    clock.advance(1.0)
    timeouts.call(2.0, lambda: None)  # a reload changed the duration
    assert list(timeouts.queues) == [2.0]


# Each step: arm a timeout of one of three durations, cancel an earlier one, or let time pass.
_steps = st.lists(st.one_of(
    st.tuples(st.just("arm"), st.sampled_from([0.5, 1.0, 3.0])),
    st.tuples(st.just("cancel"), st.integers(min_value=0, max_value=40)),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5]))), max_size=60)


@settings(max_examples=200, deadline=None)
@given(_steps)
def test_same_firings_as_call_later(steps) -> None:
    mine, theirs = task.Clock(), task.Clock()
    timeouts = Timeouts(mine)
    fired_mine: list[tuple[float, int]] = []
    fired_theirs: list[tuple[float, int]] = []
    handles: list[tuple] = []
    for kind, value in steps:
        if kind == "arm":
            n = len(handles)
            handles.append((
                timeouts.call(value, lambda n=n: fired_mine.append((mine.seconds(), n))),
                theirs.callLater(value, lambda n=n: fired_theirs.append((theirs.seconds(), n)))))
        elif kind == "cancel" and value < len(handles):
            a, b = handles[value]
            assert a.active() == b.active()
            if b.active():
                a.cancel()
                b.cancel()
        elif kind == "wait":
            mine.advance(value)
            theirs.advance(value)
    mine.advance(10)
    theirs.advance(10)
    # The same timeouts at the same times; within one instant, arming order per duration.
    assert sorted(fired_mine) == sorted(fired_theirs)
    assert mine.getDelayedCalls() == []
