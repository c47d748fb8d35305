#!/usr/bin/python3
"""In-process cost of a warm policy decision: the daemon's own Python work, without sockets.

Contract: `python3 bench/warm_cost.py [--requests N] [--senders S] [--profile FILE]` builds the
daemon's real parts (``daemon.wiring.PolicyService`` from a generated configuration: the policy
engine, fact finder, DNS lookups, policy protocol) with every DNS answer the senders need
already in the lookups' cache, warms each sender once, then feeds N policy requests, shaped as
bench/loadgen.py shapes them (1-3 recipients per message, a new ``instance`` per message), to
``PolicyProtocol.dataReceived`` with an in-memory transport, and prints the CPU microseconds per
decision (best of 5 rounds) and the reply mix. The decision log goes to /dev/null through the
daemon's own log observer. It measures what bench/run's warm cell cannot separate from the
kernel and the load generator: the code between the bytes in and the reply out. No network, no
reactor run; deterministic for a seed (run it under `valgrind --tool=callgrind` to count
instructions). With --profile, a cProfile of one round is written to FILE. With --pollute
KIB, KIB KiB are copied between requests and only the requests' own CPU time is counted: what
the caches' eviction between requests (by the kernel's send, the reactor, other processes)
costs a decision, which the serving loop has and this loop does not.
"""

import argparse
import collections
import cProfile
import ipaddress
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor, task  # noqa: E402

from policyd_ipv6.daemon.collector import Collector  # noqa: E402
from policyd_ipv6.daemon.config import parse_config  # noqa: E402
from policyd_ipv6.daemon.logs import start_logging  # noqa: E402
from policyd_ipv6.daemon.wiring import PolicyService  # noqa: E402
from policyd_ipv6.resolver.lookups import Answer  # noqa: E402
from policyd_ipv6.vocabulary import DnsStatus  # noqa: E402

TEMPLATE = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    "client_address={addr}\nclient_name={name}\nclient_port={port}\n"
    "reverse_client_name={name}\nserver_address=2001:db8:25::25\nserver_port=25\n"
    "helo_name={name}\nsender=user{seq}@{domain}\nrecipient=r{n}.{seq}@{rcpt}\n"
    "recipient_count=0\nqueue_id={qid}\ninstance={inst}\nsize=12345\netrn_domain=\nstress=\n"
    "sasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\n"
    "ccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n"
    "encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n\n")
OPTIN, OTHER = "optin.example", "other.example"


class Transport:
    """Enough of ITransport for PolicyProtocol: collects what is written."""

    def __init__(self):
        self.replies = []

    def write(self, data):
        self.replies.append(data)

    def loseConnection(self):
        raise AssertionError("the protocol closed the connection")

    def getPeer(self):
        return None


def senders(count, rng):
    """(client address, host name, sender domain) of warm senders, 85 % with a working PTR."""
    out = []
    for i in range(count):
        addr = str(ipaddress.IPv6Address(f"2001:db8:{i + 1:x}::25"))
        name = f"mx{i}.s{i}.example" if rng.random() < 0.85 else "unknown"
        out.append((addr, name, f"s{i}.example"))
    return out


def fill_cache(lookups, population):
    for addr, name, domain in population:
        ptr = ipaddress.IPv6Address(addr).reverse_pointer
        if name == "unknown":
            lookups.cache.put((ptr, "PTR"), Answer(DnsStatus.NXDOMAIN, ttl=1e6), 1e6)
        else:
            lookups.cache.put((ptr, "PTR"), Answer(DnsStatus.OK, (name,), ttl=1e6), 1e6)
            lookups.cache.put((name, "AAAA"), Answer(DnsStatus.OK, (addr,), ttl=1e6), 1e6)
        record = (f"v=spf1 ip6:{addr}/64 -all".encode(),)
        lookups.cache.put((domain, "TXT"), Answer(DnsStatus.OK, (record,), ttl=1e6), 1e6)


def messages(population, count, rng):
    """Request bytes, message by message, until ``count`` requests."""
    out, seq = [], 0
    while len(out) < count:
        seq += 1
        addr, name, domain = rng.choice(population)
        rcpt = OTHER if rng.random() < 0.05 else OPTIN
        inst = f"3e8.{seq:x}.{rng.randrange(1 << 20):x}.{seq:x}"
        for n in range(rng.randint(1, 3)):
            out.append(TEMPLATE.format(addr=addr, name=name, port=rng.randrange(1024, 65536),
                                       seq=seq, domain=domain, n=n, rcpt=rcpt,
                                       qid="" if n == 0 else "4ABCDEF1234", inst=inst).encode())
    return out[:count]


def build(workdir):
    optin = os.path.join(workdir, "optin")
    with open(optin, "w") as f:
        f.write(OPTIN + "\n")
    config = parse_config(f'listen = ["127.0.0.1:10045"]\noptin_file = "{optin}"\n'
                          'nameservers = ["127.0.0.1:53"]\n', workdir)
    return PolicyService(config, reactor)


class Turns(task.Clock):
    """The reactor as the collector sees it, on real time: what it asks to run later (its
    tick, its work after a collection) runs between requests, when due."""

    def __init__(self):
        super().__init__()
        self.origin = time.monotonic()

    def callFromThread(self, f, *args):
        self.callLater(0, f, *args)

    def run(self):
        self.advance(time.monotonic() - self.origin - self.seconds())


turns = Turns()


def one_round(service, requests, pollute=b""):
    transport = Transport()
    proto = service.factory.buildProtocol(None)
    proto.makeConnection(transport)
    if pollute:  # between requests, evict the caches as the kernel's send and others do
        spent = 0.0
        clock = time.process_time
        for request in requests:
            bytes(pollute)
            start = clock()
            proto.dataReceived(request)
            turns.run()
            spent += clock() - start
    else:
        start = time.process_time()
        for request in requests:
            proto.dataReceived(request)
            turns.run()
        spent = time.process_time() - start
    proto.connectionLost(None)
    return spent, transport.replies


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--senders", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", metavar="FILE")
    p.add_argument("--pollute", type=int, default=0, metavar="KIB",
                   help="copy this many KiB between requests, outside the time counted")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as workdir:
        devnull = open(os.devnull, "w")
        start_logging(devnull, "info", reactor, journal=False)
        service = build(workdir)
        population = senders(args.senders, rng)
        fill_cache(service.lookups, population)
        one_round(service, messages(population, args.senders * 3, rng))  # warm every sender
        # The collector policy `serve` applies once it is ready; its work "on the reactor"
        # runs between requests here.
        collector = Collector(turns)
        collector.start()
        best, replies = float("inf"), []
        pollute = bytearray(args.pollute * 1024)
        for _ in range(args.rounds):
            spent, replies = one_round(service, messages(population, args.requests, rng),
                                       pollute)
            best = min(best, spent)
        if args.profile:
            batch = messages(population, args.requests, rng)
            cProfile.runctx("one_round(service, batch)", globals(), locals(), args.profile)
    if len(replies) != args.requests:
        raise SystemExit(f"{len(replies)} replies to {args.requests} requests")
    mix = collections.Counter(r.decode()[len("action="):][:9].strip() for r in replies)
    polluted = f", {args.pollute} KiB copied between requests" if args.pollute else ""
    print(f"{best / args.requests * 1e6:.1f} us CPU per warm decision (best of {args.rounds} "
          f"rounds of {args.requests}{polluted}); replies: "
          + ", ".join(f"{k} {v * 100 // len(replies)}%" for k, v in mix.most_common()))


if __name__ == "__main__":
    main()
