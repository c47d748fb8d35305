"""Isolation: decisions stuck on DNS that never answers do not slow anyone else down.

A real unbound resolves for the daemon process: the test zones come from Knot, and each of
200 names has its own black-holed server (one dead address per name, so unbound never gives up
early and answers SERVFAIL). 200 policy connections ask about messages whose PTR or
SPF lookups hit those names. While they wait, requests that need no DNS (IPv4, a domain that
has not opted in, a trusted client) and requests whose facts are cached (another recipient of
a known message, a new message from a known client and sender) must be answered at once; and
every stuck request must end with ``451 4.4.3`` at the configured decision deadline.
"""

import ipaddress
import re
import selectors
import time

import pytest
from lab.daemonproc import ServeProcess, ask, request
from lab.knot import KnotServer, free_port, require_knot
from lab.unbound import BlackHoles, UnboundServer, require_unbound
from lab.zones import Zone, reverse_zone_name, txt_rdata

pytestmark = pytest.mark.knot

STUCK = 200           # concurrent decisions stuck on DNS
DEADLINE = 2.5        # decision_deadline_seconds
FAST_MS = 200.0       # the bound for a request that needs no new DNS
GOOD = "2001:db8:9::10"
REV = reverse_zone_name("2001:db8:9::/64")
SPARE = "2001:db8:b::1"


def stuck_ptr_client(i: int) -> str:
    return f"2001:db8:a::{i + 1:x}"


def stuck_sender(i: int) -> str:
    return f"a@s{i}.stuck.test"


def zones() -> dict[str, str]:
    forward = Zone("iso.test")
    forward.add("mail", "AAAA", GOOD)
    forward.add("pass", "TXT", txt_rdata("v=spf1 ip6:2001:db8:9::/64 -all"))
    rev = Zone(REV)
    rev.add(ipaddress.ip_address(GOOD).reverse_pointer + ".", "PTR", "mail.iso.test.")
    return {"iso.test": forward.text(), REV: rev.text()}


@pytest.fixture(scope="module")
def resolver():
    """unbound on loopback: iso.test and its reverse zone from Knot, 200 black-holed names."""
    require_knot()
    require_unbound()
    knot_port = free_port()
    half = STUCK // 2
    with KnotServer(zones(), [("127.0.0.1", knot_port)]), BlackHoles(STUCK + 1) as holes:
        stubs = {name: [("127.0.0.1", knot_port)] for name in zones()}
        for i in range(half):
            stubs[ipaddress.ip_address(stuck_ptr_client(i)).reverse_pointer] = [holes.address(i)]
            stubs[stuck_sender(i).split("@")[1]] = [holes.address(half + i)]
        # one more, kept for the second test (a name unbound has never been asked about)
        stubs[ipaddress.ip_address(SPARE).reverse_pointer] = [holes.address(STUCK)]
        with UnboundServer(stubs) as unbound:
            yield unbound


def stuck_requests() -> list[bytes]:
    half = STUCK // 2
    ptr = [request(client_address=stuck_ptr_client(i), sender="a@pass.iso.test",
                   recipient="bob@iso.test", instance=f"ptr.{i}") for i in range(half)]
    spf = [request(client_address=GOOD, sender=stuck_sender(i), recipient="bob@iso.test",
                   instance=f"spf.{i}") for i in range(half)]
    return ptr + spf


FAST = [
    # (what, request, expected reply)
    ("ipv4", request(client_address="192.0.2.7", sender="a@s0.stuck.test",
                     recipient="bob@iso.test", instance="v4"), r"DUNNO"),
    ("not opted in", request(client_address=stuck_ptr_client(0), sender="a@s0.stuck.test",
                             recipient="bob@elsewhere.test", instance="no"),
     r"550 5\.2\.1 Service unavailable, \[elsewhere\.test\] does not accept email over IPv6\."),
    ("trusted", request(client_address="::1", sender="a@s0.stuck.test",
                        recipient="bob@iso.test", instance="trusted"), r"DUNNO"),
    ("other recipient of a known message",
     request(client_address=GOOD, sender="a@pass.iso.test", recipient="carol@iso.test",
             instance="warm.1"), r"DUNNO"),
]


def new_message_from_known_client(n: int) -> tuple[str, bytes, str]:
    return ("new message, cached DNS",
            request(client_address=GOOD, sender="a@pass.iso.test", recipient="dave@iso.test",
                    instance=f"warm.new.{n}"), r"DUNNO")


def timed_ask(daemon, data: bytes) -> tuple[str | None, float]:
    start = time.monotonic()
    reply = daemon.ask(data, timeout=5)
    return reply, (time.monotonic() - start) * 1000


