"""The real DNS path (dnspython messages over Twisted sockets, pyspf) against a real Knot server.

Knot serves tests/dnslab.py's zones on loopback; the daemon's own DnsClient, Lookups, rDNS and
SPF checks run on the real reactor. A second part runs the same lookups through the test fake
(tests/fakes.py), so the fake the unit tests rely on is proven to behave like the real client.
"""

import ipaddress
import time

import dnslab
import pytest
from fakes import FakeDnsClient
from lab.knot import KnotServer, free_port, require_knot
from realtime import wait

from policyd_ipv6.checks.rdns import check_rdns
from policyd_ipv6.checks.spf import check_spf
from policyd_ipv6.facts import RdnsOutcome
from policyd_ipv6.resolver.client import DnsClient
from policyd_ipv6.resolver.lookups import Lookups
from policyd_ipv6.resolver.wire import Nameserver

pytestmark = pytest.mark.knot


@pytest.fixture(scope="module")
def knot():
    require_knot()
    port = free_port()
    with KnotServer(dnslab.zones(), [("127.0.0.1", port), ("::1", port)]):
        yield port


def lookups_for(servers, timeout=1.0, attempts=1):
    from twisted.internet import reactor

    return Lookups(DnsClient(reactor, servers, timeout, attempts), reactor)


@pytest.fixture
def lookups(knot):
    return lookups_for([Nameserver("127.0.0.1", knot)])


def rdns(lookups, address, mode):
    return wait(check_rdns(lookups, ipaddress.ip_address(address), mode))


@pytest.mark.parametrize("address, mode, outcome", [
    (dnslab.WITH_PTR, "ptr", RdnsOutcome.PASS),
    (dnslab.WITH_PTR, "fcrdns", RdnsOutcome.PASS),
    (dnslab.NOT_BACK, "ptr", RdnsOutcome.PASS),
    (dnslab.NOT_BACK, "fcrdns", RdnsOutcome.UNCONFIRMED),
    (dnslab.NO_PTR, "ptr", RdnsOutcome.MISSING),
    (dnslab.NO_PTR, "fcrdns", RdnsOutcome.MISSING),
    (dnslab.TWO_PTRS, "fcrdns", RdnsOutcome.PASS),
    (dnslab.CNAME_LOOP, "fcrdns", RdnsOutcome.UNCONFIRMED),
    (dnslab.NUMERIC, "ptr", RdnsOutcome.MISSING),
])
def test_rdns_against_knot(lookups, address, mode, outcome):
    """PTR present, absent, not resolving back, several PTRs: each mode's outcome."""
    assert rdns(lookups, address, mode).outcome is outcome


def test_two_ptrs_confirmed_by_the_name_that_resolves(lookups):
    """With two PTR names, the one whose AAAA matches is the confirmed name."""
    fact = rdns(lookups, dnslab.TWO_PTRS, "fcrdns")
    assert set(fact.names) == {"gone.sender.test", "mail2.sender.test"}
    assert fact.confirmed == "mail2.sender.test"


@pytest.mark.parametrize("sender, ip, result", [
    ("a@pass.sender.test", dnslab.WITH_PTR, "pass"),
    ("a@pass.sender.test", dnslab.OUTSIDE, "fail"),
    ("a@fail.sender.test", dnslab.WITH_PTR, "fail"),
    ("a@softfail.sender.test", dnslab.WITH_PTR, "softfail"),
    ("a@neutral.sender.test", dnslab.WITH_PTR, "neutral"),
    ("a@nospf.sender.test", dnslab.WITH_PTR, "none"),
    ("a@nonexistent.sender.test", dnslab.WITH_PTR, "none"),
    ("a@permerror.sender.test", dnslab.WITH_PTR, "permerror"),
    ("a@include.sender.test", dnslab.WITH_PTR, "pass"),      # include -> mx -> AAAA
    ("a@include.sender.test", dnslab.NOT_BACK, "fail"),
    ("a@loopinc.sender.test", dnslab.WITH_PTR, "permerror"),  # include loop
    ("a@voids.sender.test", dnslab.WITH_PTR, "permerror"),    # void lookup limit
    ("a@big.sender.test", dnslab.WITH_PTR, "pass"),          # TXT over UDP size: TCP fallback
    ("", dnslab.WITH_PTR, "pass"),                            # null sender: postmaster@HELO
])
def test_spf_against_knot(lookups, sender, ip, result):
    """pyspf, driven asynchronously, gives the RFC 7208 result for each test record."""
    fact = wait(check_spf(lookups, ipaddress.ip_address(ip), sender, "helo.sender.test"))
    assert fact.result == result, fact.explanation


