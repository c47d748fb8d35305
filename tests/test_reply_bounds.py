"""Tests of the per-query reply bound and of cancelled lookups: a TCP reply longer than the
query's ``max_size`` is refused on its length prefix, ``Lookups`` answers it as a ``too_large``
tempfail that is never cached, SPF's TXT lookups use the bound so that an over-cap reply is a
permerror without being read, and the lookups an ended SPF evaluation no longer needs are
cancelled (their queries too, once nobody else waits on them)."""

from __future__ import annotations

import ipaddress
import struct

import dns.message
import dns.rdatatype
import pytest
from fakes import FakeDnsClient
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from policyd_ipv6.checks.spf import TXT_REPLY_OVERHEAD, check_spf
from policyd_ipv6.checks.spf_eval import Limits
from policyd_ipv6.resolver import client as client_module
from policyd_ipv6.resolver.client import DnsClient, ReplyTooLarge
from policyd_ipv6.resolver.lookups import Lookups
from policyd_ipv6.resolver.reply import Reply
from policyd_ipv6.resolver.tries import TcpTry
from policyd_ipv6.resolver.wire import Nameserver, encode_name, encode_query
from policyd_ipv6.vocabulary import DnsStatus

pytestmark = pytest.mark.unit

IP = ipaddress.ip_address("2001:db8::25")
SERVER = Nameserver("127.0.0.1", 53)
CAP = Limits().txt_bytes + TXT_REPLY_OVERHEAD


def big_txt(kib: int) -> str:
    """TXT rdata of about ``kib`` KiB: strings of 250 bytes."""
    return " ".join(['"' + "x" * 250 + '"'] * (kib * 1024 // 250))


def tcp_try(max_size: int):
    """A TCP try of a TXT query bounded by ``max_size``, connected to a StringTransport."""
    dns_client = DnsClient(task.Clock(), [SERVER], 1.0)
    wire = encode_query(0x1234, encode_name("big.example"), dns.rdatatype.TXT)
    outcome: list = []  # what the query delivers: the reply, or the error it failed with
    query = client_module._Query(dns_client, wire, [], max_size, outcome.append)
    attempt = TcpTry(query, SERVER)
    transport = StringTransport()
    attempt.makeConnection(transport)
    return attempt, transport, wire, outcome


def reply_to(wire: bytes, rdata: str) -> bytes:
    """A NOERROR reply to the query ``wire`` holding one TXT record ``rdata``."""
    response = dns.message.make_response(dns.message.from_wire(wire))
    response.answer.append(dns.rrset.from_text("big.example.", 300, "IN", "TXT", rdata))
    return response.to_wire(max_size=65535)


def test_tcp_reply_over_max_size_is_refused_on_its_length_prefix():
    """A TCP reply longer than max_size fails the query with ReplyTooLarge after its two-byte
    length, the connection is closed, and what was read of it is let go at once."""
    attempt, transport, _wire, outcome = tcp_try(max_size=1000)
    attempt.dataReceived(struct.pack("!H", 4096) + b"\0" * 100)
    assert attempt.buffer == b""
    assert isinstance(outcome[0], ReplyTooLarge)
    assert (outcome[0].size, outcome[0].max_size) == (4096, 1000)
    assert transport.disconnecting
    attempt.dataReceived(b"\0" * 4000)
    assert len(attempt.buffer) <= 102


def test_tcp_reply_within_max_size_is_read_across_segments():
    """A reply within max_size, arriving in small pieces (the length prefix split too), is
    parsed once complete."""
    attempt, _transport, wire, outcome = tcp_try(max_size=CAP)
    message = reply_to(wire, big_txt(8))
    data = struct.pack("!H", len(message)) + message
    for start in range(0, len(data), 999):
        assert outcome == []
        attempt.dataReceived(data[start:start + 999])
    assert isinstance(outcome[0], Reply) and outcome[0].rcode() == 0


class HeldClient(FakeDnsClient):
    """The fake, but names in ``held`` wait for the test; cancelling such a query is recorded."""

    def __init__(self, records, held=()) -> None:
        super().__init__(records)
        self.held = set(held)
        self.pending: dict[str, defer.Deferred] = {}
        self.cancelled: list[str] = []
        self.max_sizes: dict[tuple[str, str], int] = {}

    def query(self, qname, rdtype, max_size=client_module.MAX_REPLY_SIZE):
        name = qname.rstrip(".").lower()
        self.max_sizes[(name, dns.rdatatype.to_text(rdtype))] = max_size
        if name not in self.held:
            return super().query(qname, rdtype, max_size)
        self.queries.append((name, dns.rdatatype.to_text(rdtype)))
        d = defer.Deferred(lambda _d: self.cancelled.append(name))
        self.pending[name] = d
        return d


def test_lookup_over_max_size_is_too_large_and_not_cached():
    """A reply over the lookup's max_size is a tempfail marked too_large, and is not cached;
    the same name without a bound is read and cached."""
    fake = FakeDnsClient({("big.example", "TXT"): [big_txt(40)]})
    lookups = Lookups(fake, task.Clock())
    answers: list = []
    lookups.lookup("big.example", "TXT", max_size=CAP).addCallback(answers.append)
    assert answers[0].status == DnsStatus.TEMPFAIL and answers[0].too_large
    assert "over the" in answers[0].detail
    assert lookups.cached("big.example", "TXT") is None
    lookups.lookup("big.example", "TXT").addCallback(answers.append)
    assert answers[1].ok and not answers[1].too_large
    assert lookups.cached("big.example", "TXT") is not None


def test_cancelling_the_last_waiter_cancels_the_query():
    """Two callers share a query; one withdrawing keeps it, the last one withdrawing cancels
    it, and nothing is logged as an internal error."""
    fake = HeldClient({}, held={"slow.example"})
    lookups = Lookups(fake, task.Clock())
    errors: list = []

    def observer(event):
        if event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        first = lookups.lookup("slow.example", "TXT")
        second = lookups.lookup("slow.example", "TXT")
        assert fake.queries == [("slow.example", "TXT")]
        for d in (first, second):
            d.addErrback(lambda f: f.trap(defer.CancelledError))
        first.cancel()
        assert fake.cancelled == []
        second.cancel()
        assert fake.cancelled == ["slow.example"]
        assert lookups._inflight == {}
    finally:
        globalLogPublisher.removeObserver(observer)
    assert errors == []


def test_bounded_and_unbounded_lookups_do_not_share_a_query():
    """A bounded lookup does not join an unbounded one of the same name (nor the reverse)."""
    fake = HeldClient({}, held={"x.example"})
    lookups = Lookups(fake, task.Clock())
    lookups.lookup("x.example", "TXT")
    lookups.lookup("x.example", "TXT", max_size=CAP)
    assert fake.queries == [("x.example", "TXT"), ("x.example", "TXT")]


def run_spf(client, sender="alice@example.net"):
    results: list = []
    check_spf(Lookups(client, task.Clock()), IP, sender, "mx.example.net").addCallback(
        results.append)
    return results


def test_spf_txt_lookups_are_bounded_by_the_cap():
    """SPF asks its TXT lookups with max_size = the TXT cap plus the message overhead, and its
    other lookups with none."""
    fake = HeldClient({("example.net", "TXT"): ['"v=spf1 a:h.example.net -all"'],
                       ("h.example.net", "AAAA"): ["2001:db8::25"]})
    assert run_spf(fake)[0].result == "pass"
    assert fake.max_sizes[("example.net", "TXT")] == CAP
    assert fake.max_sizes[("h.example.net", "AAAA")] == client_module.MAX_REPLY_SIZE


def test_include_too_large_to_read_is_permerror_over_the_cap():
    """An include whose TXT reply is over the bound gives the permerror of the TXT cap, as if
    its text had been counted."""
    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 include:big.example.org -all"'],
                          ("big.example.org", "TXT"): [big_txt(60)]})
    fact = run_spf(fake)[0]
    assert fact.result == "permerror"
    assert "TXT records over 32768 bytes" in fact.explanation


