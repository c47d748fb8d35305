"""Tests of the policy engine and its Twisted adapter, with a fake transport, clock and DNS."""

import ipaddress
from types import SimpleNamespace

import pytest
from fakes import FakeDnsClient
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from policyd_ipv6.checks.gather import FactFinder
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.codec import PolicyDecoder
from policyd_ipv6.policy.decision import Policy
from policyd_ipv6.policy.engine import PolicyEngine
from policyd_ipv6.policy.server import MAX_QUEUED, PolicyFactory
from policyd_ipv6.resolver.lookups import Lookups

ADDR = "2001:db8::25"
PTR = ipaddress.ip_address(ADDR).reverse_pointer
RECORDS = {(PTR, "PTR"): ["mx.example.net."],
           ("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"'],
           ("fail.example", "TXT"): ['"v=spf1 -all"']}


def request(recipient="bob@contoso.com", sender="alice@example.net", instance="i1",
            address=ADDR, **extra) -> bytes:
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": address, "client_name": "unknown",
             "reverse_client_name": "unknown", "helo_name": "mx.example.net",
             "sender": sender, "recipient": recipient, "instance": instance, **extra}
    return b"".join(f"{k}={v}\n".encode() for k, v in attrs.items()) + b"\n"


class Harness:
    def __init__(self, fake=None, deadline=5.0, max_connections=10, idle=60.0):
        self.clock = task.Clock()
        self.fake = fake or FakeDnsClient(RECORDS)
        lookups = Lookups(self.fake, self.clock)
        finder = FactFinder(lookups, self.clock, "ptr", deadline)
        table = parse_optin("contoso.com\nfabrikam.com\n")
        engine = PolicyEngine(Policy(), lambda: table, finder, self.clock)
        self.factory = PolicyFactory(engine, self.clock, max_connections, idle)

    def connect(self):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


def replies(transport) -> list[str]:
    return [r for r in transport.value().decode().split("\n\n") if r]


def test_replies_in_order_on_one_connection():
    """Several requests on one connection get one reply each, in order, and it stays open."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(request() + request("x@other.com") + request(address="192.0.2.1"))
    assert replies(transport) == [
        "action=DUNNO",
        "action=550 5.2.1 Service unavailable, [other.com] does not accept email over IPv6.",
        "action=DUNNO"]
    assert not transport.disconnecting


def test_one_spf_evaluation_per_message():
    """Recipients of one message (same instance) share one rDNS and SPF evaluation."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(request("a@contoso.com", sender="x@fail.example"))
    proto.dataReceived(request("b@fabrikam.com", sender="x@fail.example"))
    assert len(replies(transport)) == 2
    assert all("4.7.26" in r for r in replies(transport))
    assert h.fake.queries.count(("fail.example", "TXT")) == 1
    assert h.fake.queries.count((PTR, "PTR")) == 1


def test_facts_survive_a_new_connection():
    """A message whose policy connection is reopened mid-way still reuses its facts."""
    h = Harness(FakeDnsClient(RECORDS))
    p1, t1 = h.connect()
    p1.dataReceived(request("a@contoso.com"))
    p2, t2 = h.connect()
    p2.dataReceived(request("b@contoso.com"))
    assert replies(t1) == replies(t2) == ["action=DUNNO"]
    assert h.fake.queries.count(("example.net", "TXT")) == 1


def test_deadline_turns_silence_into_451():
    """Lookups that never answer end with 451 4.4.3 at the deadline, not a hang."""
    h = Harness(FakeDnsClient(RECORDS, silent={PTR, "example.net"}), deadline=3.0)
    proto, transport = h.connect()
    proto.dataReceived(request())
    assert replies(transport) == []
    h.clock.advance(2.9)
    assert replies(transport) == []
    h.clock.advance(0.2)
    [reply] = replies(transport)
    assert reply.startswith("action=451 4.4.3 ") and "reverse DNS" in reply


def test_missing_ptr_decides_without_waiting_for_spf():
    """A missing PTR gives 4.7.25 at once even though the SPF lookup is still pending."""
    records = {("example.net", "TXT"): RECORDS[("example.net", "TXT")]}
    h = Harness(FakeDnsClient(records, silent={"example.net"}))
    proto, transport = h.connect()
    proto.dataReceived(request())
    [reply] = replies(transport)
    assert "4.7.25" in reply


