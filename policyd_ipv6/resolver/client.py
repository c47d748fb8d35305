"""An asynchronous DNS stub client: ``wire`` builds queries, ``reply`` parses, Twisted moves them.

Contract: ``DnsClient.query(qname, rdtype)`` returns a Deferred that fires with the parsed
response (a ``resolver.reply.Reply``) of the first nameserver that gives a usable answer
(NOERROR or NXDOMAIN), or fails with ``TransientDnsError`` once every try has timed out, been
refused or answered SERVFAIL/REFUSED/FORMERR/NOTIMP. It never blocks the reactor and never
fails with any other exception. ``DnsClient.ask(wire_name, rdtype, deliver)`` is the same
without a Deferred (the lookups' way in): ``deliver`` is called once with the response or with
the exception, and ``cancel()`` on the query it returns stops it. Interpreting the answer
(CNAME chains, TTLs, caching) is ``lookups``' job.

How a query runs: tries go round-robin over the nameservers, ``attempts`` rounds. Each try
draws a random query ID and goes out on a UDP socket with a kernel-chosen random source port
(RFC 5452 §9.2: both unpredictable), connected to the server so that only its datagrams are
read and an ICMP "port unreachable" fails the tries on it at once. A socket is shared: it
carries at most ``QUERIES_PER_SOCKET`` tries, takes new ones for at most ``SOCKET_SECONDS``,
and is closed when its last try ends; no two of its tries in flight share an ID. Opening a
socket per try cost a quarter of the daemon's CPU on cold mail (socket, bind, connect, epoll
registration, close); a bounded reuse keeps the port unpredictable to anyone off the path. A
try's datagram goes out at the end of the reactor turn that started it (``flush``, one
``callLater(0)`` for all of the turn's), as ``connection.ReplyWriter`` sends replies: the turn's
decisions then run one after another on warm CPU caches, and the kernel's sends (on loopback,
the receiver's work too) come after them. A try cancelled before then sends nothing; a send
that fails fails its try then, as it would have at once. A
response must match its try's ID (the socket's demultiplexing) and question
(``dns_wire.is_reply_to``); anything else is dropped, as is a reply ``parse_reply`` rejects.
A response with the TC bit is retried over TCP to the same server (RFC 7766) whatever the rest
of it holds; a TCP response is read into one buffer, parsed once, and may be up to 65,535
bytes, or up to the query's ``max_size``: a longer one is refused on its two-byte length
prefix, before it is read (the connection is closed), and the query fails with
``ReplyTooLarge`` (a ``TransientDnsError``) without trying further servers: the caller said it
could not use it. The resolv.conf search list is never applied: names are always absolute.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import dns.rcode
from twisted.internet import defer, protocol

from policyd_ipv6.live import Live, Setting
from policyd_ipv6.resolver.reply import MalformedReply, Reply, parse_reply
from policyd_ipv6.resolver.tries import TcpTry, Try
from policyd_ipv6.resolver.wire import Nameserver, encode_name, encode_query, is_reply_to
from policyd_ipv6.timeouts import Timeouts
from policyd_ipv6.vocabulary import DelayedCall

__all__ = ["DnsClient", "Nameserver", "ReplyTooLarge", "TransientDnsError", "MAX_REPLY_SIZE"]

# RFC 1035 §4.2.2: the two-byte length prefix of a TCP message.
MAX_REPLY_SIZE = 65_535

# How long one UDP socket (one source port) is used (see the module docstring): after this many
# tries, or this many seconds after it opened, the next try gets a fresh socket.
QUERIES_PER_SOCKET = 32
SOCKET_SECONDS = 5.0
_USABLE = frozenset((dns.rcode.NOERROR, dns.rcode.NXDOMAIN))  # the rcodes that answer


class TransientDnsError(Exception):
    """No nameserver gave a usable answer in time (timeout, SERVFAIL, REFUSED...)."""


class ReplyTooLarge(TransientDnsError):
    """The reply was longer than the query's ``max_size`` bytes, and was not read."""

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(f"reply of {size} bytes, over the {max_size} this query takes")
        self.size = size
        self.max_size = max_size


