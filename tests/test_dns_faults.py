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

import ipaddress
import itertools
import re
import time

import pytest
from twisted.logger import globalLogPublisher

from lab.baddns import BadDns, Behaviour
from lab.daemonproc import ServeProcess, request
from lab.knot import KnotServer, free_port, require_knot
from lab.unbound import BlackHoles, UnboundServer, require_unbound
from lab.zones import Zone, reverse_zone_name, txt_rdata
from policyd_ipv6.decision import Policy
from policyd_ipv6.dns_client import DnsClient, Nameserver
from policyd_ipv6.engine import PolicyEngine
from policyd_ipv6.facts import RdnsOutcome
from policyd_ipv6.lookups import Lookups
from policyd_ipv6.message_facts import FactFinder
from policyd_ipv6.optin import parse_optin
from realtime import wait

DUNNO = r"DUNNO"
TEMP_RDNS = r"451 4\.4\.3 .*reverse DNS.*"
TEMP_SPF = r"451 4\.4\.3 .*SPF.*"
NO_PTR = r"450 4\.7\.25 .*"
AUTH = r"450 4\.7\.26 .*"

# -- the data -------------------------------------------------------------------------------
# 2001:db8:6::/64 and robust.test: served by Knot. 2001:db8:7::/64 and bad.test: the bad server.
# 2001:db8:8::/64 and dropped.test: denied by unbound. hole.test: a black-holed stub zone.


def knot_ip(n: int) -> str:
    return f"2001:db8:6::{n}"


def bad_ip(n: int) -> str:
    return f"2001:db8:7::{n:x}"


