"""The SPF driver prefetches a record's names only when there are two or more: a single one
the evaluator asks for itself when it gets there (or never, when an earlier term matched).
The quick test that decides it (a regular expression) never counts fewer names than
``_named_lookups`` yields, on records generated term by term."""

import ipaddress

import pytest
from fakes import FakeDnsClient
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task

from policyd_ipv6.checks.spf import _NAMED_TERM, _named_lookups, check_spf
from policyd_ipv6.resolver.lookups import Lookups

pytestmark = pytest.mark.unit

IP = ipaddress.ip_address("2001:db8::25")

_names = st.sampled_from(["include", "redirect", "a", "mx", "exists", "ip4", "ip6", "ptr",
                          "all", "exp", "v", "INCLUDE", "Mx", "A", "Redirect", "aa", "mxx"])
_separators = st.sampled_from(["", ":", "=", "/", ":/"])
_targets = st.sampled_from(["", "example.org", "%{d}.example", "24", "2001:db8::/32",
                            "x.example/24", "a:b"])
_terms = st.builds(lambda q, n, s, t: q + n + s + t, st.sampled_from(["", "+", "-", "~", "?"]),
                   _names, _separators, _targets)


@settings(max_examples=500, deadline=None)
@given(st.lists(_terms, max_size=12), st.sampled_from([" ", "  "]))
def test_the_quick_count_never_undercounts(terms, gap):
    record = "v=spf1 " + gap.join(terms)
    named = list(_named_lookups(record, "example.net", "AAAA"))
    assert len(_NAMED_TERM.findall(record)) >= len(named)


def run(records, ip=IP):
    clock = task.Clock()
    fake = FakeDnsClient(records, clock=clock, delay=0.02)
    results = []
    check_spf(Lookups(fake, clock), ip, "alice@example.net", "mx.example.net").addCallback(
        results.append)
    for _ in range(10):
        clock.advance(0.02)
    return fake.queries, results


def test_a_single_name_is_not_fetched_when_an_earlier_term_matches():
    queries, results = run({
        ("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 include:far.example -all"'],
        ("far.example", "TXT"): ['"v=spf1 -all"']})
    assert [r.result for r in results] == ["pass"]
    assert queries == [("example.net", "TXT")]


def test_two_names_are_fetched_together():
    queries, results = run({
        ("example.net", "TXT"): ['"v=spf1 include:one.example include:two.example -all"'],
        ("one.example", "TXT"): ['"v=spf1 -all"'],
        ("two.example", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"']})
    assert [r.result for r in results] == ["pass"]
    assert queries[:3] == [("example.net", "TXT"), ("one.example", "TXT"),
                           ("two.example", "TXT")]
