"""Golden files of the policy protocol: Postfix's request bytes in, the daemon's reply bytes out.

Each ``tests/golden/policy/NAME.in`` holds what Postfix 3.7's smtpd writes to the policy
socket in one go (every attribute, in Postfix's order, LF-terminated, a blank line after each
request; see SMTPD_POLICY_README); ``NAME.ref`` holds exactly the bytes the daemon must write
back. They are replayed through the real PolicyEngine and PolicyFactory adapter over a
``StringTransport``, with the DNS fake of tests/fakes.py and a fake clock, as one write and
one byte at a time. To add a case, add both files; the test finds them.

The fake DNS: 2001:db8::25 has the PTR mx.example.net; 2001:db8::26 has none; example.net
publishes ``v=spf1 ip6:2001:db8::/64 -all`` and fail.example ``v=spf1 -all``. contoso.com is
opted in, fabrikam.example is not.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from fakes import FakeDnsClient
from twisted.internet import task
from twisted.internet.testing import StringTransport

from policyd_ipv6.checks.gather import FactFinder
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import Policy
from policyd_ipv6.policy.engine import PolicyEngine
from policyd_ipv6.policy.server import PolicyFactory
from policyd_ipv6.resolver.lookups import Lookups

GOLDEN = Path(__file__).resolve().parent / "golden" / "policy"
CASES = sorted(p.stem for p in GOLDEN.glob("*.in"))
RECORDS = {
    (ipaddress.ip_address("2001:db8::25").reverse_pointer, "PTR"): ["mx.example.net."],
    ("mx.example.net", "AAAA"): ["2001:db8::25"],
    ("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"'],
    ("fail.example", "TXT"): ['"v=spf1 -all"'],
}
OPTIN = "contoso.com\n"


def replay(chunks: list[bytes]) -> bytes:
    """Feed `chunks` to a fresh policy connection; return every byte written back."""
    clock = task.Clock()
    finder = FactFinder(Lookups(FakeDnsClient(RECORDS), clock), clock, "ptr", 15.0)
    table = parse_optin(OPTIN)
    factory = PolicyFactory(PolicyEngine(Policy(), lambda: table, finder, clock), clock)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    for chunk in chunks:
        protocol.dataReceived(chunk)
    clock.advance(0)
    assert not transport.disconnecting, "the connection was closed: %r" % transport.value()
    return transport.value()


def test_the_golden_cases_are_all_there():
    """Every required case has its request and its reply file."""
    assert set(CASES) >= {"ipv4", "not_opted_in", "no_ptr", "spf_fail", "pass", "pipelined",
                          "not_rcpt"}
    assert sorted(p.stem for p in GOLDEN.glob("*.ref")) == CASES


@pytest.mark.parametrize("name", CASES)
def test_golden_request_gives_the_reference_reply(name):
    """The request bytes of NAME.in, sent in one write, get exactly the bytes of NAME.ref."""
    sent = (GOLDEN / ("%s.in" % name)).read_bytes()
    assert sent.endswith(b"\n\n") and b"\r" not in sent
    assert replay([sent]) == (GOLDEN / ("%s.ref" % name)).read_bytes()


@pytest.mark.parametrize("name", CASES)
def test_golden_request_byte_at_a_time_gives_the_same_reply(name):
    """Fed one byte at a time, NAME.in still gets exactly NAME.ref."""
    sent = (GOLDEN / ("%s.in" % name)).read_bytes()
    assert replay([sent[i:i + 1] for i in range(len(sent))]) == (
        GOLDEN / ("%s.ref" % name)).read_bytes()
