"""Hostile request values always get a defined answer: a valid access(5) action, or Postfix's
failure contract (the connection closed without a reply); never an exception.

What a remote SMTP client controls reaches the daemon through Postfix: HELO, MAIL FROM, RCPT
TO, and its own DNS. Hypothesis generates over-long and non-ASCII local parts and domains,
quoted local parts with ``@``, address literals, recipients without a domain, domains over 255
octets or with labels over 63, NUL and control characters and invalid UTF-8 on the wire. They
go through the engine (with the DNS fake of tests/fakes.py and a fake clock), through the codec
and the Twisted adapter (``StringTransport``, split anywhere), with Twisted's log observed for
failures, and a curated set through the daemon process itself.
"""

import ipaddress
import re

import pytest
from fakes import FakeDnsClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lab.baddns import BadDns, Behaviour
from lab.daemonproc import ServeProcess, ask, is_valid_action, request
from lab.zones import txt_rdata
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from policyd_ipv6.checks.gather import FactFinder
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.codec import encode_reply
from policyd_ipv6.policy.decision import Policy
from policyd_ipv6.policy.engine import PolicyEngine
from policyd_ipv6.policy.server import PolicyFactory
from policyd_ipv6.resolver.lookups import Lookups

DEADLINE = 5.0
WITH_PTR = "2001:db8::25"
SILENT_PTR = "2001:db8::53"
OPTIN = "contoso.com\n.contoso.com\nbücher.example\n"
RECORDS = {
    (ipaddress.ip_address(WITH_PTR).reverse_pointer, "PTR"): ["mx.example.net."],
    ("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"'],
    ("fail.example", "TXT"): ['"v=spf1 -all"'],
    ("macro.example", "TXT"): ['"v=spf1 exists:%{l}.%{h}.%{d}.macro.example -all"'],
}
SPF_DOMAINS = ["example.net", "fail.example", "macro.example", "silent.example"]
SILENT = {ipaddress.ip_address(SILENT_PTR).reverse_pointer, "silent.example"}
REPLY = re.compile(rb"action=([^\n]*)\n\n")

# -- strategies -----------------------------------------------------------------------------
anything = st.text(max_size=300)  # every code point, controls and NUL included
non_ascii = st.text(st.characters(min_codepoint=0x80), min_size=1, max_size=80)
controls = st.text(st.characters(max_codepoint=0x1f), min_size=1, max_size=5)
label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
long_label = st.text("abcxyz0189-", min_size=64, max_size=120)
domain = st.one_of(
    st.lists(label, min_size=1, max_size=6).map(".".join),
    st.lists(label, min_size=5, max_size=12).map(".".join),           # often over 255 octets
    st.tuples(long_label, label).map(".".join),                       # a label over 63
    st.lists(st.one_of(label, non_ascii), min_size=1, max_size=4).map(".".join),
    st.builds("{}.contoso.com".format, st.one_of(label, non_ascii, long_label, anything)),
    st.sampled_from(["contoso.com", "CONTOSO.COM.", "bücher.example", "xn--bcher-kva.example",
                     "[IPv6:2001:db8::1]", "[192.0.2.1]", "[IPv6:junk]", "a..b", ".", "",
                     "contoso.com\x00", "silent.example", "fail.example", "macro.example",
                     "x" * 300 + ".contoso.com"]),
    st.builds("{}{}{}".format, st.sampled_from(["", "contoso.com", "a.b"]), controls,
              st.sampled_from(["", "contoso.com", ".a.b"])),
    anything,
)
local_part = st.one_of(
    label, anything, non_ascii, st.text("x", min_size=64, max_size=400),
    st.builds('"{}@{}"'.format, anything, domain),                     # quoted, with @
    st.sampled_from(["postmaster", "Postmaster", "", "@", "a@b@c", "\"\"", "<>"]),
)
address = st.one_of(
    st.builds("{}@{}".format, local_part, domain),
    local_part,                                                       # no domain at all
    st.builds("<{}@{}>".format, local_part, domain),
    anything,
)
client_address = st.one_of(
    st.sampled_from([WITH_PTR, SILENT_PTR, "2001:DB8::25", "192.0.2.1", "::ffff:192.0.2.1",
                     "::1", "::", "fe80::1%eth0", "unknown", "", "2001:db8::25\x00",
                     "[2001:db8::25]", "IPv6:2001:db8::25"]),
    st.ip_addresses(v=6).map(str),
    anything,
)
opted_in = st.one_of(
    st.sampled_from(["contoso.com", "Contoso.COM.", "bücher.example", "xn--bcher-kva.example"]),
    st.builds("{}.contoso.com".format, st.one_of(label, non_ascii, long_label, anything)),
)
# Requests that reach the DNS checks: RCPT stage, an IPv6 client, an opted-in recipient; only
# what the remote client controls (HELO, MAIL FROM, RCPT local part, its DNS names) is hostile.
deep = st.fixed_dictionaries(
    {"request": st.just("smtpd_access_policy"),
     "protocol_state": st.just("RCPT"),
     "client_address": st.one_of(st.sampled_from([WITH_PTR, SILENT_PTR]),
                                 st.ip_addresses(v=6).map(str)),
     "helo_name": st.one_of(domain, anything),
     "sender": st.builds("{}@{}".format, local_part, st.sampled_from(SPF_DOMAINS)),
     "recipient": st.builds("{}@{}".format, local_part, opted_in),
     "instance": st.one_of(st.just(""), st.sampled_from(["a.1", "a.2"]), anything)},
    optional={"reverse_client_name": st.one_of(st.just("unknown"), domain),
              "client_name": st.one_of(st.just("unknown"), domain)},
)
# Anything at all, in every attribute the decision reads (the null sender too).
wide = st.fixed_dictionaries(
    {"request": st.just("smtpd_access_policy"),
     "protocol_state": st.one_of(st.just("RCPT"), st.sampled_from(["rcpt", "MAIL", ""]),
                                 anything),
     "client_address": client_address,
     "helo_name": st.one_of(domain, anything),
     "sender": st.one_of(st.just(""), address),
     "recipient": address,
     "instance": st.one_of(st.just(""), st.sampled_from(["a.1", "a.2"]), anything)},
    optional={"reverse_client_name": st.one_of(st.just("unknown"), domain),
              "client_name": st.one_of(st.just("unknown"), domain),
              "sasl_username": st.one_of(st.just(""), anything)},
)


# -- harness ---------------------------------------------------------------------------------
class Harness:
    """The engine and adapter over the DNS fake and a fake clock, with the log observed."""

    def __init__(self, mode: str = "ptr") -> None:
        self.clock = task.Clock()
        self.fake = FakeDnsClient(RECORDS, silent=SILENT)
        lookups = Lookups(self.fake, self.clock)
        finder = FactFinder(lookups, self.clock, mode, DEADLINE)
        table = parse_optin(OPTIN)
        self.engine = PolicyEngine(Policy(), lambda: table, finder, self.clock)
        self.factory = PolicyFactory(self.engine, self.clock, 100, 3600.0)

    def settle(self) -> None:
        """Let every pending decision reach its deadline (requests on a connection are
        answered one after the other, so each may wait for its own)."""
        for _ in range(20):
            self.clock.advance(DEADLINE + 1)


@pytest.fixture
def failures():
    seen = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("log_level") is not None and \
                event["log_level"].name in ("error", "critical"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def assert_one_line_ascii(text: str) -> None:
    assert all(0x20 <= ord(ch) < 0x7f for ch in text), repr(text)


# -- the engine -----------------------------------------------------------------------------
def check_engine(attrs: dict, mode: str, failures: list) -> None:
    h = Harness(mode)
    results = []
    h.engine.answer(attrs).addBoth(results.append)
    h.settle()
    assert len(results) == 1, "no answer, even after the deadline"
    outcome = results[0]
    action = outcome.verdict.action
    assert is_valid_action(action), repr(action)
    assert encode_reply(action).count(b"\n") == 2
    assert_one_line_ascii(outcome.log_line())
    if action.startswith("5"):
        assert outcome.verdict.rule == "not-opted-in"
    assert failures == []


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(attrs=deep, mode=st.sampled_from(["ptr", "fcrdns"]))
def test_engine_answers_hostile_values_that_reach_dns(failures, attrs, mode):
    """Hostile HELO, MAIL FROM, RCPT local parts and PTR names on requests that go through
    the rDNS and SPF checks: a valid action, a one-line escaped log line, no failure logged."""
    check_engine(attrs, mode, failures)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(attrs=wide)
def test_engine_answers_any_request(failures, attrs):
    """Anything in every attribute the decision reads: a valid action, a one-line escaped
    log line, a 5xx only for a recipient domain that has not opted in."""
    check_engine(attrs, "ptr", failures)


@pytest.mark.parametrize("recipient, reply", [
    ("postmaster", "DUNNO"),                                   # no domain (RFC 5321)
    ('"a@b"@contoso.com', "DUNNO"),                             # quoted @ in the local part
    ("bob@[IPv6:2001:db8::1]", r"550 5\.2\.1 .*\[\[ipv6:2001:db8::1\]\].*"),
    ("bob@" + "a" * 64 + ".contoso.com", r"550 5\.2\.1 .*"),    # label over 63
    ("bob@" + ".".join(["abcdefgh"] * 30) + ".contoso.com", r"550 5\.2\.1 .*\.\.\.\].*"),
    ("bob@bücher.example", "DUNNO"),
    ("bob@b\u00fccher.EXAMPLE.", "DUNNO"),
    ("bob@contoso.com\x07", r"550 5\.2\.1 .*\\x07.*"),
    ("bob@k\u00f6ln\u202e.example", r"550 5\.2\.1 .*\\u202e.*"),
])
def test_hostile_recipients_get_the_defined_reply(failures, recipient, reply):
    """Representative hostile recipients get the reply the decision table defines for them,
    with untrusted characters escaped in the reply text."""
    h = Harness()
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": WITH_PTR, "helo_name": "mx.example.net",
             "sender": "a@example.net", "recipient": recipient, "instance": "x.1"}
    results = []
    h.engine.answer(attrs).addBoth(results.append)
    h.settle()
    assert re.fullmatch(reply, results[0].verdict.action), results[0].verdict.action
    assert failures == []


# -- the codec and the adapter --------------------------------------------------------------
def wire(attrs: dict) -> bytes:
    return b"".join(k.encode() + b"=" + v.encode("utf-8", "surrogatepass") + b"\n"
                    for k, v in attrs.items()) + b"\n"


raw_value = st.one_of(
    st.binary(max_size=200),                                      # invalid UTF-8, NUL, \r ...
    st.sampled_from([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"a\x00b", b"a\rb", b"\x1b[2J"]),
)
stream = st.one_of(
    st.lists(st.one_of(deep, wide).map(wire), min_size=1, max_size=4).map(b"".join),
    st.builds(lambda a, k, v: wire(a)[:-1].replace(b"\n", b"\n" + k + b"=" + v + b"\n", 1)
              + b"\n", deep, st.sampled_from([b"helo_name", b"x", b"sender"]), raw_value),
    st.builds(lambda a, junk: wire(a) + junk, deep, st.binary(max_size=300)),
)


def expected_requests(data: bytes) -> int:
    """How many requests the stream ends (one per empty line)."""
    return data.split(b"\n")[:-1].count(b"")


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=stream, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6))
def test_adapter_answers_or_closes_for_any_stream(failures, data, cuts):
    """Any byte stream, split anywhere: each request gets exactly one valid reply, in order,
    or the connection is closed without one; no exception reaches the reactor."""
    h = Harness()
    proto = h.factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(points, points[1:]):
        proto.dataReceived(data[start:end])  # an exception here fails the test
    h.settle()
    output = transport.value()
    replies = REPLY.findall(output)
    assert b"".join(b"action=" + r + b"\n\n" for r in replies) == output, output
    for reply in replies:
        assert is_valid_action(reply.decode("ascii")), reply
    requests = expected_requests(data)
    assert len(replies) <= requests
    if len(replies) < requests:
        assert transport.disconnecting, "a request got neither a reply nor a close"
    assert failures == []


