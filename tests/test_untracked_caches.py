"""The caches keep plain tuples the garbage collector does not walk (cache.ExpiringCache with
pack/unpack): DNS answers, SPF results and a message's facts come back equal to what was put
in, and a full cache adds no tracked object for a collection to walk."""

import dataclasses
import gc
import ipaddress

from fakes import FakeDnsClient
from twisted.internet import task

from policyd_ipv6.cache import ExpiringCache
from policyd_ipv6.checks.gather import FactFinder
from policyd_ipv6.checks.spf import SpfResults
from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.policy.decision import Subject
from policyd_ipv6.resolver.lookups import Answer, Lookups
from policyd_ipv6.vocabulary import DnsStatus, SpfResult

IP = ipaddress.ip_address("2001:db8::25")
PTR = IP.reverse_pointer
RDNS = RdnsFact(RdnsOutcome.PASS, ("mx.example.net",), "mx.example.net", "resolves back")
SPF = SpfFact(SpfResult.PASS, "", "a@example.net", 3, 300.0, True)


def test_values_round_trip_through_their_packed_form():
    """Answer, RdnsFact, SpfFact and Facts unpack to values equal to the ones packed (equal
    hash and repr too), the members of their enumerations included; an SPF fact moved to
    another identity differs from the original in that field alone."""
    answers = [Answer(DnsStatus.OK, ((b"v=spf1", b" -all"),), ttl=60.0),
               Answer(DnsStatus.OK, ((10, "mx.example"),)),
               Answer(DnsStatus.TEMPFAIL, detail="timeout", too_large=True)]
    for answer in answers:
        assert Answer.unpacked(answer.packed()) == answer
    for facts in (Facts(), Facts(RDNS), Facts(None, SPF, True), Facts(RDNS, SPF)):
        back = Facts.unpacked(facts.packed())
        assert back == facts and hash(back) == hash(facts) and repr(back) == repr(facts)
        assert back.spf is None or back.spf.result is SpfResult.PASS
    assert SPF.for_identity("b@example.net") == dataclasses.replace(SPF,
                                                                    identity="b@example.net")


def test_pack_and_unpack_go_together():
    """A cache with only one of pack and unpack is refused: what get returns must be what
    put was given."""
    try:
        ExpiringCache(10, task.Clock(), pack=Answer.packed)
    except ValueError:
        return
    raise AssertionError("accepted pack without unpack")


def tracked_in(entries) -> int:
    return sum(gc.is_tracked(item) for entry in entries for item in (entry, *entry))


def test_full_caches_hold_nothing_the_collector_walks():
    """After a collection, the entries of the DNS, SPF-result and message caches, thousands
    of them, are untracked tuples: a full collection does not walk them."""
    clock = task.Clock()
    lookups = Lookups(FakeDnsClient(), clock)
    results = SpfResults(10_000, clock)
    finder = FactFinder(lookups, clock, "ptr", 5.0)
    for n in range(3000):
        lookups.cache.put((f"h{n}.example", "TXT"),
                          Answer(DnsStatus.OK, ((b"v=spf1 -all",),), ttl=60.0), 60.0, 100)
        results.put(IP, f"a@d{n}.example", "mx.example", SPF)
        finder.messages.put(("i", str(n)), Facts(RDNS, SPF), 60.0)
    gc.collect()
    for cache in (lookups.cache, results.cache, finder.messages):
        assert tracked_in(cache._data.values()) == 0
        assert not any(gc.is_tracked(key) for key in cache._data)


def subject(instance="m1") -> Subject:
    return Subject.from_request({"protocol_state": "RCPT", "client_address": str(IP),
                                 "helo_name": "mx.example.net", "sender": "a@example.net",
                                 "recipient": "b@contoso.com", "instance": instance})


def test_a_message_is_shared_while_under_way_and_from_the_cache_once_known():
    """The second recipient of a message asked while its lookups run shares the running
    message; once the facts are known they move to the packed cache, and a third recipient
    gets them from there, equal, without a query."""
    clock = task.Clock()
    fake = FakeDnsClient({(PTR, "PTR"): ["mx.example.net."],
                          ("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"']},
                         clock=clock, delay=0.5)
    finder = FactFinder(Lookups(fake, clock), clock, "ptr", 5.0)
    first, shared = finder.for_message(subject())
    assert not shared and first.facts.spf is None
    second, shared = finder.for_message(subject())
    assert shared and second is first and list(finder.pending) != []
    clock.advance(1)
    assert first.facts.rdns is not None and first.facts.spf is not None
    assert finder.pending == {} and len(finder.messages) == 1
    asked = len(fake.queries)
    third, shared = finder.for_message(subject())
    assert shared and third.facts == first.facts and len(fake.queries) == asked
    assert finder.messages.hits == 2


def test_a_message_answered_from_the_caches_keeps_its_facts_for_its_other_recipients():
    """A message whose facts all come from the caches at its first recipient (no lookup)
    keeps them: its later recipients get the same facts, shared, even after the DNS and SPF
    caches changed in between (one message, one evaluation)."""
    clock = task.Clock()
    fake = FakeDnsClient({(PTR, "PTR"): ["mx.example.net."],
                          ("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"']})
    finder = FactFinder(Lookups(fake, clock), clock, "ptr", 5.0)
    finder.for_message(subject("warm-up"))  # fills the DNS and SPF-result caches
    asked = len(fake.queries)
    first, shared = finder.for_message(subject("m2"))
    assert not shared and finder.pending == {} and len(fake.queries) == asked
    assert first.facts.rdns.outcome is RdnsOutcome.PASS and first.facts.spf.result == "pass"
    finder.lookups.cache.put((PTR, "PTR"), Answer(DnsStatus.NXDOMAIN, ttl=60.0), 60.0)
    finder.spf_results.cache._data.clear()
    second, shared = finder.for_message(subject("m2"))
    assert shared and second.facts == first.facts and len(fake.queries) == asked
