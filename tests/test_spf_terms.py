"""Properties of the SPF term helpers that the RFC test suites do not pin down on their own."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd_ipv6.checks.spf_eval import check_host
from policyd_ipv6.checks.spf_terms import SpfPermError, cidr_match
from policyd_ipv6.resolver.lookups import Answer
from policyd_ipv6.vocabulary import DnsStatus

v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
# Addresses near the client as often as far from it, so that both outcomes come up.
near_v6 = st.tuples(v6, st.integers(0, 128), st.integers(0, 2**128 - 1)).map(
    lambda t: (t[0], ipaddress.IPv6Address(int(t[0]) ^ (t[2] >> t[1]))))


def reference(client, addresses, prefix):
    """cidr_match as it was written with ipaddress alone: the result, or the permerror text."""
    try:
        return any(client in ipaddress.ip_network(a).supernet(new_prefix=prefix)
                   for a in addresses)
    except ValueError as error:
        return f"permerror: {error}"


def outcome(client, addresses, prefix):
    try:
        return cidr_match(client, addresses, prefix)
    except SpfPermError as error:
        return f"permerror: {error}"


@given(near_v6, st.integers(0, 128), v4)
def test_cidr_match_agrees_with_ipaddress_for_ipv6(pair, prefix, other):
    """IPv6 client: the inet_pton path gives ipaddress's answer, other families included."""
    client, address = pair
    for addresses in ([str(address)], [str(other), str(address)], [address.exploded]):
        assert outcome(client, addresses, prefix) == reference(client, addresses, prefix)


@given(v4, v4, st.integers(0, 32))
def test_cidr_match_agrees_with_ipaddress_for_ipv4(client, address, prefix):
    """IPv4 client: the inet_pton path gives ipaddress's answer."""
    assert outcome(client, [str(address)], prefix) == reference(client, [str(address)], prefix)
    assert cidr_match(client, [str(client)], prefix)


@pytest.mark.parametrize("junk", ["not-an-address", "1.2.3.4.5", "2001:db8::1::2"])
def test_cidr_match_text_no_address_reads_is_permerror(junk):
    """What neither reader takes is a permerror, as before."""
    with pytest.raises(SpfPermError):
        cidr_match(ipaddress.ip_address("2001:db8::1"), [junk], 64)


def evaluate(ip, record):
    """(verdict, questions asked) of one evaluation; only the sender's TXT exists."""
    steps = check_host(ip, "a@example.net", "mx.example.net")
    asked = [next(steps)]
    try:
        while True:
            if asked[-1] == ("example.net", "TXT"):
                asked.append(steps.send(Answer(DnsStatus.OK, ((record.encode(),),), 60)))
            else:
                asked.append(steps.send(Answer(DnsStatus.NXDOMAIN, (), 60)))
    except StopIteration as stop:
        return stop.value, asked


@pytest.mark.parametrize("record, result", [
    ("v=spf1 ip6:2001:db8::/64 -all", "pass"),
    ("v=spf1 exists:%{ir}.%{v}._spf.%{d} -all", "fail"),
    ("v=spf1 ip4:192.0.2.0/24 -all", "fail"),
])
def test_check_host_takes_the_address_as_text_or_parsed(record, result):
    """An ipaddress object and its text give the same verdict (macros included)."""
    text = evaluate("2001:db8::25", record)
    parsed = evaluate(ipaddress.ip_address("2001:db8::25"), record)
    assert text == parsed and text[0].result == result
    if "%{ir}" in record:  # the i macro: the address's 32 nibbles, reversed
        assert ("5.2.0.0" + ".0" * 20 + ".8.b.d.0.1.0.0.2.ip6._spf.example.net", "A") in text[1]