def ptr_name(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer


KNOT_REV = reverse_zone_name("2001:db8:6::/64")
BAD_REV = reverse_zone_name("2001:db8:7::/64")
DROPPED_REV = reverse_zone_name("2001:db8:8::/64")
HUGE_SPF = ("v=spf1 " + " ".join(f"ip6:2001:db8:{i:x}::/48" for i in range(0x100, 0x400))
            + " ip6:2001:db8:6::/64 ip6:2001:db8:7::/64 -all")
LONG_LOCAL = "x" * 63  # %{l} five times: a name over 255 octets

SPF_RECORDS = {
    "pass": "v=spf1 ip6:2001:db8:6::/64 ip6:2001:db8:7::/64 -all",
    "selfloop": "v=spf1 include:selfloop.robust.test -all",
    "loopa": "v=spf1 include:loopb.robust.test -all",
    "loopb": "v=spf1 include:loopa.robust.test -all",
    "eleven": "v=spf1 " + " ".join(f"a:h{i}.robust.test" for i in range(11))
              + " ip6:2001:db8:6::/64 -all",
    "voids": "v=spf1 a:v1.robust.test a:v2.robust.test a:v3.robust.test ip6:2001:db8:6::/64 -all",
    "unknownmech": "v=spf1 frobnicate:x.robust.test ip6:2001:db8:6::/64 -all",
    "nonascii": "v=spf1 ip6:2001:db8:6::/64 a:bücher.robust.test -all",
    "macro": "v=spf1 exists:%{l}.%{l}.%{l}.%{l}.%{l}.robust.test ip6:2001:db8:6::/64 -all",
    "huge": HUGE_SPF,
}
# (sender domain under robust.test, client address, SPF result, reply)
SPF_KNOT_CASES = [
    ("pass", knot_ip(10), "pass", DUNNO),
    ("selfloop", knot_ip(10), "permerror", AUTH),       # include loop
    ("loopa", knot_ip(10), "permerror", AUTH),          # include loop over two records
    ("eleven", knot_ip(10), "permerror", AUTH),         # 11 DNS-querying terms
    ("voids", knot_ip(10), "permerror", AUTH),          # 3 void lookups
    ("unknownmech", knot_ip(10), "permerror", AUTH),
    ("nonascii", knot_ip(10), "permerror", AUTH),       # UTF-8 in the record
    ("latin1", knot_ip(10), "permerror", AUTH),         # not even UTF-8
    ("lf", knot_ip(10), "fail", AUTH),                  # ip4:1.2.3.4\010 (pyspf#15)
    ("two", knot_ip(10), "permerror", AUTH),            # two SPF records
    ("macro", knot_ip(10), "pass", DUNNO),              # a macro name over 255 octets
    ("huge", knot_ip(10), "pass", DUNNO),               # ~8 KB TXT: TCP fallback
    ("nothere", knot_ip(10), "none", AUTH),
]


def knot_zones() -> dict[str, str]:
    forward = Zone("robust.test")
    forward.add("mail", "AAAA", knot_ip(10))
    for i in range(11):
        forward.add(f"h{i}", "AAAA", knot_ip(200 + i))
    for name, text in SPF_RECORDS.items():
        forward.add(name, "TXT", txt_rdata(text))
    forward.add("lf", "TXT", '"v=spf1 ip4:1.2.3.4\\010 -all"')
    forward.add("latin1", "TXT", '"v=spf1 ip6:2001:db8:6::/64 a:b\\252cher.robust.test -all"')
    forward.add("two", "TXT", txt_rdata(SPF_RECORDS["pass"]))
    forward.add("two", "TXT", txt_rdata("v=spf1 -all"))
    forward.add("13.ptr", "PTR", "mail.robust.test.")
    rev = Zone(KNOT_REV)
    rev.add(ptr_name(knot_ip(10)) + ".", "PTR", "mail.robust.test.")
    # RFC 2317 style: the ip6.arpa owner is itself a CNAME (in the zone, and into another zone).
    rev.add(ptr_name(knot_ip(12)) + ".", "CNAME", f"12.sub.{KNOT_REV}.")
    rev.add(f"12.sub.{KNOT_REV}.", "PTR", "mail.robust.test.")
    rev.add(ptr_name(knot_ip(13)) + ".", "CNAME", "13.ptr.robust.test.")
    # A chain of 11 CNAMEs (a resolver follows it), one of 31 (no resolver does), a loop.
    rev.add(ptr_name(knot_ip(14)) + ".", "CNAME", f"c1.chain.{KNOT_REV}.")
    for i in range(1, 10):
        rev.add(f"c{i}.chain.{KNOT_REV}.", "CNAME", f"c{i + 1}.chain.{KNOT_REV}.")
    rev.add(f"c10.chain.{KNOT_REV}.", "PTR", "mail.robust.test.")
    rev.add(ptr_name(knot_ip(15)) + ".", "CNAME", f"l1.long.{KNOT_REV}.")
    for i in range(1, 30):
        rev.add(f"l{i}.long.{KNOT_REV}.", "CNAME", f"l{i + 1}.long.{KNOT_REV}.")
    rev.add(f"l30.long.{KNOT_REV}.", "PTR", "mail.robust.test.")
    rev.add(ptr_name(knot_ip(16)) + ".", "CNAME", f"a.loop.{KNOT_REV}.")
    rev.add(f"a.loop.{KNOT_REV}.", "CNAME", f"b.loop.{KNOT_REV}.")
    rev.add(f"b.loop.{KNOT_REV}.", "CNAME", f"a.loop.{KNOT_REV}.")
    return {"robust.test": forward.text(), KNOT_REV: rev.text()}


GOOD_PTR = (("PTR", "mail.bad.test."),)
# PTR behaviours of the bad server, by host number in 2001:db8:7::/64.
BAD_PTRS = {
    0x1: Behaviour("servfail"),
    0x2: Behaviour("refused"),
    0x3: Behaviour("silent"),
    0x4: Behaviour("garbage"),
    0x5: Behaviour("garbage", GOOD_PTR, then_answer=True),
    0x6: Behaviour("wrong-id", GOOD_PTR),
    0x7: Behaviour("wrong-id", GOOD_PTR, then_answer=True),
    0x8: Behaviour("truncate", GOOD_PTR, tcp="close"),
    0x9: Behaviour("truncate", GOOD_PTR, tcp="answer"),
    0xa: Behaviour("answer", GOOD_PTR, delay_ms=150),
    0xb: Behaviour("truncate", GOOD_PTR, tcp="garbage"),
    0xc: Behaviour("truncate", GOOD_PTR, tcp="silent"),
    0x100: Behaviour("answer", GOOD_PTR),
}
PASS_BAD = (("TXT", txt_rdata(SPF_RECORDS["pass"])),)
BAD_NAMES = {
    "pass.bad.test": Behaviour(records=PASS_BAD),
    "servfail.bad.test": Behaviour("servfail"),
    "refused.bad.test": Behaviour("refused"),
    "silent.bad.test": Behaviour("silent"),
    "garbage.bad.test": Behaviour("garbage"),
    "truncate.bad.test": Behaviour("truncate", PASS_BAD, tcp="close"),
    "huge.bad.test": Behaviour(records=(("TXT", txt_rdata(HUGE_SPF)),)),
    "incfail.bad.test": Behaviour(records=(("TXT", txt_rdata(
        "v=spf1 include:servfail.bad.test ip6:2001:db8:7::/64 -all")),)),
    "asilent.bad.test": Behaviour(records=(("TXT", txt_rdata(
        "v=spf1 a:silent.bad.test ip6:2001:db8:7::/64 -all")),)),
}


def bad_table() -> dict:
    table = {ptr_name(bad_ip(n)): b for n, b in BAD_PTRS.items()}
    table.update(BAD_NAMES)
    return table


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


@pytest.mark.parametrize("name, pattern", SPF_FAULTS, ids=[n for n, _ in SPF_FAULTS])
def test_spf_fault_in_process(bad, failures, name, pattern):
    """A fault on any SPF lookup gives 451 4.4.3 naming SPF, never 4.7.26 or a 5xx."""
    outcome = decide(bad.port, bad_ip(0x100), f"a@{name}.bad.test")
    assert_reply(outcome, pattern)
    assert outcome.facts.rdns.outcome is RdnsOutcome.PASS
    if pattern == TEMP_SPF:
        assert outcome.facts.spf.result == "temperror"
    assert failures == []


def test_huge_txt_came_over_tcp(bad):
    """The huge SPF record does not fit a UDP answer: it was fetched again over TCP."""
    assert len(HUGE_SPF) > 4000
    before = bad.queried("huge.bad.test", "TXT", "tcp")
    assert_reply(decide(bad.port, bad_ip(0x100), "a@huge.bad.test"), DUNNO)
    assert bad.queried("huge.bad.test", "TXT", "tcp") == before + 1


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


@pytest.mark.knot
@pytest.mark.parametrize("host, pattern", [
    (13, DUNNO),       # RFC 2317 into another zone: the resolver follows it
    (14, DUNNO),       # 11 CNAMEs
    (15, NO_PTR),      # 31 CNAMEs: beyond the resolver's limit, an unusable PTR
    (16, TEMP_RDNS),   # a loop: unbound answers SERVFAIL
])
def test_cname_chains_on_ptr_names_through_unbound(unbound, failures, host, pattern):
    """Long CNAME chains and loops on PTR names, resolved by a real unbound: 4xx only."""
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
    (knot_ip(15), "a@pass.robust.test", NO_PTR),
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
        from lab.daemonproc import ask
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
    with ServeProcess(tmp_path, settings, optin="robust.test\n") as daemon:
        assert_served(daemon, UNBOUND_CASES)


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


def test_daemon_against_a_broken_resolver(tmp_path, bad_no_tcp):
    """The daemon process, asking a server that sends junk, spoofed IDs, truncation without
    TCP, SERVFAIL, REFUSED or nothing, answers 451 4.4.3 for each fault and stays up."""
    settings = {"nameservers": [f"127.0.0.1:{bad_no_tcp.port}"], "dns_timeout_seconds": 0.4,
                "dns_attempts": 1, "decision_deadline_seconds": 3.0}
    with ServeProcess(tmp_path, settings, optin="robust.test\n") as daemon:
        assert_served(daemon, DIRECT_CASES)