# -- the daemon process ---------------------------------------------------------------------
CURATED = [
    ("recipient", "postmaster"),
    ("recipient", '"bob@contoso.com"'),
    ("recipient", '"a@b"@contoso.com'),
    ("recipient", "bob@[IPv6:2001:db8::1]"),
    ("recipient", "bob@" + "a" * 64 + ".contoso.com"),
    ("recipient", "bob@" + ".".join(["abcdefgh"] * 40)),
    ("recipient", "bób@bücher.example"),
    ("recipient", "x" * 8000 + "@contoso.com"),
    ("sender", "x" * 63 + "@macro.example"),
    ("sender", "a@" + ".".join(["abcdefgh"] * 40)),
    ("sender", "a@" + "a" * 64 + ".example"),
    ("sender", "ä@bücher.example"),
    ("sender", '"very@strange"@example.net'),
    ("sender", "a@[IPv6:2001:db8::25]"),
    ("sender", "a@-bad-.example"),
    ("helo_name", "[IPv6:2001:db8::25]"),
    ("helo_name", "x" * 300),
    ("client_address", "2001:db8::25%eth0"),
    ("client_address", "fe80::1%" + "x" * 200),
    ("client_address", "not an address"),
    ("reverse_client_name", "\x1b[31mred.example"),
    ("instance", "\x7f" * 100),
]
RAW = [
    (b"sender", b"\xff\xfe@\xc3.example"),          # invalid UTF-8
    (b"recipient", b"bob@contoso.com\xed\xa0\x80"),  # an encoded surrogate
    (b"helo_name", b"\x1b]0;title\x07"),             # terminal escapes
    (b"sender", b"a@b\rc.example"),                 # a carriage return
    (b"recipient", "bób@bücher.example".encode("latin-1")),
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    ptr = ipaddress.ip_address(WITH_PTR).reverse_pointer
    table = {ptr: Behaviour(records=(("PTR", "mx.example.net."),)),
             "example.net": Behaviour(records=(("TXT", txt_rdata(
                 "v=spf1 ip6:2001:db8::/64 -all")),)),
             "macro.example": Behaviour(records=(("TXT", txt_rdata(
                 "v=spf1 exists:%{l}.%{l}.%{l}.%{l}.%{l}.macro.example -all")),))}
    with BadDns(table) as dns_server:
        settings = {"nameservers": [f"127.0.0.1:{dns_server.port}"], "dns_timeout_seconds": 0.5,
                    "decision_deadline_seconds": 3.0}
        with ServeProcess(tmp_path_factory.mktemp("hostile"), settings, optin=OPTIN) as proc:
            yield proc


def raw_request(key: bytes, value: bytes) -> bytes:
    """A request whose ``key`` attribute is the raw bytes ``value``."""
    lines = request(client_address=WITH_PTR, recipient="bob@contoso.com").split(b"\n")
    kept = [line for line in lines[:-2] if not line.startswith(key + b"=")]
    return b"\n".join(kept + [key + b"=" + value]) + b"\n\n"


@pytest.mark.process
def test_daemon_process_answers_hostile_values(daemon):
    """Through the real process, hostile values each get a valid action on one connection,
    and invalid UTF-8 or control bytes on the wire too; nothing is logged as a failure."""
    with daemon.connect(timeout=10) as sock:
        for key, value in CURATED:
            attrs = {"client_address": WITH_PTR, "recipient": "bob@contoso.com", key: value}
            reply = ask(sock, request(**attrs))
            assert reply is not None and is_valid_action(reply), (key, value, reply)
        for key, value in RAW:
            reply = ask(sock, raw_request(key, value))
            assert reply is not None and is_valid_action(reply), (key, value, reply)
    assert daemon.alive() and daemon.problems() == []
    for line in daemon.log().splitlines():
        assert_one_line_ascii(line)
