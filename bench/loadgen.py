#!/usr/bin/python3
"""A load generator that talks to a policy server the way Postfix's smtpd processes do.

Contract: open C connections to one policy server; on each, send one request at a time
(never pipelined: SMTPD_POLICY_README, one request then its reply): messages of 1-3
recipients, one RCPT-state request per recipient, sharing an `instance`, with the attributes
Postfix 3.7 sends in its order (smtpd_check.c check_policy_service(); `queue_id` empty at the
first recipient, A.8).
Stop issuing requests after --duration seconds or when the sender pool is used up, then wait
for the replies still due (each bounded by --request-timeout), print one JSON object and exit.

Protocol on stdout (read by the orchestrator, which samples the server's CPU in between):
    PRIMED      every connection has had one unmeasured request answered
    START       (after the orchestrator writes a line to stdin) the measured window opens
    END         the last reply is in (or timed out)
    {json}      the results
Priming makes each connection's first request (policyd-spf's process start-up under the
fork server, a first cache fill) fall outside the measurement, as in production, where
smtpd reuses a policy connection for up to 1000 s.

Scenarios: warm (senders drawn at random from a small set, already asked once while
priming), cold (every message a sender never seen before: new domain, new client address),
slow-mix (cold, a --slow-share of messages from senders whose DNS never answers; their
latencies are reported as class "slow", the rest as class "normal"), hostile (the same with
senders whose SPF record has 10 includes each answering ~62 KB over TCP, class "slow" too).

Efficiency: one process, one epoll loop, requests formatted once per message; per request
one send and one recv system call. Its own CPU time is reported (loadgen_cpu_s) so a run can
show that the generator was not the bottleneck.
"""

import argparse
import json
import random
import resource
import select
import socket
import sys
import time

TEMPLATE = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    "client_address={addr}\nclient_name={cname}\nclient_port={port}\n"
    "reverse_client_name={rname}\nserver_address=2001:db8:25::25\nserver_port=25\n"
    "helo_name={helo}\nsender={sender}\nrecipient={rcpt}\nrecipient_count=0\n"
    "queue_id={qid}\ninstance={inst}\nsize={size}\netrn_domain=\nstress=\n"
    "sasl_method=\nsasl_username=\nsasl_sender=\n"
    "ccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n"
    "encryption_protocol={tls_proto}\nencryption_cipher={tls_cipher}\n"
    "encryption_keysize={tls_bits}\npolicy_context=\n\n")
