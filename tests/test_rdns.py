"""Tests of the reverse DNS check (policyd_ipv6.rdns) against the DNS fake."""

import ipaddress

import pytest
from fakes import FakeDnsClient
from twisted.internet import task

from policyd_ipv6.checks.rdns import check_rdns, rdns_known
from policyd_ipv6.facts import RdnsOutcome
from policyd_ipv6.resolver.lookups import Lookups

IP = ipaddress.ip_address("2001:db8::25")
PTR = IP.reverse_pointer


def run(fake, mode, reverse="unknown", verified="unknown"):
    out = []
    check_rdns(Lookups(fake, task.Clock()), IP, mode, reverse, verified).addCallback(out.append)
    assert len(out) == 1
    return out[0]


def test_ptr_mode_needs_only_a_ptr():
    """In ptr mode a PTR is enough, and no forward lookup is made."""
    fake = FakeDnsClient({(PTR, "PTR"): ["mx.example.net."]})
    fact = run(fake, "ptr")
    assert (fact.outcome, fact.names) == (RdnsOutcome.PASS, ("mx.example.net",))
    assert fake.queries == [(PTR, "PTR")]


@pytest.mark.parametrize("records, outcome", [
    ({}, RdnsOutcome.MISSING),                                          # NXDOMAIN
    ({(PTR, "TXT"): ['"x"']}, RdnsOutcome.MISSING),                     # no PTR data
    ({(PTR, "PTR"): ["1.2.3.4.", "bad_name!."]}, RdnsOutcome.MISSING),  # not host names
])
def test_missing_ptr(records, outcome):
    """NXDOMAIN, no PTR data, or PTR targets that are not host names: MISSING."""
    assert run(FakeDnsClient(records), "ptr").outcome is outcome


def test_temporary_failure_is_tempfail():
    """A transient fault on the PTR lookup is TEMPFAIL in both modes."""
    assert run(FakeDnsClient(broken={PTR}), "ptr").outcome is RdnsOutcome.TEMPFAIL
    assert run(FakeDnsClient(broken={PTR}), "fcrdns").outcome is RdnsOutcome.TEMPFAIL


def test_fcrdns_confirms_with_any_name_even_if_another_fails():
    """One PTR name resolving back is enough, even when another name's lookup failed."""
    fake = FakeDnsClient({(PTR, "PTR"): ["broken.example.net.", "mx.example.net."],
                          ("mx.example.net", "AAAA"): ["2001:db8::25"]},
                         broken={"broken.example.net"})
    fact = run(fake, "fcrdns")
    assert (fact.outcome, fact.confirmed) == (RdnsOutcome.PASS, "mx.example.net")


def test_fcrdns_unconfirmed_and_tempfail():
    """No name resolving back is UNCONFIRMED, unless one of them failed temporarily."""
    other = FakeDnsClient({(PTR, "PTR"): ["mx.example.net."],
                           ("mx.example.net", "AAAA"): ["2001:db8::99"]})
    assert run(other, "fcrdns").outcome is RdnsOutcome.UNCONFIRMED
    none = FakeDnsClient({(PTR, "PTR"): ["mx.example.net."]})
    assert run(none, "fcrdns").outcome is RdnsOutcome.UNCONFIRMED
    temp = FakeDnsClient({(PTR, "PTR"): ["mx.example.net.", "b.example.net."],
                          ("mx.example.net", "AAAA"): ["2001:db8::99"]},
                         broken={"b.example.net"})
    assert run(temp, "fcrdns").outcome is RdnsOutcome.TEMPFAIL


def test_fcrdns_follows_cname_on_the_forward_name():
    """A PTR name that is a CNAME to the host's AAAA still confirms."""
    fake = FakeDnsClient({(PTR, "PTR"): ["alias.example.net."],
                          ("alias.example.net", "CNAME"): ["mx.example.net."],
                          ("mx.example.net", "AAAA"): ["2001:db8::25"]})
    assert run(fake, "fcrdns").outcome is RdnsOutcome.PASS


def test_postfix_names_are_a_fast_path():
    """Postfix's reverse_client_name (ptr) or client_name (fcrdns) saves the lookups."""
    fake = FakeDnsClient()
    assert run(fake, "ptr", reverse="mx.example.net").outcome is RdnsOutcome.PASS
    assert run(fake, "fcrdns", verified="mx.example.net").outcome is RdnsOutcome.PASS
    assert fake.queries == []
    # an unverified name is no proof in fcrdns mode: the check looks for itself
    assert run(fake, "fcrdns", reverse="mx.example.net").outcome is RdnsOutcome.MISSING