def test_big_txt_really_needed_tcp(knot):
    """The big SPF record does not fit the EDNS UDP size, so the TCP retry path was used."""
    assert len(dnslab.BIG_TXT) > 1232
    lookups = lookups_for([Nameserver("127.0.0.1", knot)])
    answer = wait(lookups.lookup("big.sender.test", "TXT"))
    assert answer.ok and b"".join(answer.values[0]).decode() == dnslab.BIG_TXT


def test_ipv6_nameserver(knot):
    """Lookups also work through a nameserver reached over IPv6 loopback."""
    lookups = lookups_for([Nameserver("::1", knot)])
    assert rdns(lookups, dnslab.WITH_PTR, "ptr").outcome is RdnsOutcome.PASS


def test_silent_server_times_out_and_next_server_answers(knot):
    """A server that never answers costs one timeout; the next one in the list answers."""
    sock, port = dnslab.silent_udp()
    try:
        lookups = lookups_for([Nameserver("127.0.0.1", port), Nameserver("127.0.0.1", knot)],
                              timeout=0.3)
        start = time.monotonic()
        assert rdns(lookups, dnslab.WITH_PTR, "ptr").outcome is RdnsOutcome.PASS
        assert 0.25 < time.monotonic() - start < 2.0
    finally:
        sock.close()


def test_unreachable_servers_give_tempfail_not_missing():
    """Only dead servers: the checks report temporary failures, never 'no PTR' or SPF fail."""
    sock, port = dnslab.silent_udp()
    try:
        lookups = lookups_for([Nameserver("127.0.0.1", port)], timeout=0.2, attempts=2)
        assert rdns(lookups, dnslab.WITH_PTR, "ptr").outcome is RdnsOutcome.TEMPFAIL
        fact = wait(check_spf(lookups, ipaddress.ip_address(dnslab.WITH_PTR),
                              "a@pass.sender.test", "helo.sender.test"))
        assert fact.result == "temperror"
    finally:
        sock.close()


CONTRACT_CASES = [
    ("mail.sender.test", "AAAA"), ("nothere.sender.test", "AAAA"), ("mail.sender.test", "TXT"),
    ("mx.sender.test", "MX"), ("pass.sender.test", "TXT"),
    (ipaddress.ip_address(dnslab.WITH_PTR).reverse_pointer, "PTR"),
    (ipaddress.ip_address(dnslab.NO_PTR).reverse_pointer, "PTR"),
    ("loop1.sender.test", "AAAA"),
]


def test_fake_matches_real_client(lookups):
    """The fake DNS client gives the same answers (status and values) as Knot for the same data."""
    fake = FakeDnsClient({
        ("mail.sender.test", "AAAA"): [dnslab.WITH_PTR],
        ("mx.sender.test", "MX"): ["10 mail.sender.test."],
        ("pass.sender.test", "TXT"): ['"v=spf1 ip6:2001:db8:1::/64 -all"'],
        (ipaddress.ip_address(dnslab.WITH_PTR).reverse_pointer, "PTR"): ["mail.sender.test."],
        ("loop1.sender.test", "CNAME"): ["loop2.sender.test."],
        ("loop2.sender.test", "CNAME"): ["loop1.sender.test."],
    })
    from twisted.internet import task

    fake_lookups = Lookups(fake, task.Clock())
    for name, rrtype in CONTRACT_CASES:
        real = wait(lookups.lookup(name, rrtype))
        faked = wait(fake_lookups.lookup(name, rrtype))
        assert (real.status, real.values) == (faked.status, faked.values), (name, rrtype)
