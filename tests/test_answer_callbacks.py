"""The cold path without Deferreds: ``run_spf`` gives the fact at once or delivers it once
later (never after ``cancel()``); ``MessageFacts.wait`` isolates a waiter's bug from the
others; ``PolicyEngine.answer_with`` returns the outcome at once or calls ``deliver`` (or,
on a bug in a later step, ``failed``) exactly once."""

import ipaddress

import pytest
from fakes import FakeDnsClient
from twisted.internet import task
from twisted.logger import globalLogPublisher

from policyd_ipv6.checks.gather import FactFinder, MessageFacts
from policyd_ipv6.checks.spf import DEFAULT_LIMITS, run_spf
from policyd_ipv6.facts import RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import Need, Policy
from policyd_ipv6.policy.engine import Outcome, PolicyEngine
from policyd_ipv6.resolver.lookups import Lookups
from policyd_ipv6.timeouts import Timeouts
from policyd_ipv6.vocabulary import SpfResult

pytestmark = pytest.mark.unit

ADDR = "2001:db8::25"
IP = ipaddress.ip_address(ADDR)
PTR = IP.reverse_pointer


def lookups_with(records, delay=1.0):
    clock = task.Clock()
    fake = FakeDnsClient(records, clock=clock, delay=delay)
    return Lookups(fake, clock), fake, clock


def test_run_spf_delivers_once_later_and_not_before_it_returns():
    lookups, fake, clock = lookups_with(
        {("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"']})
    got = []
    running = run_spf(lookups, IP, "a@example.net", "mx.example.net", DEFAULT_LIMITS, got.append)
    assert not isinstance(running, SpfFact) and got == []
    clock.advance(1.0)
    assert [fact.result for fact in got] == [SpfResult.PASS]
    running.cancel()  # after the end: no effect
    clock.advance(10)
    assert len(got) == 1


def test_run_spf_gives_a_fact_known_at_once_and_never_calls_deliver():
    lookups, fake, clock = lookups_with({("example.net", "TXT"): ['"v=spf1 -all"']})
    first = []
    run_spf(lookups, IP, "a@example.net", "mx.example.net", DEFAULT_LIMITS, first.append)
    clock.advance(1.0)  # the record is in the lookups' cache now
    got = []
    fact = run_spf(lookups, IP, "b@example.net", "mx.example.net", DEFAULT_LIMITS, got.append)
    assert isinstance(fact, SpfFact) and fact.result == SpfResult.FAIL
    clock.advance(10)
    assert got == []
    # no domain to evaluate: a fact at once too
    fact = run_spf(lookups, IP, "nobody", "mx.example.net", DEFAULT_LIMITS, got.append)
    assert isinstance(fact, SpfFact) and fact.result == SpfResult.NONE and got == []


def test_run_spf_cancelled_never_delivers_and_asks_no_further():
    lookups, fake, clock = lookups_with(
        {("example.net", "TXT"): ['"v=spf1 include:a.example -all"'],
         ("a.example", "TXT"): ['"v=spf1 -all"']}, delay=3.0)
    got = []
    running = run_spf(lookups, IP, "a@example.net", "mx.example.net", DEFAULT_LIMITS, got.append)
    clock.advance(1.0)
    running.cancel()
    clock.advance(60)
    assert got == []
    assert ("example.net", "TXT") in fake.queries and ("a.example", "TXT") not in fake.queries


def test_a_waiter_that_raises_is_logged_and_the_others_still_hear():
    clock = task.Clock()
    message = MessageFacts(clock, 5.0, Timeouts(clock))
    heard = []

    def bug(_facts):
        raise RuntimeError("bug")

    message.wait(Need.SPF, heard.append)
    message.wait(Need.SPF, bug)
    message.wait(Need.SPF, heard.append)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        message.set_spf(SpfFact(SpfResult.PASS))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(heard) == 2 and all(f.spf.result == SpfResult.PASS for f in heard)
    assert any(e.get("log_format") == "internal error in a request waiting for facts"
               and e["log_failure"].check(RuntimeError) for e in events)
    later = []
    message.wait(Need.SPF, later.append)  # known now: called at once
    message.set_rdns(RdnsFact(RdnsOutcome.PASS, "mx.example.net"))
    assert len(later) == 1


def engine_with(records, delay=1.0, policy=None):
    lookups, fake, clock = lookups_with(records, delay)
    finder = FactFinder(lookups, clock, "ptr", 5.0)
    table = parse_optin("contoso.com\n")
    return PolicyEngine(policy or Policy(), lambda: table, finder, clock), clock


ATTRS = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "client_address": ADDR,
         "client_name": "unknown", "reverse_client_name": "unknown",
         "helo_name": "mx.example.net", "sender": "alice@example.net",
         "recipient": "bob@contoso.com", "instance": "i1"}
RECORDS = {(PTR, "PTR"): ["mx.example.net."], ("mx.example.net", "AAAA"): [ADDR],
           ("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"']}


def test_answer_with_delivers_exactly_once_when_the_facts_come():
    engine, clock = engine_with(RECORDS)
    delivered, failed = [], []
    assert engine.answer_with(dict(ATTRS), delivered.append, failed.append) is None
    assert delivered == []
    clock.advance(1.0)  # the PTR and the TXT record
    clock.advance(1.0)  # the PTR name's AAAA
    assert [o.verdict.action for o in delivered] == ["DUNNO"] and failed == []
    assert isinstance(delivered[0], Outcome) and delivered[0].facts_source == "new"
    # the next recipient of the message: decided at once from the shared facts
    outcome = engine.answer_with(dict(ATTRS, recipient="carol@contoso.com"),
                                 delivered.append, failed.append)
    assert outcome.verdict.action == "DUNNO" and outcome.facts_source == "shared"
    assert len(delivered) == 1


def test_a_bug_in_a_later_step_calls_failed_once_and_never_deliver():
    engine, clock = engine_with(RECORDS)
    delivered, failed = [], []
    engine.answer_with(dict(ATTRS), delivered.append, failed.append)
    # a bug before the facts arrive: finishing the walk raises
    engine._done = lambda *args: 1 / 0
    clock.advance(5.0)
    assert delivered == [] and len(failed) == 1
    assert failed[0].check(ZeroDivisionError)


def test_a_bug_filing_the_facts_away_still_answers_the_request():
    """If keeping a message's facts for its other recipients fails (a bug), the bug is logged
    and the request waiting on those facts is still decided: no request is left hanging."""
    engine, clock = engine_with(RECORDS)

    def broken_put(*_args, **_kwargs):
        raise RuntimeError("bug")

    engine.finder.messages.put = broken_put
    delivered, failed, events = [], [], []
    globalLogPublisher.addObserver(events.append)
    try:
        engine.answer_with(dict(ATTRS), delivered.append, failed.append)
        clock.advance(1.0)
        clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [o.verdict.action for o in delivered] == ["DUNNO"] and failed == []
    assert any(e.get("log_format") == "internal error keeping a message's facts"
               for e in events)
