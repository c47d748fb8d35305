"""A deliberately misbehaving DNS server for tests, on loopback, in a thread of the test process.

Contract:
    with BadDns({"pass.bad.test": Behaviour(records=[("TXT", '"v=spf1 +all"')]),
                 "down.bad.test": Behaviour("servfail")}) as server:
        ...  # server.port answers on 127.0.0.1 over UDP and TCP; server.queries logs each query

- The table maps an owner name to a ``Behaviour``; a query uses the behaviour of its name or of
  the nearest parent name in the table (so ``"bad.test": Behaviour("silent")`` covers the
  whole zone), else ``default``. Names are matched case-insensitively, without the final dot.
- Modes of a behaviour (what the server does with a query for such a name):
  ``answer``    NOERROR with the behaviour's records (NXDOMAIN when it has none and
                ``nxdomain`` is set, else NODATA), after ``delay_ms``. A UDP answer that does
                not fit the client's EDNS size (512 without EDNS) is sent empty with TC set,
                as a real server does, and the full answer is given over TCP.
  ``servfail`` / ``refused``  that rcode, after ``delay_ms``.
  ``silent``    never answers (a black-holed server).
  ``garbage``   random bytes instead of a DNS message (then the real answer if ``then_answer``).
  ``wrong-id``  the answer under another query ID (then the real one if ``then_answer``).
  ``truncate``  an empty UDP answer with TC set, whatever its size; over TCP: ``tcp``.
- ``tcp`` says what the TCP side does for the name: ``answer`` (the full answer), ``close``
  (accept and close at once), ``silent`` (accept, never answer) or ``garbage``. Built with
  ``tcp=False`` the server has no TCP listener at all: its port is bound but not listening, so
  a TCP connection is refused (RST) at once.
- Records: ``(type, rdata text)`` pairs for the owner itself, e.g. ``("CNAME", "other.test.")``,
  ``("PTR", "mail.example.")``; a CNAME is followed inside the table (at most 32 hops, as a
  server would stop a loop), so CNAME chains and loops come out as an authoritative server
  gives them.
- ``stop()`` (also on leaving the ``with`` block) stops the thread and closes every socket.

Only the standard library and dnspython; no Twisted, so it cannot disturb the reactor under test.
"""

from __future__ import annotations

import heapq
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

__all__ = ["BadDns", "Behaviour", "MODES"]

MODES = ("answer", "servfail", "refused", "silent", "garbage", "wrong-id", "truncate")
TCP_MODES = ("answer", "close", "silent", "garbage")
TTL = 60
_MAX_CNAME_HOPS = 32


@dataclass(frozen=True)
class Behaviour:
    mode: str = "answer"
    records: tuple = ()  # ((type, rdata text), ...)
    delay_ms: int = 0
    tcp: str = "answer"
    then_answer: bool = False
    nxdomain: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.tcp not in TCP_MODES:
            raise ValueError(f"unknown mode {self.mode!r}/{self.tcp!r}")
        object.__setattr__(self, "records", tuple(tuple(r) for r in self.records))


