"""The caches' byte bound: the DNS cache holds at most dns_cache_bytes of answers."""

from fakes import FakeDnsClient
from twisted.internet import task

from policyd_ipv6.cache import ExpiringCache
from policyd_ipv6.resolver.lookups import Lookups, answer_size


def test_entries_past_the_byte_bound_are_evicted_oldest_first():
    """Sizes add up; past max_bytes the least recently used entries go, whatever their count."""
    cache = ExpiringCache(1000, task.Clock(), max_bytes=100)
    cache.put("a", 1, 60, size=40)
    cache.put("b", 2, 60, size=40)
    cache.get("a")
    cache.put("c", 3, 60, size=40)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    assert cache.bytes == 80
    cache.put("a", 4, 60, size=10)  # replacing an entry replaces its size
    assert cache.bytes == 50


def test_an_entry_larger_than_the_bound_is_not_kept():
    """One answer over the whole bound is not cached (and evicts nothing)."""
    cache = ExpiringCache(1000, task.Clock(), max_bytes=100)
    cache.put("a", 1, 60, size=50)
    cache.put("big", 2, 60, size=101)
    assert cache.get("big") is None and cache.get("a") == 1


def test_dns_cache_is_bounded_in_bytes_not_only_entries():
    """Large TXT answers fill the byte bound long before the entry count."""
    big = " ".join(['"' + "x" * 250 + '"'] * 40)
    fake = FakeDnsClient({(f"t{i}.example", "TXT"): [big] for i in range(20)})
    lookups = Lookups(fake, task.Clock(), max_entries=1000, max_bytes=50_000)
    for i in range(20):
        lookups.lookup(f"t{i}.example", "TXT")
    assert lookups.cache.bytes <= 50_000
    assert 1 <= len(lookups.cache) < 10
    answer = lookups.cached("t19.example", "TXT")
    assert answer is not None and answer_size(("t19.example", "TXT"), answer) > 10_000