def test_explanation_too_large_to_read_keeps_the_default_text():
    """An exp= whose TXT reply is over the bound is ignored (RFC 7208 §6.2): the fail stands
    with the default explanation."""
    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 -all exp=why.example.net"'],
                          ("why.example.net", "TXT"): [big_txt(60)]})
    fact = run_spf(fake)[0]
    assert fact.result == "fail" and fact.explanation == "SPF fail - not authorized"


def test_prefetched_lookups_are_cancelled_when_the_evaluation_ends():
    """Once the first include ends the evaluation (too large), the nine includes fetched ahead
    of it are withdrawn and their queries cancelled."""
    includes = " ".join(f"include:i{k}.example.org" for k in range(10))
    held = {f"i{k}.example.org" for k in range(1, 10)}
    fake = HeldClient({("example.net", "TXT"): [f'"v=spf1 {includes} -all"'],
                       ("i0.example.org", "TXT"): [big_txt(60)]}, held=held)
    lookups = Lookups(fake, task.Clock())
    results: list = []
    check_spf(lookups, IP, "alice@example.net", "mx.example.net").addCallback(results.append)
    assert results[0].result == "permerror"
    assert sorted(fake.cancelled) == sorted(held)
    assert lookups._inflight == {}


def test_cancelled_evaluation_withdraws_its_lookups():
    """Cancelling the check (its deadline passed) cancels the lookups it waits on."""
    fake = HeldClient({("example.net", "TXT"): ['"v=spf1 include:slow.example.org -all"']},
                      held={"slow.example.org"})
    lookups = Lookups(fake, task.Clock())
    check = check_spf(lookups, IP, "alice@example.net", "mx.example.net")
    check.addErrback(lambda f: f.trap(defer.CancelledError))
    assert fake.cancelled == []
    check.cancel()
    assert fake.cancelled == ["slow.example.org"]
    assert lookups._inflight == {}


def test_a_lookup_shared_with_another_evaluation_goes_on():
    """An evaluation that ends withdraws only itself: a query another one waits on goes on."""
    fake = HeldClient({("example.net", "TXT"): ['"v=spf1 include:s.example.org -all"']},
                      held={"s.example.org"})
    lookups = Lookups(fake, task.Clock())
    other = lookups.lookup("s.example.org", "TXT", max_size=CAP)
    check = check_spf(lookups, IP, "alice@example.net", "mx.example.net")
    check.addErrback(lambda f: f.trap(defer.CancelledError))
    check.cancel()
    assert fake.cancelled == [] and not other.called
