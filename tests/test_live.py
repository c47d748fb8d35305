"""live: Settings follow the snapshot in force once attached; a swap of ``now`` reaches every
attached part in that assignment; a part never attached keeps its own values."""

import gc
from types import SimpleNamespace

import pytest

from policyd_ipv6.live import InForce, Live, Setting

pytestmark = pytest.mark.unit


class Part:
    timeout = Setting("dns_timeout_seconds")
    policy = Setting("policy", derived=True)
    live = None

    def __init__(self) -> None:
        self.timeout = 1.0
        self.policy = "own"


class Child(Part):
    attempts = Setting("dns_attempts")

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 1


def snapshot(timeout: float, attempts: int, policy: str) -> InForce:
    config = SimpleNamespace(dns_timeout_seconds=timeout, dns_attempts=attempts)
    return InForce(config, policy=policy)


def test_attached_part_reads_the_snapshot_and_follows_each_swap() -> None:
    live = Live(snapshot(2.0, 3, "first"))
    part, child, alone = Part(), Child(), Part()
    live.attach(part)
    live.attach(child)
    assert part.live is live
    assert (part.timeout, part.policy) == (2.0, "first")
    assert (child.timeout, child.attempts, child.policy) == (2.0, 3, "first")
    live.now = snapshot(4.0, 5, "second")
    assert (part.timeout, part.policy) == (4.0, "second")
    assert (child.timeout, child.attempts, child.policy) == (4.0, 5, "second")
    assert live.config.dns_timeout_seconds == 4.0
    # never attached: its own values, whatever the swaps
    assert (alone.timeout, alone.policy, alone.live) == (1.0, "own", None)


def test_a_value_assigned_to_an_attached_part_lasts_until_the_next_swap() -> None:
    live = Live(snapshot(2.0, 3, "first"))
    part = Part()
    live.attach(part)
    part.timeout = 9.0
    assert part.timeout == 9.0
    live.now = snapshot(6.0, 3, "first")
    assert part.timeout == 6.0


def test_an_unset_setting_names_itself() -> None:
    bare = Part.__new__(Part)
    with pytest.raises(AttributeError, match="Part.timeout: neither assigned nor attached"):
        bare.timeout  # noqa: B018
    assert isinstance(Part.timeout, Setting)


def test_live_does_not_keep_its_parts_alive() -> None:
    live = Live(snapshot(2.0, 3, "first"))
    part = Part()
    live.attach(part)
    del part
    gc.collect()
    live.now = snapshot(3.0, 3, "x")  # nothing left to write to
    assert len(live._parts) == 0
