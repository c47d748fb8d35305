"""DNS faults never yield a 5xx and never stop the daemon: real Knot, unbound and a bad server.

Each fault is met twice: in-process, through the daemon's own DnsClient, Lookups, rDNS and SPF
checks and engine on the real reactor (the reply and the fact behind it are asserted); and end
to end, through ``python -m policyd_ipv6 serve`` answering real policy connections, once behind
a real unbound (stub zones to Knot, to the misbehaving server of lab/baddns.py, to black holes
and to a denied zone) and once talking to the misbehaving server directly, as it would to a
broken resolver. A transient fault must give ``451 4.4.3``; the permanent facts (no PTR, SPF
not pass, including every malformed or over-limit SPF record) give ``450 4.7.25`` or ``450
4.7.26``; nothing gives a 5xx, logs a traceback or ends the process.
"""

import itertools
import re
import time

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from faultlab import (
    AUTH,
    BAD_REV,
    DROPPED_REV,
    DUNNO,
    HUGE_SPF,
    KNOT_REV,
    LONG_LOCAL,
    NO_PTR,
    SPF_KNOT_CASES,
    TEMP_RDNS,
    TEMP_SPF,
    bad_ip,
    bad_table,
    knot_ip,
    knot_zones,
)
from lab.baddns import BadDns
from lab.daemonproc import ServeProcess, ask, request
from lab.knot import KnotServer, free_port, require_knot
from lab.unbound import BlackHoles, UnboundServer, require_unbound
from realtime import wait
from twisted.logger import globalLogPublisher

from policyd_ipv6.checks.gather import FactFinder
from policyd_ipv6.facts import RdnsOutcome
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import Policy
from policyd_ipv6.policy.engine import PolicyEngine
from policyd_ipv6.resolver.client import DnsClient
from policyd_ipv6.resolver.lookups import Lookups
from policyd_ipv6.resolver.wire import Nameserver


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def knot():
    require_knot()
    port = free_port()
    with KnotServer(knot_zones(), [("127.0.0.1", port)]):
        yield port


@pytest.fixture(scope="module")
def bad():
    with BadDns(bad_table()) as server:
        yield server


@pytest.fixture(scope="module")
def bad_no_tcp():
    """The same bad server with its TCP port closed: a TCP retry is refused at once."""
    with BadDns(bad_table(), tcp=False) as server:
        yield server


@pytest.fixture(scope="module")
def unbound(knot, bad):
    require_unbound()
    with BlackHoles(1) as holes, UnboundServer(
            stubs={"robust.test": [("127.0.0.1", knot)], KNOT_REV: [("127.0.0.1", knot)],
                   "bad.test": [("127.0.0.1", bad.port)], BAD_REV: [("127.0.0.1", bad.port)],
                   "hole.test": [holes.address(0)]},
            deny=["dropped.test", DROPPED_REV]) as server:
        yield server


@pytest.fixture
def failures():
    """Every logged failure (a traceback in the log) during the test; none may appear."""
    seen = []

    def observe(event):
        if event.get("log_failure") is not None:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


_instances = itertools.count()


def decide(port: int, address: str, sender: str, timeout=0.3, attempts=1, deadline=3.0,
           mode="ptr"):
    """One decision by the real engine on the real reactor, DNS from 127.0.0.1:port."""
    from twisted.internet import reactor

    client = DnsClient(reactor, [Nameserver("127.0.0.1", port)], timeout, attempts)
    finder = FactFinder(Lookups(client, reactor), reactor, mode, deadline)
    table = parse_optin("robust.test\n")
    engine = PolicyEngine(Policy(), lambda: table, finder, reactor)
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": address, "helo_name": "helo.robust.test", "sender": sender,
             "recipient": "bob@robust.test", "instance": f"fault.{next(_instances)}"}
    return wait(engine.answer(attrs), timeout=deadline + 5)


def assert_reply(outcome, pattern):
    action = outcome.verdict.action
    assert re.fullmatch(pattern, action), (action, outcome.facts)
    assert not action.startswith("5")


