"""Tests of the SPF check where RFC 7208 and pyspf's behaviour part: the identity's form
(§4.3), when redirect= counts as a DNS term (§4.6.4, §6.1), DNS errors inside ptr and %{p}
(§5.5, §7.3) and the explanation for a softfail (§6.2), against the DNS fake."""

import ipaddress

import pytest
from fakes import FakeDnsClient
from twisted.internet import task

from policyd_ipv6.checks.spf import check_spf
from policyd_ipv6.checks.spf_eval import DEFAULT_EXPLANATIONS
from policyd_ipv6.resolver.lookups import Lookups

IP = ipaddress.ip_address("2001:db8::25")
PASS = '"v=spf1 ip6:2001:db8::/64 -all"'
# The client's reverse name, and ten hosts whose last one is the client (ten DNS terms).
REVERSE = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
TEN_A = " ".join(f"a:h{i}.example.net" for i in range(1, 11))


def run(fake, sender="alice@example.net", helo="mx.example.net"):
    results = []
    check_spf(Lookups(fake, task.Clock()), IP, sender, helo).addCallback(results.append)
    assert len(results) == 1, "the fake answers synchronously, so the check must be done"
    return results[0]


def ten_hosts(top_record):
    records = {(f"h{i}.example.net", "AAAA"): [f"2001:db8:1::{i}"] for i in range(1, 10)}
    records[("h10.example.net", "AAAA")] = ["2001:db8::25"]
    records[("_spf.example.net", "TXT")] = ['"v=spf1 -all"']
    records[("example.net", "TXT")] = [f'"{top_record}"']
    return records


# The identity (RFC 7208 §4.3)

@pytest.mark.parametrize("sender", ["alice@bücher.example", "alice@BÜCHER.example.",
                                    "alice@xn--bcher-kva.example."])
def test_sender_domain_is_evaluated_as_a_labels_without_the_trailing_dot(sender):
    """A SMTPUTF8 sender's U-labels and a trailing dot are looked up at the A-label name."""
    fake = FakeDnsClient({("xn--bcher-kva.example", "TXT"): [PASS]})
    fact = run(fake, sender=sender)
    assert fact.result == "pass"
    assert fake.queries == [("xn--bcher-kva.example", "TXT")]
    assert fact.identity == sender


def test_macros_see_the_normalised_sender():
    """%{s}, %{o} and %{d} expand to the A-label domain, without the trailing dot."""
    fake = FakeDnsClient({("xn--bcher-kva.example", "TXT"): ['"v=spf1 -all exp=why.example"'],
                          ("why.example", "TXT"): ['"%{s} %{o} %{d}"']})
    fact = run(fake, sender="alice@Bücher.example.")
    assert fact.result == "fail"
    assert fact.explanation == ("alice@xn--bcher-kva.example xn--bcher-kva.example "
                                "xn--bcher-kva.example")


def test_null_sender_helo_is_evaluated_as_a_labels():
    """postmaster@HELO is evaluated at the HELO's A-labels, without its trailing dot."""
    fake = FakeDnsClient({("mx.xn--bcher-kva.example", "TXT"): [PASS]})
    fact = run(fake, sender="", helo="MX.bücher.example.")
    assert (fact.result, fact.identity) == ("pass", "postmaster@mx.xn--bcher-kva.example")


# redirect= and the ten DNS terms (RFC 7208 §4.6.4, §6.1)

@pytest.mark.parametrize("record", [f"v=spf1 {TEN_A} -all redirect=_spf.example.net",
                                    f"v=spf1 {TEN_A} redirect=_spf.example.net"])
def test_a_redirect_not_followed_is_not_a_dns_term(record):
    """Ten DNS mechanisms and a redirect pass when a mechanism matches or "all" is there."""
    fake = FakeDnsClient(ten_hosts(record))
    fact = run(fake)
    assert fact.result == "pass", fact.explanation
    assert ("_spf.example.net", "TXT") not in fake.queries


def test_a_redirect_beside_all_is_not_fetched():
    """The names a record needs are fetched at once, but not a redirect that "all" cancels."""
    fake = FakeDnsClient({("example.net", "TXT"): [
        '"v=spf1 ip6:2001:db8::/64 -all redirect=_spf.example.net"']})
    assert run(fake).result == "pass"
    assert fake.queries == [("example.net", "TXT")]


def test_a_followed_redirect_is_the_eleventh_dns_term():
    """A redirect followed after ten DNS mechanisms that did not match is permerror."""
    records = ten_hosts(f"v=spf1 {TEN_A} redirect=_spf.example.net")
    records[("h10.example.net", "AAAA")] = ["2001:db8:1::10"]
    fact = run(FakeDnsClient(records))
    assert fact.result == "permerror" and "Too many DNS lookups" in fact.explanation


# DNS errors inside ptr and %{p} (RFC 7208 §5.5, §7.3)

def test_ptr_lookup_error_is_no_match():
    """A DNS error in ptr's PTR lookup makes ptr not match: the next mechanism decides."""
    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 ptr ip6:2001:db8::/64 -all"']},
                         broken={REVERSE})
    assert run(fake).result == "pass"


def test_ptr_name_with_an_address_lookup_error_is_skipped():
    """A DNS error looking up one PTR name's addresses skips it; the next name validates."""
    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 ptr -all"'],
                          (REVERSE, "PTR"): ["a.example.net.", "b.example.net."],
                          ("b.example.net", "AAAA"): ["2001:db8::25"]},
                         broken={"a.example.net"})
    assert run(fake).result == "pass"


def test_p_macro_is_unknown_after_a_dns_error():
    """%{p} expands to "unknown" when the PTR lookup fails."""
    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 exists:%{p}.x.example -all"'],
                          ("unknown.x.example", "A"): ["127.0.0.2"]},
                         broken={REVERSE})
    fact = run(fake)
    assert fact.result == "pass", fact.explanation
    assert ("unknown.x.example", "A") in fake.queries


def test_p_macro_in_exp_after_a_dns_error_leaves_a_pass():
    """An exp= naming %{p} does not turn a pass into temperror when the PTR lookup fails."""
    fake = FakeDnsClient({("example.net", "TXT"):
                          ['"v=spf1 ip6:2001:db8::/64 -all exp=%{p}.exp.example.net"']},
                         broken={REVERSE})
    assert run(fake).result == "pass"


# The explanation (RFC 7208 §6.2)

def test_softfail_gets_no_explanation_from_exp():
    """exp= is fetched for a fail only: a softfail keeps the default text, with no lookup."""
    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 ~all exp=why.example.net"'],
                          ("why.example.net", "TXT"): ['"go away"']})
    fact = run(fake)
    assert (fact.result, fact.explanation) == ("softfail", DEFAULT_EXPLANATIONS["softfail"])
    assert ("why.example.net", "TXT") not in fake.queries
