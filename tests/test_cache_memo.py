"""ExpiringCache's memo of unpacked values: the value put (or first unpacked) is returned as
it is while its entry lives; expiry, eviction and pop end it with the entry; the memo holds
at most its size; without pack/unpack there is no memo."""

from dataclasses import dataclass

import pytest
from twisted.internet import task

from policyd_ipv6.cache import ExpiringCache

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Value:
    text: str

    def packed(self) -> tuple:
        return (self.text,)

    @classmethod
    def unpacked(cls, packed: tuple) -> "Value":
        return cls(*packed)


def cache(max_entries=10, memo=2):
    clock = task.Clock()
    return ExpiringCache(max_entries, clock, pack=Value.packed, unpack=Value.unpacked,
                         memo=memo), clock


def test_the_value_put_comes_back_as_it_is_until_it_expires():
    c, clock = cache()
    v = Value("a")
    c.put("k", v, 10)
    assert c.get("k") is v
    clock.advance(10)
    assert c.get("k") is None and len(c._memo) == 0


def test_the_memo_is_bounded_and_an_older_entry_is_unpacked_again():
    c, clock = cache(memo=2)
    values = [Value(str(i)) for i in range(3)]
    for i, v in enumerate(values):
        c.put(i, v, 10)
    assert len(c._memo) == 2
    again = c.get(0)  # out of the memo: unpacked from its bytes
    assert again == values[0] and again is not values[0]
    assert c.get(0) is again  # and remembered
    assert len(c._memo) == 2


def test_eviction_and_pop_drop_the_memo_with_the_entry():
    c, clock = cache(max_entries=2, memo=5)
    for i in range(3):
        c.put(i, Value(str(i)), 10)
    assert c.get(0) is None and 0 not in c._memo
    c.pop(1)
    assert c.get(1) is None and 1 not in c._memo
    c.put(2, Value("new"), 10)  # a put replaces the remembered value
    assert c.get(2) == Value("new")


def test_no_memo_without_packing():
    clock = task.Clock()
    c = ExpiringCache(10, clock, memo=5)
    c.put("k", Value("a"), 10)
    assert c.get("k") == Value("a") and len(c._memo) == 0