# -- in-process: the real DNS client against the bad server ---------------------------------
PTR_FAULTS = [
    (0x1, TEMP_RDNS, "SERVFAIL"),
    (0x2, TEMP_RDNS, "REFUSED"),
    (0x3, TEMP_RDNS, "timeout"),
    (0x4, TEMP_RDNS, "timeout"),             # garbage is dropped; then nothing comes
    (0x5, DUNNO, ""),                        # garbage dropped, the real answer used
    (0x6, TEMP_RDNS, "timeout"),             # an answer under another ID is not trusted
    (0x7, DUNNO, ""),
    (0x8, TEMP_RDNS, "TCP connection closed"),
    (0x9, DUNNO, ""),                        # TC: the TCP retry answers
    (0xa, DUNNO, ""),                        # slow, but within the timeout
    (0xb, TEMP_RDNS, "TCP"),                 # junk over TCP
    (0xc, TEMP_RDNS, "TCP timeout"),
    (0xff, NO_PTR, ""),                      # control: NXDOMAIN is a permanent fact
]


@pytest.mark.process
@pytest.mark.parametrize("host, pattern, detail", PTR_FAULTS,
                         ids=[f"{h:x}-{d or p[:5]}" for h, p, d in PTR_FAULTS])
def test_ptr_fault_in_process(bad, failures, host, pattern, detail):
    """A misbehaving DNS server on the PTR lookup gives 451 4.4.3 (or the right answer when
    a good answer arrives after the junk), never a 5xx, never a logged exception."""
    outcome = decide(bad.port, bad_ip(host), "a@pass.bad.test", timeout=0.5)
    assert_reply(outcome, pattern)
    if pattern == TEMP_RDNS:
        assert outcome.facts.rdns.outcome is RdnsOutcome.TEMPFAIL
        assert detail in outcome.facts.rdns.detail
    assert failures == []


SPF_FAULTS = [
    ("servfail", TEMP_SPF),
    ("refused", TEMP_SPF),
    ("silent", TEMP_SPF),
    ("garbage", TEMP_SPF),
    ("truncate", TEMP_SPF),                  # TC, then the TCP connection is closed
    ("incfail", TEMP_SPF),                   # the included domain fails: temperror
    ("asilent", TEMP_SPF),                   # an a: name never answers
    ("huge", DUNNO),                         # TC, TCP fallback gives the whole record
    ("nope", AUTH),                          # control: no such domain is SPF none
]


@pytest.mark.process
@pytest.mark.parametrize("name, pattern", SPF_FAULTS, ids=[n for n, _ in SPF_FAULTS])
def test_spf_fault_in_process(bad, failures, name, pattern):
    """A fault on any SPF lookup gives 451 4.4.3 naming SPF, never 4.7.26 or a 5xx."""
    outcome = decide(bad.port, bad_ip(0x100), f"a@{name}.bad.test")
    assert_reply(outcome, pattern)
    assert outcome.facts.rdns.outcome is RdnsOutcome.PASS
    if pattern == TEMP_SPF:
        assert outcome.facts.spf.result == "temperror"
    assert failures == []


@pytest.mark.process
def test_huge_txt_came_over_tcp(bad):
    """The huge SPF record does not fit a UDP answer: it was fetched again over TCP."""
    assert len(HUGE_SPF) > 4000
    before = bad.queried("huge.bad.test", "TXT", "tcp")
    assert_reply(decide(bad.port, bad_ip(0x100), "a@huge.bad.test"), DUNNO)
    assert bad.queried("huge.bad.test", "TXT", "tcp") == before + 1


@pytest.mark.process
@pytest.mark.parametrize("address, sender, pattern", [
    (bad_ip(0x9), "a@pass.bad.test", TEMP_RDNS),     # PTR truncated, TCP refused
    (bad_ip(0x100), "a@huge.bad.test", TEMP_SPF),    # huge TXT, TCP refused
    (bad_ip(0x100), "a@pass.bad.test", DUNNO),       # control: UDP answers still work
])
def test_truncated_answer_with_tcp_refused_is_temporary(bad_no_tcp, failures, address, sender,
                                                        pattern):
    """TC set and the TCP retry refused: a temporary failure (451), never SPF permerror."""
    outcome = decide(bad_no_tcp.port, address, sender)
    assert_reply(outcome, pattern)
    if pattern == TEMP_SPF:
        assert "TCP connect failed" in outcome.facts.spf.explanation
    assert failures == []


@pytest.mark.process
def test_slow_answers_past_the_deadline_give_451(bad, failures):
    """Answers slower than the decision's deadline end in 451 4.4.3 at the deadline."""
    start = time.monotonic()
    outcome = decide(bad.port, bad_ip(0x3), "a@silent.bad.test", timeout=5.0, deadline=1.0)
    elapsed = time.monotonic() - start
    assert_reply(outcome, TEMP_RDNS)
    assert "deadline" in outcome.facts.rdns.detail
    assert 0.9 < elapsed < 2.0
    assert failures == []