@pytest.mark.parametrize("mode", ["ptr", "fcrdns"])
@pytest.mark.parametrize("records", [
    {(PTR, "PTR"): ["mx.example.net."], ("mx.example.net", "AAAA"): ["2001:db8::25"]},
    {(PTR, "PTR"): ["a.example.net.", "mx.example.net."],
     ("mx.example.net", "AAAA"): ["2001:db8::25"]},
    {(PTR, "PTR"): ["mx.example.net."], ("mx.example.net", "AAAA"): ["2001:db8::99"]},
    {(PTR, "PTR"): ["1.2.3.4."]},
    {},
])
def test_rdns_known_gives_the_checks_fact_from_the_cache_alone(mode, records):
    """rdns_known answers nothing (None) before the answers are cached, and once they are it
    gives the fact check_rdns gives, without a single query."""
    fake = FakeDnsClient(records)
    lookups = Lookups(fake, task.Clock())
    assert rdns_known(lookups, IP, mode) is None
    out = []
    check_rdns(lookups, IP, mode).addCallback(out.append)
    asked = list(fake.queries)
    known = rdns_known(lookups, IP, mode)
    assert known is not None and fake.queries == asked
    assert (known.outcome, known.names) == (out[0].outcome, out[0].names)


def test_rdns_known_waits_for_a_forward_answer_not_cached():
    """fcrdns with the PTR cached but a name's address answer not (yet) known: None, so the
    check runs its lookups instead of deciding on part of the answers."""
    fake = FakeDnsClient({(PTR, "PTR"): ["mx.example.net."],
                          ("mx.example.net", "AAAA"): ["2001:db8::25"]})
    lookups = Lookups(fake, task.Clock())
    lookups.lookup(PTR, "PTR")
    assert rdns_known(lookups, IP, "ptr").outcome is RdnsOutcome.PASS
    assert rdns_known(lookups, IP, "fcrdns") is None


def test_cancelling_the_check_withdraws_its_forward_lookups():
    """At the decision's deadline the check is cancelled: the forward lookups still under way
    are withdrawn (their queries cancelled), and no fact comes after."""
    fake = FakeDnsClient({(PTR, "PTR"): ["a.example.net.", "b.example.net."]},
                         silent={"a.example.net", "b.example.net"})
    lookups = Lookups(fake, task.Clock())
    out: list = []
    d = check_rdns(lookups, IP, "fcrdns").addBoth(out.append)
    assert sorted(key[0] for key in lookups._inflight) == ["a.example.net", "b.example.net"]
    d.cancel()
    assert lookups._inflight == {} and len(out) == 1 and "Cancelled" in repr(out[0])


def test_a_forward_answer_settles_the_check_while_the_other_name_waits():
    """The first name that resolves back passes at once; the other lookup goes on (its answer
    is cached for later messages) without a second fact."""
    clock = task.Clock()
    fake = FakeDnsClient({(PTR, "PTR"): ["slow.example.net.", "mx.example.net."],
                          ("mx.example.net", "AAAA"): ["2001:db8::25"]},
                         silent={"slow.example.net"}, clock=clock, delay=1.0)
    lookups = Lookups(fake, clock)
    out: list = []
    check_rdns(lookups, IP, "fcrdns").addCallback(out.append)
    clock.advance(1.0)  # the PTR: both forward lookups are asked
    assert out == [] and len(lookups._inflight) == 2
    clock.advance(1.0)
    assert [(f.outcome, f.confirmed) for f in out] == [(RdnsOutcome.PASS, "mx.example.net")]
    assert [key[0] for key in lookups._inflight] == ["slow.example.net"]


def test_a_bug_after_the_ptr_answer_is_a_temporary_failure_at_once(monkeypatch):
    """A bug in reading the answers ends the check at once as TEMPFAIL (a 4xx for the mail,
    never a pass), logged with its traceback, instead of waiting for the deadline."""
    from twisted.logger import globalLogPublisher

    from policyd_ipv6.checks import rdns as rdns_module

    def broken(answer, mode):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(rdns_module, "_ptr_fact", broken)
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        fact = run(FakeDnsClient({(PTR, "PTR"): ["mx.example.net."]}), "fcrdns")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (fact.outcome, fact.detail) == (RdnsOutcome.TEMPFAIL, "internal error")
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [ZeroDivisionError]