class DnsClient:
    """Send queries to ``nameservers``; see the module docstring for the contract."""

    # Reloadable: read from the configuration in force once the wiring sets ``live``.
    nameservers = Setting("nameservers", derived=True)
    timeout_seconds = Setting("dns_timeout_seconds")
    attempts = Setting("dns_attempts")
    live: Live | None = None

    def __init__(self, reactor, nameservers: list[Nameserver], timeout_seconds: float,
                 attempts: int = 2) -> None:
        if not nameservers:
            raise ValueError("no nameservers")
        self.reactor = reactor
        self.timeouts = Timeouts(reactor)  # each try's (one reactor timer per duration)
        self.nameservers = tuple(nameservers)
        self.timeout_seconds = timeout_seconds
        self.attempts = attempts
        self.sockets: dict[Nameserver, _UdpSocket] = {}  # the one taking new tries, per server
        self.entropy = b""  # from os.urandom, read in blocks: one system call per 128 IDs
        self.entropy_used = 0
        # The datagrams of this turn's tries, sent by ``flush`` at its end (module docstring).
        self.outbox: list[tuple[_UdpTry, _UdpSocket, bytes]] = []

    def query(self, name: str, rdtype: int,
              max_size: int = MAX_REPLY_SIZE) -> defer.Deferred[Reply]:
        """Resolve ``name`` (absolute, as text) / ``rdtype``; see the module docstring.

        ``max_size`` bounds the reply in bytes (a longer one fails with ``ReplyTooLarge``).
        Raises ValueError at once for a name DNS cannot carry (``dns_wire.encode_name``).
        The Deferred form of ``ask``: cancelling it cancels the query.
        """
        wire_name = encode_name(name)
        result: defer.Deferred[Reply] = defer.Deferred(lambda _d: query.cancel())
        query = self.ask(wire_name, rdtype,
                         lambda r: result.errback(r) if isinstance(r, Exception)
                         else result.callback(r), max_size)
        return result

    def ask(self, wire_name: bytes, rdtype: int, deliver: Callable[[Reply | Exception], object],
            max_size: int = MAX_REPLY_SIZE) -> _Query:
        """Resolve the name ``wire_name`` (``encode_name``'s form) / ``rdtype`` and call
        ``deliver`` once with the response, or with the ``TransientDnsError`` (or
        ``ReplyTooLarge``) it failed with, maybe before this returns; ``cancel()`` on the
        query returned stops it (``deliver`` is then never called). What ``query`` does,
        without a Deferred: the lookups ask this way, a Deferred per query being a fifth of
        a query's cost."""
        query = _Query(self, encode_query(0, wire_name, rdtype),  # each try sets its own ID
                       [ns for _ in range(self.attempts) for ns in self.nameservers],
                       max_size, deliver)
        query.next_try()
        return query

    def random_id(self) -> int:
        """A query ID from the system's CSPRNG (RFC 5452 §9.2)."""
        used = self.entropy_used
        if used >= len(self.entropy):
            self.entropy, used = os.urandom(256), 0
        self.entropy_used = used + 2
        return int.from_bytes(self.entropy[used:used + 2], "big")

    def send_later(self, attempt: _UdpTry, udp: _UdpSocket, wire: bytes) -> None:
        """Send ``wire`` on ``udp`` for ``attempt`` at the end of this reactor turn."""
        if not self.outbox:
            self.reactor.callLater(0, self.flush)
        self.outbox.append((attempt, udp, wire))

    def flush(self) -> None:
        """Send the turn's datagrams, in the order their tries started, skipping those of
        tries that ended meanwhile (cancelled, or failed by an earlier send's ICMP error).
        The tries whose send failed are failed once every datagram is out: a bug in what
        that sets off (the next try, the caller's deliver) cannot keep the others unsent."""
        outbox, self.outbox = self.outbox, []
        failed: list[tuple[_UdpTry, Exception]] = []
        for attempt, udp, wire in outbox:
            if attempt.done:
                continue
            try:
                if udp.port is None:
                    raise ConnectionError("socket closed")
                udp.port.write(wire)  # an ICMP error already queued fails the tries at once
            except Exception as error:  # socket errors: no route, no IPv6 on this host...
                failed.append((attempt, error))
        for attempt, problem in failed:
            attempt.send_failed(problem)

    def udp_socket(self, server: Nameserver) -> _UdpSocket:
        """The socket the next try to ``server`` goes out on; opens one if needed (may raise)."""
        current = self.sockets.get(server)
        if current is not None:
            if current.uses < QUERIES_PER_SOCKET:
                return current
            current.retire()
        fresh = _UdpSocket(self, server)
        fresh.open()
        self.sockets[server] = fresh
        return fresh


class _Query:
    """The tries of one query, one after another; ``deliver`` is called once with the end."""

    def __init__(self, client: DnsClient, wire: bytes, tries: list[Nameserver],
                 max_size: int, deliver: Callable[[Reply | Exception], object]) -> None:
        self.client = client
        self.wire = wire
        self.tries = tries
        self.max_size = max_size
        # None once delivered or cancelled: nothing more is said, and the caller (which holds
        # this query to cancel it) is no longer held from here, so no cycle outlives a query.
        self.deliver: Callable[[Reply | Exception], object] | None = deliver
        self.problems: list[str] = []
        self.current: Try | None = None  # the try under way

    def next_try(self) -> None:
        if self.deliver is None:
            return
        if not self.tries:
            why = "; ".join(dict.fromkeys(self.problems)) or "no answer"
            self._end(TransientDnsError(why))
            return
        server = self.tries.pop(0)
        self.current = udp = _UdpTry(self, server)
        udp.start()

    def _end(self, result: Reply | Exception) -> None:
        deliver, self.deliver = self.deliver, None
        if deliver is not None:
            deliver(result)

    def answered(self, server: Nameserver, response: Reply) -> None:
        rcode = response.rcode()
        if rcode in _USABLE:
            self.current = None
            self._end(response)
            return
        self.failed(server, dns.rcode.to_text(dns.rcode.Rcode.make(rcode)))

    def truncated(self, server: Nameserver) -> None:
        self.current = tcp = TcpTry(self, server)
        tcp.start()

    def too_large(self, size: int) -> None:
        """The reply is longer than the caller can use: no other server is asked."""
        self.current = None
        self.tries = []
        self._end(ReplyTooLarge(size, self.max_size))

    def failed(self, server: Nameserver, why: str) -> None:
        self.problems.append(f"{why} from {server}")
        self.current = None
        self.next_try()

    def cancel(self) -> None:
        """Stop: the try under way ends (its socket is let go), nothing is delivered."""
        self.deliver = None
        if self.current is not None:
            self.current.stop()
            self.current = None
        self.tries = []


