#!/usr/bin/python3
"""A UDP DNS relay that adds a fixed round-trip delay, standing in for `tc netem`.

Contract: listen on one UDP address, hold every datagram for half the configured round trip,
forward it to one upstream DNS server, hold the answer for the other half, and send it back to
the querier. Nothing else: no parsing beyond the 16-bit DNS message ID, no caching, no TCP.

Why it exists: the benchmark needs a resolver that reaches its authoritative server across a
link with a known round trip. The kernel of the machines this project benchmarks on is built
without `sch_netem` ("Specified qdisc kind is unknown"), so this relay adds the delay in user
space instead. It runs in the DNS namespace, so its CPU is not charged to the server measured.

Design:
- One epoll loop (select.epoll), two sockets: the listening socket and one upstream socket.
  An epoll loop costs about a third of the CPU of an asyncio loop at high packet rates.
- The delay is the same for every packet, so two FIFO queues (one per direction) are already
  in due order; no heap is needed.
- Queries from many querier ports share the upstream socket, so each query gets a fresh relay
  message ID; the answer's ID is mapped back to (querier address, original ID).
- Bounded: at most --max-queued datagrams wait in each queue (more are dropped and counted, as
  a full link would), at most 65,536 queries are outstanding (the ID space; the oldest mapping
  is overwritten), mappings older than --forget-seconds are dropped, and the process exits by
  itself after --max-seconds. SIGTERM or SIGINT end it at once.
On exit it prints one line of counters to stderr.
"""

import argparse
import collections
import select
import signal
import socket
import sys
import time

MAX_DATAGRAM = 65535
BATCH = 256  # datagrams read per readiness event, so one busy socket cannot starve the other


def parse_address(text):
    """Split "[v6]:port" or "v4:port" into (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def make_socket(host, bind_port=None):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    if bind_port is not None:
        sock.bind((host, bind_port))
    sock.setblocking(False)
    return sock


class Relay:
    def __init__(self, listen, upstream, delay_ms, max_queued, forget_seconds):
        self.half = delay_ms / 2000.0
        self.max_queued = max_queued
        self.forget = forget_seconds
        self.down = make_socket(listen[0], listen[1])
        self.up = make_socket(upstream[0])
        self.up.connect(upstream)
        self.to_upstream = collections.deque()   # (due, datagram with relay ID)
        self.to_querier = collections.deque()    # (due, datagram with original ID, address)
        self.pending = {}                        # relay ID -> (original ID bytes, address, time)
        self.next_id = 0
        self.counts = collections.Counter()
        self.stop = False

    def read_queries(self, now):
        for _ in range(BATCH):
            try:
                data, addr = self.down.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            self.counts["queries"] += 1
            if len(data) < 12 or len(self.to_upstream) >= self.max_queued:
                self.counts["dropped"] += 1
                continue
            relay_id = self.next_id
            self.next_id = (relay_id + 1) & 0xFFFF
            self.pending[relay_id] = (data[:2], addr, now)
            self.to_upstream.append((now + self.half, relay_id.to_bytes(2, "big") + data[2:]))

    def read_answers(self, now):
        for _ in range(BATCH):
            try:
                data = self.up.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # The upstream was not listening for an earlier datagram (ICMP unreachable);
                # the querier will retry on its own, as it would across a lossy link.
                self.counts["refused"] += 1
                continue
            entry = (self.pending.pop(int.from_bytes(data[:2], "big"), None)
                     if len(data) >= 12 else None)
            if entry is None or len(self.to_querier) >= self.max_queued:
                self.counts["dropped"] += 1
                continue
            original_id, addr, _ = entry
            self.to_querier.append((now + self.half, original_id + data[2:], addr))

    def flush(self, now):
        while self.to_upstream and self.to_upstream[0][0] <= now:
            _, data = self.to_upstream.popleft()
            try:
                self.up.send(data)
                self.counts["forwarded"] += 1
            except OSError:
                self.counts["send_errors"] += 1
        while self.to_querier and self.to_querier[0][0] <= now:
            _, data, addr = self.to_querier.popleft()
            try:
                self.down.sendto(data, addr)
                self.counts["answered"] += 1
            except OSError:
                self.counts["send_errors"] += 1

    def forget_old(self, now):
        # Unanswered queries (the upstream dropped them) must not pile up forever.
        cutoff = now - self.forget
        stale = [k for k, (_, _, t) in self.pending.items() if t < cutoff]
        for key in stale:
            del self.pending[key]
        self.counts["forgotten"] += len(stale)

    def next_timeout(self, now):
        heads = [q[0][0] for q in (self.to_upstream, self.to_querier) if q]
        return max(0.0, min(heads) - now) if heads else 1.0

    def run(self, max_seconds):
        poller = select.epoll()
        poller.register(self.down.fileno(), select.EPOLLIN)
        poller.register(self.up.fileno(), select.EPOLLIN)
        down_fd = self.down.fileno()
        start = last_sweep = time.monotonic()
        while not self.stop:
            now = time.monotonic()
            if now - start > max_seconds:
                break
            try:
                events = poller.poll(self.next_timeout(now))
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd, _ in events:
                if fd == down_fd:
                    self.read_queries(now)
                else:
                    self.read_answers(now)
            self.flush(time.monotonic())
            if now - last_sweep > 1.0:
                self.forget_old(now)
                last_sweep = now
        poller.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, help="[addr]:port to serve queriers on")
    parser.add_argument("--upstream", required=True, help="[addr]:port of the DNS server")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added round trip (ms)")
    parser.add_argument("--max-queued", type=int, default=20000)
    parser.add_argument("--forget-seconds", type=float, default=10.0)
    parser.add_argument("--max-seconds", type=float, default=4 * 3600.0)
    args = parser.parse_args(argv)
    relay = Relay(parse_address(args.listen), parse_address(args.upstream), args.delay_ms,
                  args.max_queued, args.forget_seconds)

    def stop(signum, frame):
        relay.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("relay ready", flush=True)
    relay.run(args.max_seconds)
    print("relay " + " ".join(f"{k}={v}" for k, v in sorted(relay.counts.items())),
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
