#!/usr/bin/python3
"""Soak: many requests against one daemon, its resident memory sampled as they go.

Contract: ``python3 bench/soak.py --requests N [--connections C] [--seconds S]`` starts a Knot
server on loopback serving wildcard zones (every sender domain has an SPF record, every client
address a PTR), starts ``policyd-ipv6 serve`` resolving through it, and sends N policy requests
over C connections, one at a time per connection as smtpd does. Every message has a new
sender domain, client address and instance, so every cache fills up to its bound and then
evicts; with ``--small-caches`` the bounds are small so that a short run reaches them. It
samples the daemon's VmRSS every N/20 requests, prints the samples and a JSON summary, and
exits 1 if the resident size grew by more than ``--max-growth`` (default 10 %) between the
first sample taken after the caches are full and the last one; the summary also gives the
daemon's warnings (a garbage collection over 50 ms is one), counted, and the first ten.
Bounded: it stops after N requests or S seconds, whichever comes first; all traffic stays on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]

from lab.knot import KnotServer, free_port  # noqa: E402

NET = ipaddress.ip_network("2001:db8:4000::/36")  # 2^92 client addresses, nibble boundary


def zones() -> dict[str, str]:
    soa = ("@ 300 IN SOA ns.soak.invalid. hostmaster.soak.invalid. 1 3600 600 86400 300\n"
           "@ 300 IN NS ns.soak.invalid.\n")
    forward = ("$ORIGIN soak.test.\n" + soa
               + '* 300 IN TXT "v=spf1 ip6:2001:db8:4000::/36 -all"\n'
               + "mail 300 IN AAAA 2001:db8:4000::1\n")
    reverse_name = ".".join(NET.network_address.reverse_pointer.split(".")[23:])
    reverse = f"$ORIGIN {reverse_name}.\n" + soa + "* 300 IN PTR mail.soak.test.\n"
    return {"soak.test": forward, reverse_name: reverse}


def request(n: int) -> bytes:
    address = NET.network_address + 0x1000 + n
    return (f"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
            f"client_address={address}\nclient_name=unknown\nreverse_client_name=unknown\n"
            f"client_port={1024 + n % 60000}\nhelo_name=mail.soak.test\n"
            f"sender=user{n}@d{n}.soak.test\nrecipient=bob@soak.test\nrecipient_count=0\n"
            f"queue_id=\ninstance=soak.{n:x}\nsize=0\nsasl_username=\n\n").encode()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


def drive(port: int, total: int, connections: int, seconds: float, on_progress) -> dict:
    """Send ``total`` requests (bounded by ``seconds``); returns counts of replies by kind."""
    selector = selectors.DefaultSelector()
    sent = done = 0
    replies: dict[str, int] = {}
    buffers = {}
    end = time.monotonic() + seconds
    for _ in range(min(connections, total)):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        buffers[sock] = b""
        sock.send(request(sent))
        sent += 1
        selector.register(sock, selectors.EVENT_READ)
    while done < sent and time.monotonic() < end:
        for key, _ in selector.select(timeout=1.0):
            sock = key.fileobj
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the daemon closed a connection")
            buffers[sock] += data
            while b"\n\n" in buffers[sock]:
                reply, buffers[sock] = buffers[sock].split(b"\n\n", 1)
                kind = reply.decode().split()[0].removeprefix("action=")
                replies[kind] = replies.get(kind, 0) + 1
                done += 1
                on_progress(done)
                if sent < total and time.monotonic() < end:
                    sock.send(request(sent))
                    sent += 1
    for sock in buffers:
        sock.close()
    return {"sent": sent, "answered": done, "replies": replies}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--small-caches", action="store_true")
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)

    knot_port, port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp, \
            KnotServer(zones(), [("127.0.0.1", knot_port)]):
        with open(os.path.join(tmp, "optin"), "w") as handle:
            handle.write("soak.test\n")
        caches = ("dns_cache_size = 2000\nmessage_cache_size = 1000\n" if args.small_caches
                  else "")
        with open(os.path.join(tmp, "soak.toml"), "w") as handle:
            handle.write(f'listen = ["tcp:{port}:interface=127.0.0.1"]\noptin_file = "optin"\n'
                         f'nameservers = ["127.0.0.1:{knot_port}"]\n{caches}')
        log = open(os.path.join(tmp, "daemon.log"), "w")
        command = [args.python, "-m", "policyd_ipv6", "serve", "--config",
                   os.path.join(tmp, "soak.toml"), "--log-level", "warn"]
        if os.geteuid() == 0:
            command.append("--allow-root")
        daemon = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError as error:
                    if daemon.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the daemon did not start:\n"
                                         + open(log.name).read()) from error
                    time.sleep(0.05)
            step = max(1, args.requests // 20)
            samples: list[tuple[int, int]] = [(0, rss_kib(daemon.pid))]

            def progress(done: int) -> None:
                if done % step == 0:
                    samples.append((done, rss_kib(daemon.pid)))
                    print(f"{done:>9} requests  VmRSS {samples[-1][1] / 1024:7.1f} MiB",
                          flush=True)

            start = time.monotonic()
            result = drive(port, args.requests, args.connections, args.seconds, progress)
            elapsed = time.monotonic() - start
            samples.append((result["answered"], rss_kib(daemon.pid)))
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)
            log.close()
        # The daemon logs at warn level here: anything it said is worth showing (a garbage
        # collection over 50 ms says so, with its length).
        with open(log.name, errors="replace") as handle:
            warnings = [line.rstrip("\n") for line in handle
                        if line.startswith(("warn", "error")) and "--allow-root" not in line]
    # Compare from the point where every cache is full: the message cache holds one entry per
    # message, so the samples after half the run are past it with the small caches; with the
    # default bounds a run of a million requests passes them (20,000 / 100,000 entries) early.
    plateau = samples[len(samples) // 2]
    growth = (samples[-1][1] - plateau[1]) / plateau[1]
    summary = {**result, "seconds": round(elapsed, 1),
               "requests_per_second": round(result["answered"] / elapsed),
               "rss_start_kib": samples[0][1], "rss_plateau_kib": plateau[1],
               "rss_end_kib": samples[-1][1], "growth_after_plateau": round(growth, 4),
               "daemon_warnings": len(warnings), "first_warnings": warnings[:10]}
    print(json.dumps(summary))
    return 0 if growth <= args.max_growth and result["answered"] == result["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
