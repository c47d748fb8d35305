"""The reply bound against a real Knot over TCP: a TXT answer of about 61 KB (the hostile bench
cell's) is refused unread by a bounded query and read whole by an unbounded one, and an SPF
record of ten such includes ends in the TXT cap's permerror with no query left in flight."""

import ipaddress

import pytest
from lab.knot import KnotServer, free_port, require_knot
from lab.zones import forward_zone
from realtime import wait

from policyd_ipv6.checks.spf import TXT_REPLY_OVERHEAD, check_spf
from policyd_ipv6.checks.spf_eval import Limits
from policyd_ipv6.resolver.client import DnsClient
from policyd_ipv6.resolver.lookups import Lookups
from policyd_ipv6.resolver.wire import Nameserver

pytestmark = pytest.mark.knot

BIG = " ".join(['"' + "x" * 250 + '"'] * 245)  # one record, about 61 KB on the wire
INCLUDES = " ".join(f"include:i{k}.big.hostile.test" for k in range(10))


@pytest.fixture(scope="module")
def lookups():
    from twisted.internet import reactor

    require_knot()
    port = free_port()
    zone = forward_zone("hostile.test", [
        ("*.big", "TXT", BIG),
        ("h1", "TXT", f'"v=spf1 {INCLUDES} ip6:2001:db8::/64 -all"'),
    ])
    with KnotServer({"hostile.test": zone}, [("127.0.0.1", port)]):
        yield Lookups(DnsClient(reactor, [Nameserver("127.0.0.1", port)], 2.0, 1), reactor)


def test_big_txt_is_refused_by_a_bounded_lookup_and_read_by_an_unbounded_one(lookups):
    """Over TCP, the bounded lookup gives too_large (with the reply's real length); the
    unbounded one reads the whole 61 KB record."""
    bounded = wait(lookups.lookup("a.big.hostile.test", "TXT",
                                  max_size=Limits().txt_bytes + TXT_REPLY_OVERHEAD))
    assert bounded.too_large and "reply of 6" in bounded.detail
    whole = wait(lookups.lookup("b.big.hostile.test", "TXT"))
    assert whole.ok and sum(len(s) for s in whole.values[0]) == 245 * 250


def test_ten_big_includes_end_in_permerror_with_nothing_left_in_flight(lookups):
    """The hostile record gives the TXT cap's permerror, and the includes fetched ahead of the
    first one are withdrawn: no query is left in flight."""
    fact = wait(check_spf(lookups, ipaddress.ip_address("2001:db8::25"), "a@h1.hostile.test",
                          "h1.hostile.test"))
    assert fact.result == "permerror" and "TXT records over 32768 bytes" in fact.explanation
    assert lookups._inflight == {}