def test_malformed_request_closes_without_reply():
    """A malformed request closes the connection with no reply (Postfix's contract)."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(request())
    assert replies(transport) == ["action=DUNNO"]
    proto.dataReceived(b"request=smtpd_access_policy\nthis line has no equals sign\n\n")
    assert replies(transport) == ["action=DUNNO"]
    assert transport.disconnecting


def test_crlf_request_is_answered_at_once():
    """A request typed with CR LF line ends (telnet) is answered, not left to the idle timeout."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(request().replace(b"\n", b"\r\n"))
    assert replies(transport) == ["action=DUNNO"]
    assert not transport.disconnecting


def test_bad_second_line_closes_at_once():
    """A bad line after the first closes the connection when it arrives, without a reply."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(b"request=smtpd_access_policy\r\n")
    proto.dataReceived(b"hello there\r\n")
    assert transport.disconnecting and transport.value() == b""


def test_idle_and_half_sent_connections_are_closed():
    """A connection idle (or stuck mid-request) past idle_timeout_seconds is closed."""
    h = Harness(idle=60.0)
    proto, transport = h.connect()
    proto.dataReceived(request()[:30])
    h.clock.advance(59)
    assert not transport.disconnecting
    h.clock.advance(2)
    assert transport.disconnecting and replies(transport) == []


def test_idle_timer_runs_from_the_last_activity_and_follows_a_shorter_timeout():
    """The idle timeout counts from the last reply, however many requests came before (each
    only moves the deadline: one delayed call per connection); a timeout shortened by a
    reload takes effect at the next request."""
    h = Harness(idle=60.0)
    proto, transport = h.connect()
    for _ in range(5):
        h.clock.advance(50)
        proto.dataReceived(request())
    assert len(h.clock.getDelayedCalls()) == 1 and not transport.disconnecting
    h.clock.advance(59)
    assert not transport.disconnecting
    h.clock.advance(2)
    assert transport.disconnecting and len(replies(transport)) == 5
    proto, transport = h.connect()
    h.factory.idle_timeout_seconds = 10.0
    proto.dataReceived(request())
    h.clock.advance(11)
    assert transport.disconnecting


def test_slow_answer_is_not_an_idle_connection():
    """While our own lookups run, the idle timer does not close the connection."""
    h = Harness(FakeDnsClient(RECORDS, silent={PTR}), deadline=90.0, idle=60.0)
    proto, transport = h.connect()
    proto.dataReceived(request())
    h.clock.advance(61)
    assert not transport.disconnecting
    h.clock.advance(30)
    assert replies(transport)[0].startswith("action=451")


def test_connection_limit_evicts_the_longest_idle_connection():
    """At max_connections the longest-idle connection is closed to make room for a new one."""
    h = Harness(max_connections=2)
    (p1, t1), (_, t2) = h.connect(), h.connect()
    p1.dataReceived(request())          # p1 was active last
    p3, t3 = h.connect()
    assert t2.disconnecting and not t1.disconnecting and not t3.disconnecting


def test_connection_limit_with_every_connection_busy_refuses_the_newcomer():
    """When no connection is idle, the new one is closed (Postfix retries); no reply is lost."""
    h = Harness(FakeDnsClient(RECORDS, silent={PTR}), max_connections=2)
    (p1, t1), (p2, t2) = h.connect(), h.connect()
    p1.dataReceived(request())
    p2.dataReceived(request()[:20])     # in the middle of a request: not idle either
    p3, t3 = h.connect()
    assert t3.disconnecting and not t1.disconnecting and not t2.disconnecting
    p1.connectionLost(None)
    p4, t4 = h.connect()
    assert not t4.disconnecting


def test_trickling_client_is_cut_off_at_the_request_timeout():
    """Bytes of one request trickling in do not restart its clock."""
    h = Harness(idle=10.0)
    proto, transport = h.connect()
    data = request()
    for i in range(9):
        proto.dataReceived(data[i:i + 1])
        h.clock.advance(1.0)
    assert not transport.disconnecting
    proto.dataReceived(data[9:10])
    h.clock.advance(1.5)
    assert transport.disconnecting and replies(transport) == []


def test_too_many_requests_ahead_of_replies():
    """A client pipelining more than MAX_QUEUED requests before replies is cut off."""
    h = Harness(FakeDnsClient(RECORDS, silent={PTR}))
    proto, transport = h.connect()
    proto.dataReceived(request() * (MAX_QUEUED + 2))
    assert transport.disconnecting


def _fails_later(attrs, deliver, failed):
    try:
        raise RuntimeError("bug")
    except RuntimeError:
        failed(Failure())


def _replies_badly_later(attrs, deliver, failed):
    deliver(SimpleNamespace(verdict=SimpleNamespace(action="DUNNO\nOK")))


@pytest.mark.parametrize("how", ["raises", "fails later", "replies badly later"])
def test_engine_bug_closes_without_reply(how):
    """An internal error, raised at once, reported to ``failed`` or found in the outcome the
    engine delivers, closes the connection without a reply (Postfix retries), no crash."""
    h = Harness()
    h.factory.engine.answer_with = {
        "raises": lambda attrs, deliver, failed: (_ for _ in ()).throw(RuntimeError("bug")),
        "fails later": _fails_later, "replies badly later": _replies_badly_later}[how]
    proto, transport = h.connect()
    try:
        proto.dataReceived(request())
    except RuntimeError:
        raise AssertionError("the exception escaped to the reactor") from None
    assert transport.disconnecting and replies(transport) == []


def test_a_reply_that_cannot_be_encoded_closes_without_reply():
    """A verdict decided at once whose action is not a valid reply (a bug) closes the
    connection without a reply, as a failed Deferred does, instead of escaping."""
    h = Harness()
    bad = SimpleNamespace(verdict=SimpleNamespace(action="DUNNO\nOK"))
    h.factory.engine.answer_with = lambda attrs, deliver, failed: bad
    proto, transport = h.connect()
    proto.dataReceived(request())
    assert transport.disconnecting and replies(transport) == []


def test_a_warm_request_is_answered_without_a_deferred():
    """When every fact is known (cached answers, a reused SPF result), the engine answers at
    once with an Outcome, not a Deferred, and the reply is written in the same call."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(request(instance="warm-1"))
    assert replies(transport) == ["action=DUNNO"]
    attributes = PolicyDecoder().feed(request(instance="warm-2"))[0]
    outcome = h.factory.engine.answer_now(attributes)
    assert not isinstance(outcome, defer.Deferred)
    assert outcome.verdict.action == "DUNNO" and outcome.facts_source == "new"