TLS = ("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
NO_TLS = ("", "", 0)
QID_CHARS = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"


class Source:
    """Hands out messages (lists of request bytes) for one scenario."""

    def __init__(self, population, scenario, slow_share, seed):
        self.rng = random.Random(seed)
        self.pop = population
        self.scenario = scenario
        self.slow_share = slow_share
        self.next_cold = self.next_slow = 0
        self.seq = 0
        self.exhausted = False

    def pick(self):
        if self.scenario == "warm":
            return "normal", self.rng.choice(self.pop["warm"])
        if self.scenario in ("slow-mix", "hostile") and self.rng.random() < self.slow_share:
            pool = self.pop["slow" if self.scenario == "slow-mix" else "hostile"]
            if self.next_slow < len(pool):
                self.next_slow += 1
                return "slow", pool[self.next_slow - 1]
        if self.next_cold < len(self.pop["cold"]):
            self.next_cold += 1
            return "normal", self.pop["cold"][self.next_cold - 1]
        self.exhausted = True
        return None, None

    def message(self, conn_id, entry=None):
        """Return (class, [request bytes, one per recipient]) or (None, None) if used up."""
        kind = "normal"
        if entry is None:
            kind, entry = self.pick()
            if entry is None:
                return None, None
        rng = self.rng
        self.seq += 1
        now = time.time()
        addr, cname, rname, helo, domain = entry[:5]
        # smtpd's instance: pid.arrival_sec.arrival_usec.seqno (smtpd.c, mail_cmd)
        inst = "%x.%x.%x.%x" % (1000 + conn_id, int(now), int(now * 1e6) % 1000000, self.seq)
        qid = "".join(rng.choice(QID_CHARS) for _ in range(11))
        rcpt_domain = self.pop["other_domain"] if rng.random() < 0.05 else self.pop["optin_domain"]
        tls = TLS if rng.random() < 0.8 else NO_TLS
        common = dict(addr=addr, cname=cname, rname=rname, helo=helo,
                      port=rng.randrange(1024, 65536), sender=f"user{self.seq}@{domain}",
                      inst=inst, size=rng.randrange(2000, 200000),
                      tls_proto=tls[0], tls_cipher=tls[1], tls_bits=tls[2])
        requests = []
        for n in range(rng.randint(1, 3)):
            requests.append(TEMPLATE.format(rcpt=f"r{n}.{self.seq}@{rcpt_domain}",
                                            qid="" if n == 0 else qid, **common).encode())
        return kind, requests


class Conn:
    __slots__ = ("cid", "sock", "queue", "kind", "sent_at", "buf", "busy", "reconnects", "first")

    def __init__(self, cid):
        self.cid, self.sock, self.queue, self.kind = cid, None, [], "normal"
        self.sent_at, self.buf, self.busy, self.reconnects = 0.0, b"", False, 0
        self.first = False  # the request in flight is the message's first recipient


class Generator:
    def __init__(self, args, population):
        self.args = args
        self.source = Source(population, args.scenario, args.slow_share, args.seed)
        self.poller = select.epoll()
        self.conns = [Conn(i) for i in range(args.connections)]
        self.by_fd = {}
        # "first": the first recipient of each normal message, the request that has to wait
        # for the message's lookups (later recipients may reuse them); also in "normal".
        self.latencies = {"normal": [], "slow": [], "first": []}
        self.replies = {"normal": {}, "slow": {}}
        self.errors = {}
        self.requests_in_window = 0
        self.messages = 0
        self.messages_by_class = {"normal": 0, "slow": 0}
        self.inflight = 0

    def connect(self, conn):
        sock = socket.create_connection((self.args.host, self.args.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn.sock, conn.buf, conn.busy = sock, b"", False
        self.by_fd[sock.fileno()] = conn
        self.poller.register(sock.fileno(), select.EPOLLIN)

    def drop(self, conn, reason):
        """Count an error and close; smtpd would reconnect for its next request."""
        self.errors[reason] = self.errors.get(reason, 0) + 1
        if conn.busy:
            self.inflight -= 1
        if conn.sock is not None:
            self.poller.unregister(conn.sock.fileno())
            del self.by_fd[conn.sock.fileno()]
            conn.sock.close()
            conn.sock = None
        conn.busy, conn.queue = False, []

    def send_next(self, conn, now, measuring=True):
        if not conn.queue:
            if not measuring:
                return False
            conn.kind, conn.queue = self.source.message(conn.cid)
            if conn.queue is None:
                conn.queue = []
                return False
            self.messages += 1
            self.messages_by_class[conn.kind] += 1
            conn.first = True
        else:
            conn.first = False
        if conn.sock is None:
            if conn.reconnects >= self.args.max_reconnects:
                return False
            conn.reconnects += 1
            try:
                self.connect(conn)
            except OSError:
                self.errors["connect"] = self.errors.get("connect", 0) + 1
                return False
        try:
            conn.sock.send(conn.queue.pop(0))
        except OSError:
            self.drop(conn, "send")
            return False
        conn.sent_at, conn.busy = now, True
        self.inflight += 1
        return True

    def on_reply(self, conn, now):
        """Read what arrived; return the reply if it is complete, else None."""
        try:
            data = conn.sock.recv(65536)
        except OSError:
            self.drop(conn, "recv")
            return None
        if not data:
            self.drop(conn, "closed")
            return None
        conn.buf += data
        if not conn.buf.endswith(b"\n\n"):
            if len(conn.buf) > 8192:
                self.drop(conn, "garbage")
            return None
        reply, conn.buf, conn.busy = conn.buf, b"", False
        self.inflight -= 1
        return reply

    def loop(self, measuring, deadline, window_end):
        """Run until no request is outstanding and (when measuring) the window has closed."""
        lat, replies = self.latencies, self.replies
        timeout = self.args.request_timeout
        last_check = time.monotonic()
        while self.inflight and time.monotonic() < deadline:
            now = time.monotonic()
            issuing = measuring and now < window_end
            if now - last_check > 0.1:
                last_check = now
                for conn in self.conns:
                    if conn.busy and now - conn.sent_at > timeout:
                        self.drop(conn, "timeout")
                        if issuing:
                            self.send_next(conn, now)
            for fd, _ in self.poller.poll(0.1):
                conn = self.by_fd.get(fd)
                if conn is None:
                    continue
                now = time.monotonic()
                reply = self.on_reply(conn, now)
                if reply is None:
                    if conn.sock is None and now < window_end and measuring:
                        self.send_next(conn, now)
                    continue
                if not reply.startswith(b"action=") or reply.startswith(b"action=\n"):
                    # Postfix counts a reply without an action as a failed request, and an
                    # empty action as OK (smtpd_check.c, "has empty value"): both are errors here.
                    self.errors["bad_reply"] = self.errors.get("bad_reply", 0) + 1
                if measuring:
                    lat[conn.kind].append(now - conn.sent_at)
                    if conn.first and conn.kind == "normal":
                        lat["first"].append(now - conn.sent_at)
                    key = reply[:17].decode("ascii", "replace").strip()
                    bucket = replies[conn.kind]
                    bucket[key] = bucket.get(key, 0) + 1
                    if now < window_end:
                        self.requests_in_window += 1
                        self.send_next(conn, now)

    def prime(self):
        """Unmeasured requests: one per connection, and in `warm` every warm sender once."""
        warm = self.source.pop["warm"]
        entries = [warm[c.cid % len(warm)] for c in self.conns]
        if self.args.scenario == "warm":
            entries += warm
        deadline = time.monotonic() + self.args.prime_timeout
        for conn in self.conns:
            self.connect(conn)
        for first in range(0, len(entries), len(self.conns)):
            now = time.monotonic()
            for conn, entry in zip(self.conns, entries[first:first + len(self.conns)]):
                conn.queue = self.source.message(conn.cid, entry=entry)[1][:1]
                self.send_next(conn, now, measuring=False)
            self.loop(False, deadline, 0)
        if self.inflight or any(c.sock is None for c in self.conns):
            # bench/run reports this line as the reason the cell failed.
            closed = sum(c.sock is None for c in self.conns)
            raise SystemExit(f"priming failed: {closed} of {len(self.conns)} connections lost "
                             f"before a reply, {self.inflight} requests unanswered at the end "
                             f"(--prime-timeout {self.args.prime_timeout:g} s; errors: "
                             f"{self.errors})")
        for conn in self.conns:
            conn.reconnects = 0

    def run(self):
        self.prime()
        print("PRIMED", flush=True)
        sys.stdin.readline()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        print("START", flush=True)
        window_end = start + self.args.duration
        for conn in self.conns:
            self.send_next(conn, start)
        self.loop(True, window_end + self.args.request_timeout + 1.0, window_end)
        end = time.monotonic()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        print("END", flush=True)
        for conn in self.conns:
            if conn.busy:
                self.drop(conn, "timeout")
        window = min(end, window_end) - start
        return {
            "scenario": self.args.scenario, "connections": self.args.connections,
            "window_s": window, "elapsed_s": end - start,
            "requests": request_count(self.latencies),
            "requests_in_window": self.requests_in_window,
            "requests_per_s": self.requests_in_window / window if window > 0 else 0.0,
            "messages": self.messages, "messages_by_class": self.messages_by_class,
            "pool_exhausted": self.source.exhausted,
            "latency": {k: summarize(v) for k, v in self.latencies.items() if v},
            "replies": self.replies, "errors": self.errors,
            "loadgen_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        }


def request_count(latencies):
    """The requests answered: "first" is a subset of "normal" (the first recipient of each
    normal message), so it is not counted again; CPU per decision divides by this."""
    return sum(len(v) for k, v in latencies.items() if k != "first")


def summarize(values):
    """Nearest-rank percentiles in milliseconds."""
    values = sorted(values)
    n = len(values)

    def pct(q):
        return values[min(n - 1, max(0, int(q * n + 0.999999) - 1))] * 1000.0

    return {"count": n, "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": values[-1] * 1000.0, "mean_ms": sum(values) / n * 1000.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--population", required=True)
    parser.add_argument("--scenario", choices=("warm", "cold", "slow-mix", "hostile"),
                        required=True)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--prime-timeout", type=float, default=60.0)
    parser.add_argument("--max-reconnects", type=int, default=3)
    parser.add_argument("--slow-share", type=float, default=0.10)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with open(args.population) as f:
        population = json.load(f)
    result = Generator(args, population).run()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