class _UdpSocket(protocol.DatagramProtocol):
    """One connected UDP socket to one server, shared by its tries in flight (keyed by ID)."""

    noisy = False  # no "starting on port" log line per socket

    def __init__(self, client: DnsClient, server: Nameserver) -> None:
        self.client = client
        self.server = server
        self.tries: dict[int, _UdpTry] = {}  # in flight, by query ID
        self.uses = 0
        self.port: Any = None  # the Twisted UDP port; None once closed
        self.retired = False  # takes no new tries; closed when the last one ends
        self.expiry: DelayedCall | None = None

    def open(self) -> None:
        reactor = self.client.reactor
        self.port = reactor.listenUDP(0, self, interface="::" if self.server.ipv6 else "")
        try:
            self.port.connect(self.server.host, self.server.port)
        except Exception:
            self._close()
            raise
        # Retired by age even when idle: no socket outlives its tries by more than this.
        self.expiry = reactor.callLater(SOCKET_SECONDS, self.retire)

    def add(self, attempt: _UdpTry) -> int:
        """Register ``attempt`` under a random ID no try in flight here has; return the ID."""
        self.uses += 1
        # At most QUERIES_PER_SOCKET IDs are taken out of 65,536: a few draws always suffice.
        for _ in range(64):
            qid = self.client.random_id()
            if qid not in self.tries:
                self.tries[qid] = attempt
                return qid
        raise RuntimeError("no free query ID")

    def remove(self, qid: int) -> None:
        del self.tries[qid]
        if self.retired and not self.tries:
            self._close()

    def retire(self) -> None:
        """Take no new tries; close once those in flight have ended."""
        self.retired = True
        if self.expiry is not None:
            if self.expiry.active():
                self.expiry.cancel()
            self.expiry = None
        if self.client.sockets.get(self.server) is self:
            del self.client.sockets[self.server]
        if not self.tries:
            self._close()

    def datagramReceived(self, data: bytes, addr) -> None:
        attempt = self.tries.get(int.from_bytes(data[:2], "big")) if len(data) >= 12 else None
        if attempt is not None:  # else not ours (spoofed, late, junk): dropped
            attempt.received(data)

    def connectionRefused(self) -> None:
        self._unreachable()

    def stopProtocol(self) -> None:
        # The epoll reactor closes a UDP port whose socket reports an error (EPOLLERR, as an
        # ICMP "port unreachable" does on a connected socket) instead of calling
        # connectionRefused: the tries on it have failed either way. Our own close sets
        # ``port`` to None first.
        if self.port is not None:
            self.port = None
            self._unreachable()

    def _unreachable(self) -> None:
        self.retire()
        for attempt in list(self.tries.values()):
            attempt.unreachable()

    def _close(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()


class _UdpTry(Try):
    query: _Query  # the whole query: a truncated reply hands it over to TCP

    def __init__(self, query: _Query, server: Nameserver) -> None:
        super().__init__(query, server)
        self.socket: _UdpSocket | None = None
        self.qid = 0

    def start(self) -> None:
        query = self.query
        try:
            udp = query.client.udp_socket(self.server)
            self.qid = qid = udp.add(self)
            self.socket = udp
            query.wire = wire = qid.to_bytes(2, "big") + query.wire[2:]
        except Exception as error:  # socket errors: no route, no IPv6 on this host...
            self.send_failed(error)
            return
        query.client.send_later(self, udp, wire)
        self._arm("timeout")

    def send_failed(self, error: Exception) -> None:
        self._fail(f"send failed ({error.__class__.__name__})")

    def received(self, data: bytes) -> None:
        if self.done or not is_reply_to(self.query.wire, data):
            return  # same ID, another question: spoofed or junk; keep waiting for the answer
        if data[2] & 0x02:  # TC: the answer did not fit, whatever came with it
            self._finish()
            self.query.truncated(self.server)
            return
        try:
            response = parse_reply(data)
        except MalformedReply:  # junk: drop it, keep waiting
            return
        self._finish()
        self.query.answered(self.server, response)

    def unreachable(self) -> None:
        self._fail("port unreachable")

    def _close(self) -> None:
        if self.socket is not None:
            udp, self.socket = self.socket, None
            udp.remove(self.qid)