def test_deadline_stops_the_checks_still_running():
    """After the deadline an SPF evaluation makes no further lookups for that message."""
    fake = FakeDnsClient({(PTR, "PTR"): ["mx.example.net."],
                          ("example.net", "TXT"): ['"v=spf1 include:a.example -all"'],
                          ("a.example", "TXT"): ['"v=spf1 -all"']})
    h = Harness(fake, deadline=2.0)
    fake.clock, fake.delay = h.clock, 3.0   # every answer comes after the deadline
    proto, transport = h.connect()
    proto.dataReceived(request())
    h.clock.advance(2.0)
    assert replies(transport)[0].startswith("action=451 4.4.3 ")
    h.clock.advance(60)
    # without cancellation the evaluation would go on to the include once example.net arrived
    assert ("example.net", "TXT") in fake.queries
    assert ("a.example", "TXT") not in fake.queries


def test_over_limit_warning_is_logged_at_most_once_a_minute():
    """Connections turned away in a flood give one log line a minute, carrying the count."""
    from twisted.logger import globalLogPublisher

    from policyd_ipv6.connection import OverLimitWarning

    lines = []
    observer = lambda event: lines.append(event) if "max_connections" in event.get(  # noqa
        "log_format", "") else None
    globalLogPublisher.addObserver(observer)
    try:
        clock = task.Clock()
        warning = OverLimitWarning(clock, "milter")
        for _ in range(100):
            warning.note(10, "closed the new one")
        assert len(lines) == 1
        clock.advance(61)
        warning.note(10, "closed the new one")
        assert len(lines) == 2 and lines[1]["n"] == 100
    finally:
        globalLogPublisher.removeObserver(observer)


def test_a_bug_after_the_lookups_closes_without_reply(monkeypatch):
    """A bug in the decision taken once the lookups answer (not in the first one) fails the
    answer: the connection is closed without a reply (Postfix retries, then defers) instead
    of being left waiting for a reply that never comes."""
    from policyd_ipv6.policy import engine as engine_module

    h = Harness()
    h.fake.clock, h.fake.delay = h.clock, 0.5  # the lookups answer later
    real = engine_module.decide

    def buggy(subject, facts, *rest):
        if facts.rdns is not None or facts.spf is not None:
            raise RuntimeError("bug")
        return real(subject, facts, *rest)

    monkeypatch.setattr(engine_module, "decide", buggy)
    proto, transport = h.connect()
    proto.dataReceived(request())
    assert not transport.disconnecting
    h.clock.advance(1)
    assert transport.disconnecting and replies(transport) == []
