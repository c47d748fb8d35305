"""Cold decisions through the real DNS path leave no cyclic garbage: every object a lookup,
a DNS query or an SPF evaluation builds is freed by reference counting when it ends, so the
garbage collector (daemon.collector) has nothing to find after them and freezing survivors
keeps no garbage alive.

The daemon's own DnsClient, Lookups, fact finder and policy engine run on the real reactor
against a real Knot on loopback serving wildcard zones (every sender has an SPF record, every
client address a PTR), each request from a new sender and address.
"""

import gc
import ipaddress
import time

import pytest
from cyclic import cyclic_garbage, instances_of
from lab.knot import KnotServer, free_port, require_knot
from realtime import wait
from twisted.internet import defer

from policyd_ipv6.checks import spf as spf_module
from policyd_ipv6.checks.gather import FactFinder, MessageFacts
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import Policy
from policyd_ipv6.policy.engine import PolicyEngine
from policyd_ipv6.resolver import client as client_module
from policyd_ipv6.resolver import lookups as lookups_module
from policyd_ipv6.resolver.client import DnsClient
from policyd_ipv6.resolver.lookups import Lookups
from policyd_ipv6.resolver.tries import TcpTry
from policyd_ipv6.resolver.wire import Nameserver

pytestmark = pytest.mark.knot

NET = ipaddress.ip_network("2001:db8:4000::/36")
SOA = ("@ 300 IN SOA ns.cold.invalid. hostmaster.cold.invalid. 1 3600 600 86400 300\n"
       "@ 300 IN NS ns.cold.invalid.\n")


def zones() -> dict[str, str]:
    reverse = ".".join(NET.network_address.reverse_pointer.split(".")[23:])
    return {"cold.test": "$ORIGIN cold.test.\n" + SOA
            + '* 300 IN TXT "v=spf1 mx include:spf.cold.test -all"\n'
            + "* 300 IN MX 10 mail.cold.test.\n"
            + 'spf 300 IN TXT "v=spf1 ip6:2001:db8:4000::/36 -all"\n'
            + "mail 300 IN AAAA 2001:db8:4000::1\n",
            reverse: f"$ORIGIN {reverse}.\n" + SOA + "* 300 IN PTR mail.cold.test.\n"}


def attributes(n: int) -> dict[str, str]:
    return {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "client_address": str(NET.network_address + 0x1000 + n),
            "client_name": "unknown", "reverse_client_name": "unknown",
            "helo_name": "mail.cold.test", "sender": f"user{n}@d{n}.cold.test",
            "recipient": "bob@cold.test", "instance": f"cold.{n}"}


def test_cold_decisions_leave_no_cyclic_garbage():
    """Forty cold decisions (PTR, then SPF with mx and include: about five DNS queries each,
    over the shared UDP sockets) are all answered, and a collection right after them finds
    nothing: no Deferred, query, lookup or evaluation is kept alive by a reference cycle."""
    require_knot()
    from twisted.internet import reactor

    port = free_port()
    with KnotServer(zones(), [("127.0.0.1", port)]):
        lookups = Lookups(DnsClient(reactor, [Nameserver("127.0.0.1", port)], 2.0, 2), reactor)
        finder = FactFinder(lookups, reactor, "ptr", 10.0)
        table = parse_optin("cold.test\n")
        engine = PolicyEngine(Policy(), lambda: table, finder, reactor)
        wait(engine.answer(attributes(0)))  # modules and sockets set up before counting
        gc.collect()
        gc.disable()
        try:
            outcomes = wait(defer.gatherResults([engine.answer(attributes(n))
                                                 for n in range(1, 41)]), timeout=30)
            # The shared UDP sockets close once their last try has ended (a later turn);
            # turned by hand, as task.deferLater itself leaves a cycle on Twisted 22.4.
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                reactor.iterate(0.01)
            # The daemon's own objects of this path: a cycle through a lookup, query, try,
            # evaluation or message holds one (another test's leftovers may make garbage of
            # their own while the reactor turns).
            found = cyclic_garbage(instances_of(
                lookups_module._Flight, lookups_module._Waiter, client_module._Query,
                client_module._UdpTry, client_module._UdpSocket, TcpTry,
                spf_module._Evaluation, MessageFacts, PolicyEngine, Lookups, DnsClient))
        finally:
            gc.enable()
    assert [o.verdict.action for o in outcomes] == ["DUNNO"] * 40
    assert found == []
