#!/usr/bin/env python3
"""Benchmark: the reactor's largest gap, and memory per verification, while large signed
messages are verified through ``check_dkim`` and the DKIM worker pool.

Run from a checkout: ``python3 bench/dkim_gap.py [--messages N] [--workers N]``. It signs
messages with dkimpy (a fresh 2048-bit key from openssl), serves their keys from memory, and
submits them all at once to ``check_dkim`` with a real ``DkimPool`` on the real reactor,
while a ``LoopingCall`` every 5 ms records how late it runs. It prints one JSON object:
the largest and 99th-percentile lateness (ms), each message's result and latency, and the
workers' peak memory over their idle size divided by the largest message verified.

The mix: messages of just under the 4 MiB body cap with five relaxed signatures (ordinary
text, and text of 990-space lines, the case that is quadratic in dkimpy), plus a 10 MB
message with ten signatures (over the cap: listed, not verified). No network: the keys are
answered from memory. Bounded: at most --messages messages, and the run stops after 120 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dkim  # noqa: E402
from dkimkeys import DkimKey  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from policyd_ipv6.checks import dkim_verify  # noqa: E402
from policyd_ipv6.checks.dkim import MAX_BODY_BYTES, check_dkim  # noqa: E402
from policyd_ipv6.checks.dkim_pool import DkimPool  # noqa: E402
from policyd_ipv6.resolver.lookups import Answer  # noqa: E402
from policyd_ipv6.vocabulary import DnsStatus  # noqa: E402

HEAD = (b"From: <alice@sender.test>\r\nTo: <bob@example.com>\r\nSubject: bench\r\n"
        b"Date: Mon, 2 Jun 2025 10:00:00 +0000\r\nMessage-ID: <bench@sender.test>\r\n\r\n")


class MemoryLookups:
    """Every selector's key record, answered at once (the Lookups interface)."""

    def __init__(self, record: bytes) -> None:
        self.answer = Answer(DnsStatus.OK, ((record,),))

    def lookup(self, name, rrtype):
        return defer.succeed(self.answer)

    def cached(self, name, rrtype):
        return self.answer


def signed(body: bytes, key: DkimKey, count: int) -> bytes:
    raw = HEAD + body
    # Signing with dkimpy's own relaxed canonicalisation would take minutes on 990-space
    # lines; the linear one gives the same bytes (tests/test_dkim_pool.py).
    dkim_verify.install_linear_relaxed()
    for n in range(count):
        raw = dkim.sign(raw, f"s{n}".encode(), b"sender.test", key.private_pem,
                        canonicalize=(b"relaxed", b"relaxed"),
                        include_headers=[b"from", b"to", b"subject"]) + raw
    return raw


def rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=6)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    key = DkimKey.generate(2048)
    near_cap = MAX_BODY_BYTES - 4096
    text = (b"The quick brown fox jumps over the lazy dog, again and again. " * 1 + b"\r\n")
    spaces = b" " * 990 + b"x\r\n"
    bodies = [(text * (near_cap // len(text)), 5, "text"),
              (spaces * (near_cap // len(spaces)), 5, "990-space lines")]
    messages = [(signed(body, key, count), label) for body, count, label in bodies]
    messages.append((signed(text * (10_000_000 // len(text)), key, 10), "10 MB, over the cap"))
    plan = [messages[n % len(messages)] for n in range(args.messages)]
    original = dkim.canonicalization.Relaxed.canonicalize_body
    pool = DkimPool(reactor, **({"workers": args.workers} if args.workers else {}))
    pool.start()
    lookups = MemoryLookups(key.record().encode())
    lateness: list[float] = []
    last = [time.monotonic()]

    def tick() -> None:
        now = time.monotonic()
        lateness.append(max(0.0, now - last[0] - 0.005))
        last[0] = now

    results = []

    def run():
        yield task.deferLater(reactor, 0.5, lambda: None)  # workers started and idle
        pids = [w.transport.pid for w in pool.workers]
        idle = {pid: rss_kib(pid, "VmRSS") for pid in pids}
        ticker = task.LoopingCall(tick)
        last[0] = time.monotonic()
        ticker.start(0.005, now=False)
        started = time.monotonic()

        def done(fact, label, size, begin):
            results.append({"message": label, "bytes": size, "result": str(fact.result),
                            "signatures": " ".join(str(s.result) for s in fact.signatures),
                            "seconds": round(time.monotonic() - begin, 3)})

        waits = []
        for raw, label in plan:
            begin = time.monotonic()
            waits.append(check_dkim(lookups, raw, pool).addCallback(done, label, len(raw), begin))
        yield defer.gatherResults(waits)
        elapsed = time.monotonic() - started
        ticker.stop()
        peaks = {pid: rss_kib(pid, "VmHWM") for pid in pids}
        verified = max(len(raw) for raw, label in plan if "over the cap" not in label)
        growth = max(peaks[pid] - idle[pid] for pid in pids) * 1024
        ordered = sorted(lateness)
        report = {
            "workers": pool.size, "messages": len(plan), "seconds": round(elapsed, 2),
            "ticks": len(ordered),
            "max_gap_ms": round(ordered[-1] * 1000, 2),
            "p99_gap_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2),
            "worker_peak_growth_bytes": growth,
            "largest_verified_bytes": verified,
            "memory_per_verification_x": round(growth / verified, 2),
            "results": results,
        }
        print(json.dumps(report, indent=1))

    dkim.canonicalization.Relaxed.canonicalize_body = original
    d = defer.inlineCallbacks(run)()
    d.addErrback(lambda f: print(f.getTraceback(), file=sys.stderr))
    d.addBoth(lambda _: reactor.stop())
    reactor.callLater(120, reactor.stop)
    reactor.run()
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