# -- in-process: real Knot, and unbound in front of it --------------------------------------
@pytest.mark.knot
@pytest.mark.parametrize("name, address, result, pattern", SPF_KNOT_CASES,
                         ids=[c[0] for c in SPF_KNOT_CASES])
def test_hostile_spf_records_in_process(knot, failures, name, address, result, pattern):
    """Include loops, too many lookups, void lookups and malformed records are permanent SPF
    results (4.7.26), each computed without an exception; a huge record still passes."""
    local = LONG_LOCAL if name == "macro" else "a"
    outcome = decide(knot, address, f"{local}@{name}.robust.test", timeout=1.0)
    assert outcome.facts.spf is not None and outcome.facts.spf.result == result, \
        outcome.facts.spf
    assert_reply(outcome, pattern)
    assert failures == []


@pytest.mark.knot
@pytest.mark.parametrize("host, pattern", [
    (10, DUNNO),      # a plain PTR
    (12, DUNNO),      # RFC 2317: the owner is a CNAME to a PTR in the same zone
    (16, NO_PTR),     # a CNAME loop as the authoritative server gives it
    (11, NO_PTR),
])
def test_cname_on_ptr_names_from_knot(knot, failures, host, pattern):
    """CNAMEs on ip6.arpa names are followed; a loop is a missing PTR, not a crash."""
    assert_reply(decide(knot, knot_ip(host), "a@pass.robust.test"), pattern)
    assert failures == []


# 31 CNAMEs are beyond unbound's restart limit (11 links), and unbound's versions say so
# differently: Debian 12's (1.17) answers NOERROR with the chain cut short, which leaves no
# usable PTR (450 4.7.25); Debian 13's answers SERVFAIL, which is a resolver failure like any
# other and so a temporary DNS failure (451 4.4.3): the daemon cannot tell a SERVFAIL for a
# long chain from one for a dead server, and must not guess. Both are 4xx; the sender retries.
# The resolver itself is asked first, and the reply must follow from what it said.
CHAIN_31 = "the reply to unbound's own answer for 31 CNAMEs (chain_31_reply)"


def chain_31_reply(port: int) -> str:
    """NO_PTR when the unbound on `port` cuts the 31-CNAME chain short, TEMP_RDNS when it
    fails (SERVFAIL or no answer); any other answer from it fails the test."""
    query = dns.message.make_query(dns.reversename.from_address(knot_ip(15)), "PTR")
    try:
        response = dns.query.udp(query, "127.0.0.1", port=port, timeout=3.0)
    except dns.exception.Timeout:
        return TEMP_RDNS
    if response.rcode() == dns.rcode.SERVFAIL:
        return TEMP_RDNS
    assert response.rcode() == dns.rcode.NOERROR, response
    assert not any(rrset.rdtype == dns.rdatatype.PTR for rrset in response.answer), response
    return NO_PTR


@pytest.mark.knot
@pytest.mark.parametrize("host, pattern", [
    (13, DUNNO),       # RFC 2317 into another zone: the resolver follows it
    (14, DUNNO),       # 11 CNAMEs
    (15, CHAIN_31),    # 31 CNAMEs: beyond the resolver's limit (see chain_31_reply)
    (16, TEMP_RDNS),   # a loop: unbound answers SERVFAIL
])
def test_cname_chains_on_ptr_names_through_unbound(unbound, failures, host, pattern):
    """Long CNAME chains and loops on PTR names, resolved by a real unbound: 4xx only, and
    for a chain unbound gives up on, the reply its own answer calls for."""
    if pattern == CHAIN_31:
        pattern = chain_31_reply(unbound.port)
    assert_reply(decide(unbound.port, knot_ip(host), "a@pass.robust.test", timeout=2.0),
                 pattern)
    assert failures == []


