"""The RFC 7208 and RFC 4408 SPF test suites (tests/spf_suite, from pyspf 2.0.14's source
distribution, with their licences), run through the daemon's own SPF check, lookups and DNS
client against a DNS server on loopback that serves each scenario's zone data.

Each case passes when the result is one the suite allows and, where the suite names an
explanation, the explanation is exactly that text (``DEFAULT``: the record gave none, so the
daemon's default text for the result stands).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from realtime import wait
from suitedns import ZoneServer

from policyd_ipv6.checks.spf import check_spf
from policyd_ipv6.checks.spf_eval import DEFAULT_EXPLANATIONS
from policyd_ipv6.resolver.client import DnsClient, Nameserver
from policyd_ipv6.resolver.lookups import Lookups

yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.process

SUITES = Path(__file__).resolve().parent / "spf_suite"
# A timeout in the zone data must cost little: one try of 0.3 s.
TIMEOUT_SECONDS = 0.3


def _cases():
    for suite in ("rfc7208-tests.yml", "rfc4408-tests.yml"):
        with open(SUITES / suite, "rb") as stream:
            for scenario in yaml.safe_load_all(stream):
                for name, test in scenario["tests"].items():
                    yield pytest.param(scenario["zonedata"], test,
                                       id=f"{suite.split('-')[0]}-{name}")


CASES = list(_cases())


def test_the_suites_are_complete():
    """All 394 cases of the two suites are collected (a truncated file cannot pass unnoticed)."""
    assert len(CASES) == 394


@pytest.mark.parametrize("zonedata, test", CASES)
def test_suite_case(zonedata, test):
    """One case of the official suites gives an allowed result and the exact explanation."""
    from twisted.internet import reactor

    server = ZoneServer(reactor, zonedata)
    try:
        client = DnsClient(reactor, [Nameserver("127.0.0.1", server.port)], TIMEOUT_SECONDS,
                           attempts=1)
        lookups = Lookups(client, reactor)
        fact = wait(check_spf(lookups, ipaddress.ip_address(test["host"]), test["mailfrom"],
                              test["helo"]), timeout=30)
    finally:
        wait(server.stop())
    allowed = test["result"] if isinstance(test["result"], list) else [test["result"]]
    assert fact.result in allowed, fact.explanation
    expected = test.get("explanation")
    if expected == "DEFAULT":
        assert fact.explanation == DEFAULT_EXPLANATIONS[fact.result]
    elif expected is not None:
        assert fact.explanation == expected