@dataclass(order=True)
class _Send:
    when: float
    seq: int
    data: bytes = field(compare=False)
    udp_peer: tuple | None = field(compare=False, default=None)
    conn: socket.socket | None = field(compare=False, default=None)


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class BadDns:
    """One misbehaving server on 127.0.0.1; see the module docstring."""

    def __init__(self, table: dict[str, Behaviour], default: Behaviour | None = None,
                 tcp: bool = True, host: str = "127.0.0.1") -> None:
        self.table = {_key(n): b for n, b in table.items()}
        self.default = default or Behaviour(nxdomain=True)
        self.tcp_enabled = tcp
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str, str]] = []  # (name, type, "udp"|"tcp")
        self._lock = threading.Lock()
        self._queue: list[_Send] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> BadDns:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.tcp = socket.socket(family, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(50):  # the same port number free for UDP and TCP
            self.udp.bind((self.host, 0))
            port = self.udp.getsockname()[1]
            try:
                self.tcp.bind((self.host, port))
                break
            except OSError:
                self.udp.close()
                self.udp = socket.socket(family, socket.SOCK_DGRAM)
        else:
            raise OSError("no port free for both UDP and TCP")
        self.port = port
        if self.tcp_enabled:
            self.tcp.listen(64)
        self.udp.setblocking(False)
        self.tcp.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"baddns:{port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> BadDns:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def queried(self, name: str, rrtype: str | None = None, via: str | None = None) -> int:
        """How many queries for ``name`` (and type, and transport) arrived."""
        with self._lock:
            return sum(1 for n, t, v in self.queries if n == _key(name)
                       and (rrtype is None or t == rrtype) and (via is None or v == via))

    # -- the server loop --------------------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.udp, selectors.EVENT_READ, "udp")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        if self.tcp_enabled:
            sel.register(self.tcp, selectors.EVENT_READ, "listen")
        buffers: dict[socket.socket, bytes] = {}
        try:
            while not self._stopping:
                timeout = None
                if self._queue:
                    timeout = max(0.0, self._queue[0].when - time.monotonic())
                for key, _ in sel.select(timeout):
                    what = key.data
                    if what == "wake":
                        return
                    if what == "udp":
                        self._read_udp()
                    elif what == "listen":
                        try:
                            conn, _ = self.tcp.accept()
                        except OSError:
                            continue
                        conn.setblocking(False)
                        buffers[conn] = b""
                        sel.register(conn, selectors.EVENT_READ, "conn")
                    else:
                        self._read_tcp(key.fileobj, buffers, sel)
                self._send_due()
        finally:
            for conn in list(buffers):
                conn.close()
            sel.close()
            self.udp.close()
            self.tcp.close()
            self._wake_r.close()
            self._wake_w.close()

    def _read_udp(self) -> None:
        for _ in range(64):
            try:
                data, peer = self.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for reply, delay in self._replies(data, "udp"):
                self._schedule(reply, delay, udp_peer=peer)

    def _read_tcp(self, conn: socket.socket, buffers: dict, sel) -> None:
        try:
            chunk = conn.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn, buffers, sel)
            return
        buffers[conn] += chunk
        while len(buffers[conn]) >= 2:
            (length,) = struct.unpack("!H", buffers[conn][:2])
            if len(buffers[conn]) < 2 + length:
                return
            message, buffers[conn] = buffers[conn][2:2 + length], buffers[conn][2 + length:]
            for reply, delay in self._replies(message, "tcp"):
                if reply is None:  # close
                    self._drop(conn, buffers, sel)
                    return
                self._schedule(struct.pack("!H", len(reply)) + reply, delay, conn=conn)

    @staticmethod
    def _drop(conn, buffers, sel) -> None:
        buffers.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _schedule(self, data: bytes, delay_ms: int, udp_peer=None, conn=None) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Send(time.monotonic() + delay_ms / 1000.0, self._seq,
                                          data, udp_peer, conn))

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._queue and self._queue[0].when <= now:
            item = heapq.heappop(self._queue)
            try:
                if item.udp_peer is not None:
                    self.udp.sendto(item.data, item.udp_peer)
                elif item.conn is not None and item.conn.fileno() >= 0:
                    item.conn.setblocking(True)
                    item.conn.settimeout(2.0)
                    item.conn.sendall(item.data)
                    item.conn.setblocking(False)
            except OSError:
                pass

    # -- what to answer ---------------------------------------------------------------------
    def behaviour(self, name: str) -> Behaviour:
        name = _key(name)
        while True:
            if name in self.table:
                return self.table[name]
            if not name:
                return self.default
            name = name.partition(".")[2]

    def _replies(self, wire: bytes, via: str) -> list[tuple[bytes | None, int]]:
        """The datagrams/messages to send for one query, with their delays (None: close)."""
        try:
            query = dns.message.from_wire(wire)
            question = query.question[0]
        except Exception:
            return []
        name = question.name.to_text(omit_final_dot=True)
        rrtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((_key(name), rrtype, via))
        b = self.behaviour(name)
        mode = b.mode
        if via == "tcp" and mode not in ("servfail", "refused", "silent"):
            mode = b.tcp
        if mode == "silent":
            return []
        if mode == "close":
            return [(None, 0)]
        if mode in ("servfail", "refused"):
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL if mode == "servfail" else dns.rcode.REFUSED)
            return [(response.to_wire(), b.delay_ms)]
        full = self._answer(query)
        if mode == "truncate" and via == "udp":
            return [(self._truncated(query), b.delay_ms)]
        if via == "udp":
            limit = max(512, query.payload) if query.edns >= 0 else 512
            if len(full) > limit:
                return [(self._truncated(query), b.delay_ms)]
        real = [(full, b.delay_ms)]
        if mode == "garbage":
            junk = os.urandom(37)
            return [(junk, b.delay_ms)] + (real if b.then_answer else [])
        if mode == "wrong-id":
            other = bytearray(full)
            other[0:2] = struct.pack("!H", (query.id + 1) & 0xFFFF)
            return [(bytes(other), b.delay_ms)] + (real if b.then_answer else [])
        return real

    @staticmethod
    def _truncated(query: dns.message.Message) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.TC
        return response.to_wire()

    def _answer(self, query: dns.message.Message) -> bytes:
        question = query.question[0]
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        name = question.name
        rrtype = dns.rdatatype.to_text(question.rdtype)
        seen = set()
        for _ in range(_MAX_CNAME_HOPS):
            seen.add(name)
            exact = self.table.get(_key(name.to_text()))
            own = exact.records if exact is not None else ()
            wanted = [text for t, text in own if t == rrtype]
            cnames = [text for t, text in own if t == "CNAME"]
            if wanted:
                response.answer.append(dns.rrset.from_text_list(name, TTL, "IN", rrtype, wanted))
                break
            if cnames and rrtype != "CNAME":
                response.answer.append(dns.rrset.from_text_list(name, TTL, "IN", "CNAME",
                                                                cnames[:1]))
                name = dns.name.from_text(cnames[0])
                if name in seen:  # a loop: stop, as an authoritative server does
                    break
                continue
            if not own and self.behaviour(name.to_text()).nxdomain:
                response.set_rcode(dns.rcode.NXDOMAIN)
            break
        # max_size: a message bigger than the 64 KB TCP limit cannot be built; tests stay under.
        return response.to_wire(max_size=65535)