# -- end to end: the daemon process ---------------------------------------------------------
# (client address, sender, reply) through unbound.
UNBOUND_CASES = [
    (knot_ip(10), "a@pass.robust.test", DUNNO),
    (knot_ip(11), "a@pass.robust.test", NO_PTR),
    (knot_ip(13), "a@pass.robust.test", DUNNO),
    (knot_ip(14), "a@pass.robust.test", DUNNO),
    (knot_ip(15), "a@pass.robust.test", CHAIN_31),
    (knot_ip(16), "a@pass.robust.test", TEMP_RDNS),
    *[(address, f"{LONG_LOCAL if n == 'macro' else 'a'}@{n}.robust.test", p)
      for n, address, _, p in SPF_KNOT_CASES],
    (bad_ip(0x1), "a@pass.robust.test", TEMP_RDNS),      # SERVFAIL from the zone's server
    (bad_ip(0x2), "a@pass.robust.test", TEMP_RDNS),      # REFUSED (lame server)
    (bad_ip(0x8), "a@pass.robust.test", TEMP_RDNS),      # TC, TCP closed
    (knot_ip(10), "a@servfail.bad.test", TEMP_SPF),
    (knot_ip(10), "a@truncate.bad.test", TEMP_SPF),
    ("2001:db8:8::25", "a@pass.robust.test", TEMP_RDNS),  # reverse zone never answers
    (knot_ip(10), "a@x.dropped.test", TEMP_SPF),          # sender's zone never answers
    (knot_ip(10), "a@x.hole.test", TEMP_SPF),             # sender's server black-holed
]


def assert_served(daemon, cases):
    replies = []
    with daemon.connect(timeout=15) as sock:
        for address, sender, pattern in cases:
            reply = ask(sock, request(client_address=address, sender=sender,
                                      recipient="bob@robust.test",
                                      helo_name="helo.robust.test"), timeout=15)
            replies.append((address, sender, reply))
            assert reply is not None, f"closed without a reply for {address} {sender}"
            assert re.fullmatch(pattern, reply), (address, sender, reply)
    assert daemon.alive(), daemon.log()[-3000:]
    assert daemon.problems() == []
    return replies


@pytest.mark.knot
def test_daemon_behind_unbound_answers_every_fault(tmp_path, unbound):
    """The daemon process, asking a real unbound, answers each fault with the right reply
    class over one policy connection, and is still running with no traceback logged."""
    settings = {"nameservers": [f"127.0.0.1:{unbound.port}"], "dns_timeout_seconds": 0.5,
                "dns_attempts": 2, "decision_deadline_seconds": 3.0}
    chain_31 = chain_31_reply(unbound.port)
    cases = [(a, s, chain_31 if p == CHAIN_31 else p) for a, s, p in UNBOUND_CASES]
    with ServeProcess(tmp_path, settings, optin="robust.test\n") as daemon:
        assert_served(daemon, cases)


DIRECT_CASES = [
    (bad_ip(0x100), "a@pass.bad.test", DUNNO),
    (bad_ip(0x5), "a@pass.bad.test", DUNNO),          # garbage, then the answer
    (bad_ip(0x7), "a@pass.bad.test", DUNNO),          # wrong ID, then the answer
    (bad_ip(0xa), "a@pass.bad.test", DUNNO),          # slow answer
    (bad_ip(0x1), "a@pass.bad.test", TEMP_RDNS),
    (bad_ip(0x2), "a@pass.bad.test", TEMP_RDNS),
    (bad_ip(0x3), "a@pass.bad.test", TEMP_RDNS),
    (bad_ip(0x4), "a@pass.bad.test", TEMP_RDNS),
    (bad_ip(0x6), "a@pass.bad.test", TEMP_RDNS),
    (bad_ip(0x9), "a@pass.bad.test", TEMP_RDNS),      # TC and TCP refused
    (bad_ip(0x100), "a@huge.bad.test", TEMP_SPF),     # TC and TCP refused: not permerror
    (bad_ip(0x100), "a@servfail.bad.test", TEMP_SPF),
    (bad_ip(0x100), "a@garbage.bad.test", TEMP_SPF),
    (bad_ip(0x100), "a@incfail.bad.test", TEMP_SPF),
    (bad_ip(0x100), "a@asilent.bad.test", TEMP_SPF),
    (bad_ip(0x100), "a@nope.bad.test", AUTH),
    (bad_ip(0xff), "a@pass.bad.test", NO_PTR),
]


@pytest.mark.process
def test_daemon_against_a_broken_resolver(tmp_path, bad_no_tcp):
    """The daemon process, asking a server that sends junk, spoofed IDs, truncation without
    TCP, SERVFAIL, REFUSED or nothing, answers 451 4.4.3 for each fault and stays up."""
    settings = {"nameservers": [f"127.0.0.1:{bad_no_tcp.port}"], "dns_timeout_seconds": 0.4,
                "dns_attempts": 1, "decision_deadline_seconds": 3.0}
    with ServeProcess(tmp_path, settings, optin="robust.test\n") as daemon:
        assert_served(daemon, DIRECT_CASES)