def test_stuck_decisions_do_not_delay_others_and_end_at_the_deadline(tmp_path, resolver):
    """With 200 decisions stuck on black-holed DNS, requests needing no new DNS are answered
    within 200 ms throughout, and every stuck one ends with 451 4.4.3 at the deadline."""
    settings = {"nameservers": [f"127.0.0.1:{resolver.port}"],
                # Tries longer than the deadline: the deadline itself must end the decisions.
                "dns_timeout_seconds": 2.0, "dns_attempts": 2,
                "decision_deadline_seconds": DEADLINE}
    with ServeProcess(tmp_path, settings, optin="iso.test\n") as daemon:
        warm, ms = timed_ask(daemon, request(client_address=GOOD, sender="a@pass.iso.test",
                                             recipient="bob@iso.test", instance="warm.1"))
        assert warm == "DUNNO"

        sel = selectors.DefaultSelector()
        sent_at, replies = {}, {}
        for n, data in enumerate(stuck_requests()):
            if n % 20 == 0:
                # Twisted listens with a backlog of 50: a faster burst of connects overflows
                # it and the kernel's SYN retry costs a second. Postfix never bursts like this.
                time.sleep(0.04)
            sock = daemon.connect()
            sock.sendall(data)
            sock.setblocking(False)
            sent_at[n] = time.monotonic()
            sel.register(sock, selectors.EVENT_READ, (n, bytearray()))

        def collect(until: float) -> None:
            while time.monotonic() < until and len(replies) < STUCK:
                for key, _ in sel.select(max(0.0, min(0.05, until - time.monotonic()))):
                    n, buffer = key.data
                    chunk = key.fileobj.recv(4096)
                    buffer += chunk
                    if not chunk or buffer.endswith(b"\n\n"):
                        replies[n] = (bytes(buffer), time.monotonic())
                        sel.unregister(key.fileobj)
                        key.fileobj.close()

        collect(time.monotonic() + 0.2)  # let the daemon take in all 200
        latencies = []
        rounds = 0
        # Measure while every stuck decision is still waiting (the first ends at its deadline).
        while time.monotonic() < sent_at[0] + DEADLINE - 0.3 and rounds < 20:
            rounds += 1
            for what, data, pattern in FAST + [new_message_from_known_client(rounds)]:
                reply, ms = timed_ask(daemon, data)
                assert reply is not None and re.fullmatch(pattern, reply), (what, reply)
                latencies.append((ms, what))
            collect(time.monotonic() + 0.1)
        assert sent_at[STUCK - 1] - sent_at[0] < 0.8, "sending the stuck requests took too long"
        assert rounds >= 3, "too few rounds while the decisions were stuck"
        assert replies == {}, f"{len(replies)} stuck decisions answered before their deadline"
        worst = max(latencies)
        assert worst[0] < FAST_MS, f"slowest: {worst[1]} took {worst[0]:.0f} ms"

        collect(sent_at[STUCK - 1] + DEADLINE + 5.0)
        for sock_key in list(sel.get_map().values()):
            sock_key.fileobj.close()
        assert len(replies) == STUCK, f"only {len(replies)} of {STUCK} stuck decisions ended"
        for n, (raw, at) in replies.items():
            text = raw.decode()
            which = "reverse DNS" if n < STUCK // 2 else "SPF"
            assert re.fullmatch(r"action=451 4\.4\.3 [\x20-\x7e]+\n\n", text), (n, text)
            assert which in text, (n, text)
            waited = at - sent_at[n]
            assert DEADLINE - 0.1 < waited < DEADLINE + 1.5, (n, waited)
        assert daemon.alive() and daemon.problems() == []
        # and the daemon is as quick afterwards as before
        reply, ms = timed_ask(daemon, FAST[0][1])
        assert reply == "DUNNO" and ms < FAST_MS


def test_stuck_lookups_are_shared_not_repeated(tmp_path, resolver):
    """Recipients of a stuck message wait on the same lookups: 20 recipients of one message
    on 20 connections end together at the deadline with one 451 each."""
    settings = {"nameservers": [f"127.0.0.1:{resolver.port}"], "dns_timeout_seconds": 2.0,
                "dns_attempts": 2, "decision_deadline_seconds": 1.5}
    with ServeProcess(tmp_path, settings, optin="iso.test\n") as daemon:
        socks = []
        start = time.monotonic()
        for i in range(20):
            sock = daemon.connect()
            sock.sendall(request(client_address=SPARE,
                                 sender="a@pass.iso.test", recipient=f"r{i}@iso.test",
                                 instance="one.message"))
            socks.append(sock)
        for sock in socks:
            reply = ask(sock, b"", timeout=5)
            assert reply is not None and reply.startswith("451 4.4.3 ")
            sock.close()
        assert 1.4 < time.monotonic() - start < 3.0
        # The decision lines are flushed at the end of the reactor turn that wrote the
        # replies, which may come after the client has read them: wait for them (bounded).
        end = time.monotonic() + 5
        while daemon.log().count("decision ") < 20 and time.monotonic() < end:
            time.sleep(0.02)
        log = daemon.log()
        assert log.count("facts=shared") == 19 and log.count("facts=new") == 1
