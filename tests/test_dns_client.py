"""The DNS client's UDP side on a fake reactor: shared sockets, IDs, demultiplexing, faults.

No sockets: ``FakeReactor.listenUDP`` hands out ports that record what is written, and the
tests play the server (replies built with dnspython), the kernel (an ICMP error reported as
``connectionRefused`` or as the epoll reactor's close) and the clock (``task.Clock``). A try's
datagram goes out at the end of the reactor turn: ``reactor.advance(0)``.
"""

from __future__ import annotations

import itertools

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from twisted.internet import task
from twisted.python.failure import Failure

from policyd_ipv6.resolver.client import (
    QUERIES_PER_SOCKET,
    SOCKET_SECONDS,
    DnsClient,
    TransientDnsError,
)
from policyd_ipv6.resolver.wire import Nameserver, encode_name

SERVER = Nameserver("127.0.0.1", 53)
OTHER = Nameserver("::1", 5353)
_ports = itertools.count(40000)


class FakePort:
    """A connected UDP port: keeps what is written, closes when asked (one reactor turn later)."""

    def __init__(self, reactor: FakeReactor, protocol, interface: str) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.interface = interface
        self.number = next(_ports)
        self.peer = None
        self.sent: list[bytes] = []
        self.closed = False
        self.refuse_writes = False
        protocol.makeConnection(self)

    def connect(self, host: str, port: int) -> None:
        self.peer = (host, port)

    def write(self, data: bytes) -> None:
        if self.refuse_writes:  # as udp.Port.write does on ECONNREFUSED
            self.protocol.connectionRefused()
            return
        self.sent.append(data)

    def stopListening(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True
        self.reactor.callLater(0, self.protocol.doStop)

    def lose_by_error(self) -> None:
        """What the epoll reactor does on EPOLLERR: it closes the port itself."""
        self.closed = True
        self.protocol.doStop()


class FakeReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []
        self.tcp: list[tuple] = []
        self.fail_listen = False

    def listenUDP(self, port: int, protocol, interface: str = "") -> FakePort:
        assert port == 0, "the kernel chooses the source port"
        if self.fail_listen:
            raise OSError(97, "Address family not supported by protocol")
        udp = FakePort(self, protocol, interface)
        self.ports.append(udp)
        return udp

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        self.tcp.append((host, port))
        from twisted.internet.testing import MemoryReactor

        return MemoryReactor().connectTCP(host, port, factory, timeout, bindAddress)


def make(servers=(SERVER,), attempts=1, timeout=2.0):
    reactor = FakeReactor()
    return reactor, DnsClient(reactor, list(servers), timeout, attempts)


def outcome(deferred) -> list:
    seen: list = []
    deferred.addBoth(seen.append)
    return seen


def reply_to(query: bytes, *, name: str | None = None, tc: bool = False,
             rcode: int = dns.rcode.NOERROR) -> bytes:
    """The server's answer to ``query`` (an AAAA for its name), or for another ``name``."""
    message = dns.message.from_wire(query)
    if name is not None:
        other = dns.message.make_query(name, message.question[0].rdtype)
        other.id = message.id
        message = other
    response = dns.message.make_response(message)
    response.set_rcode(rcode)
    if tc:
        response.flags |= dns.flags.TC
    elif rcode == dns.rcode.NOERROR:
        response.answer.append(dns.rrset.from_text(message.question[0].name, 60, "IN", "AAAA",
                                                   "2001:db8::1"))
    return response.to_wire()


def answered_name(seen: list) -> str:
    """The question name of the one answer a query got (it must have got one)."""
    [response] = seen
    assert not isinstance(response, Failure), response
    assert response.answer
    return dns.name.from_wire(response.qname, 0)[0].to_text()


def test_tries_share_a_socket_up_to_the_bound():
    """QUERIES_PER_SOCKET tries go out on one connected socket, the next on a fresh one."""
    reactor, client = make()
    for i in range(QUERIES_PER_SOCKET + 1):
        client.query(f"q{i}.example", dns.rdatatype.AAAA)
    reactor.advance(0)
    first, second = reactor.ports
    assert len(first.sent) == QUERIES_PER_SOCKET and len(second.sent) == 1
    assert first.peer == second.peer == ("127.0.0.1", 53)
    assert first.interface == ""


def test_a_socket_takes_new_tries_for_a_bounded_time():
    """SOCKET_SECONDS after it opened an idle socket closes; the next try gets a fresh one."""
    reactor, client = make(timeout=SOCKET_SECONDS * 4)
    answer = outcome(client.query("a.example", dns.rdatatype.AAAA))
    reactor.advance(0)
    [first] = reactor.ports
    first.protocol.datagramReceived(reply_to(first.sent[0]), ("127.0.0.1", 53))
    reactor.advance(SOCKET_SECONDS - 0.1)
    assert answer and not first.closed
    reactor.advance(0.1)
    assert first.closed
    client.query("b.example", dns.rdatatype.AAAA)
    assert len(reactor.ports) == 2


def test_a_busy_socket_past_its_time_closes_after_its_last_try():
    """At SOCKET_SECONDS a socket with a try in flight takes no new ones and closes after it."""
    reactor, client = make(timeout=SOCKET_SECONDS * 4)
    answer = outcome(client.query("a.example", dns.rdatatype.AAAA))
    reactor.advance(SOCKET_SECONDS)
    client.query("b.example", dns.rdatatype.AAAA)
    reactor.advance(0)
    first, second = reactor.ports
    assert not first.closed and len(second.sent) == 1
    first.protocol.datagramReceived(reply_to(first.sent[0]), ("127.0.0.1", 53))
    assert answer and first.closed and not second.closed


def test_a_retired_socket_closes_when_its_last_try_ends():
    """A socket past its bound stays open for the answers still due, then closes."""
    reactor, client = make()
    results = [outcome(client.query(f"q{i}.example", dns.rdatatype.AAAA))
               for i in range(QUERIES_PER_SOCKET + 1)]
    reactor.advance(0)
    first = reactor.ports[0]
    for wire in first.sent[:-1]:
        first.protocol.datagramReceived(reply_to(wire), ("127.0.0.1", 53))
    assert not first.closed
    first.protocol.datagramReceived(reply_to(first.sent[-1]), ("127.0.0.1", 53))
    assert first.closed
    assert all(len(seen) == 1 for seen in results[:-1]) and not results[-1]
    reactor.advance(0)  # the port's close completes: no "port unreachable" from our own close
    assert not results[-1]


def test_answers_are_matched_by_id_whatever_their_order():
    """Replies on a shared socket reach their own query, in any order."""
    reactor, client = make()
    a = outcome(client.query("a.example", dns.rdatatype.AAAA))
    b = outcome(client.query("b.example", dns.rdatatype.AAAA))
    reactor.advance(0)
    [port] = reactor.ports
    port.protocol.datagramReceived(reply_to(port.sent[1]), ("127.0.0.1", 53))
    port.protocol.datagramReceived(reply_to(port.sent[0]), ("127.0.0.1", 53))
    assert (answered_name(a)) == "a.example." and (answered_name(b)) == "b.example."


def test_ids_in_flight_on_a_socket_differ():
    """A drawn ID that a try in flight on the same socket holds is drawn again."""
    draws = iter([7, 7, 7, 9])
    reactor, client = make()
    client.random_id = lambda: next(draws)
    client.query("a.example", dns.rdatatype.AAAA)
    client.query("b.example", dns.rdatatype.AAAA)
    reactor.advance(0)
    [port] = reactor.ports
    assert [wire[:2] for wire in port.sent] == [b"\x00\x07", b"\x00\x09"]


def test_spoofed_and_stray_datagrams_are_dropped():
    """Right ID with another question, an unknown ID, and a runt change nothing; the answer does."""
    reactor, client = make()
    seen = outcome(client.query("a.example", dns.rdatatype.AAAA))
    reactor.advance(0)
    [port] = reactor.ports
    [query] = port.sent
    port.protocol.datagramReceived(reply_to(query, name="evil.example"), ("127.0.0.1", 53))
    stray = bytearray(reply_to(query))
    stray[:2] = ((int.from_bytes(query[:2], "big") + 1) % 65536).to_bytes(2, "big")
    port.protocol.datagramReceived(bytes(stray), ("127.0.0.1", 53))
    port.protocol.datagramReceived(query[:2], ("127.0.0.1", 53))
    assert not seen
    port.protocol.datagramReceived(reply_to(query), ("127.0.0.1", 53))
    assert (answered_name(seen)) == "a.example."


def test_port_unreachable_fails_every_try_on_the_socket():
    """An ICMP error fails all tries in flight on that socket; the next tries use a fresh one."""
    reactor, client = make(attempts=2)
    a = outcome(client.query("a.example", dns.rdatatype.AAAA))
    b = outcome(client.query("b.example", dns.rdatatype.AAAA))
    reactor.advance(0)
    first = reactor.ports[0]
    first.protocol.connectionRefused()
    reactor.advance(0)
    second = reactor.ports[1]
    assert first.closed and len(second.sent) == 2
    for wire in second.sent:
        second.protocol.datagramReceived(reply_to(wire), ("127.0.0.1", 53))
    assert (answered_name(a)) == "a.example." and (answered_name(b)) == "b.example."


def test_the_reactor_closing_the_socket_on_an_error_fails_its_tries():
    """EPOLLERR makes the epoll reactor close the port: its tries fail as port unreachable."""
    reactor, client = make()
    seen = outcome(client.query("a.example", dns.rdatatype.AAAA))
    reactor.ports[0].lose_by_error()
    [failure] = seen
    assert failure.check(TransientDnsError) and "port unreachable" in str(failure.value)
    client.query("b.example", dns.rdatatype.AAAA)
    assert len(reactor.ports) == 2


def test_a_refused_write_fails_the_try():
    """An ICMP error reported on the write itself fails the query without waiting for a timeout."""
    reactor, client = make()
    real_listen = reactor.listenUDP

    def refusing(port, protocol, interface=""):
        udp = real_listen(port, protocol, interface)
        udp.refuse_writes = True
        return udp

    reactor.listenUDP = refusing
    seen = outcome(client.query("a.example", dns.rdatatype.AAAA))
    assert not seen  # the datagram goes out at the end of the turn
    reactor.advance(0)  # it is refused; the refused socket's close completes
    [failure] = seen
    assert "port unreachable" in str(failure.value)
    assert reactor.ports[0].closed and not reactor.getDelayedCalls()


def test_a_timed_out_try_is_retried_under_a_new_id_and_its_late_answer_dropped():
    """After a timeout the next try has its own ID; the first try's late answer is ignored."""
    reactor, client = make(attempts=2, timeout=1.0)
    seen = outcome(client.query("a.example", dns.rdatatype.AAAA))
    reactor.advance(1.0)
    [port] = reactor.ports
    first, second = port.sent
    assert first[:2] != second[:2] and first[2:] == second[2:]
    port.protocol.datagramReceived(reply_to(first), ("127.0.0.1", 53))
    assert not seen
    port.protocol.datagramReceived(reply_to(second), ("127.0.0.1", 53))
    assert (answered_name(seen)) == "a.example."


def test_every_try_timing_out_is_a_transient_error():
    """No answer from any server within the tries: TransientDnsError naming the timeouts."""
    reactor, client = make(servers=(SERVER, OTHER), attempts=2, timeout=1.0)
    seen = outcome(client.query("a.example", dns.rdatatype.AAAA))
    reactor.advance(1.0)
    reactor.advance(1.0)
    reactor.advance(1.0)
    assert not seen
    reactor.advance(1.0)
    [failure] = seen
    assert failure.check(TransientDnsError) and "timeout" in str(failure.value)
    assert {port.peer for port in reactor.ports} == {("127.0.0.1", 53), ("::1", 5353)}
    assert {port.interface for port in reactor.ports} == {"", "::"}


def test_cancelling_frees_the_id_and_the_timer():
    """A cancelled query stops its timer and leaves no try registered on the socket."""
    reactor, client = make()
    query = client.query("a.example", dns.rdatatype.AAAA)
    query.addErrback(lambda _failure: None)
    reactor.advance(0)
    [port] = reactor.ports
    query.cancel()
    assert not port.protocol.tries
    assert [call.func for call in reactor.getDelayedCalls()] == [port.protocol.retire]
    port.protocol.datagramReceived(reply_to(port.sent[0]), ("127.0.0.1", 53))  # late: ignored


def test_servfail_goes_to_the_next_try():
    """SERVFAIL is not an answer: the next try is asked and its answer is used."""
    reactor, client = make(attempts=2)
    seen = outcome(client.query("a.example", dns.rdatatype.AAAA))
    reactor.advance(0)
    [port] = reactor.ports
    port.protocol.datagramReceived(reply_to(port.sent[0], rcode=dns.rcode.SERVFAIL), None)
    reactor.advance(0)
    assert not seen and len(port.sent) == 2
    port.protocol.datagramReceived(reply_to(port.sent[1]), None)
    assert (answered_name(seen)) == "a.example."


def test_a_truncated_answer_is_asked_again_over_tcp():
    """TC set: the query goes to the same server over TCP, and the UDP try is over."""
    reactor, client = make()
    client.query("a.example", dns.rdatatype.AAAA)
    reactor.advance(0)
    [port] = reactor.ports
    port.protocol.datagramReceived(reply_to(port.sent[0], tc=True), None)
    assert reactor.tcp == [("127.0.0.1", 53)] and not port.protocol.tries


def test_no_socket_is_a_transient_error():
    """A socket that cannot be opened (no IPv6 on the host) fails the try, not the daemon."""
    reactor, client = make(attempts=2)
    reactor.fail_listen = True
    seen = outcome(client.query("a.example", dns.rdatatype.AAAA))
    [failure] = seen
    assert failure.check(TransientDnsError) and "send failed (OSError)" in str(failure.value)


def test_random_ids_are_read_in_blocks_and_never_repeat_a_block():
    """IDs come from os.urandom 128 at a time; the next block is new bytes, not the old ones."""
    _reactor, client = make()
    first = [client.random_id() for _ in range(128)]
    block = client.entropy
    second = [client.random_id() for _ in range(128)]
    assert client.entropy != block and first != second
    assert first == [int.from_bytes(block[i:i + 2], "big") for i in range(0, 256, 2)]


def test_ids_are_drawn_at_random():
    """The IDs of a socket's tries are not a sequence: they are spread over 16 bits."""
    reactor, client = make()
    for i in range(QUERIES_PER_SOCKET):
        client.query(f"q{i}.example", dns.rdatatype.AAAA)
    reactor.advance(0)
    ids = [int.from_bytes(wire[:2], "big") for wire in reactor.ports[0].sent]
    assert len(set(ids)) == len(ids) and max(ids) - min(ids) > 4096


def test_ask_delivers_once_without_a_deferred():
    """``ask`` (the lookups' way in) calls its deliver once with the reply, then never again;
    a second copy of the reply, or a late timer, says nothing more."""
    reactor, client = make(attempts=2)
    seen: list = []
    query = client.ask(encode_name("a.example"), dns.rdatatype.AAAA, seen.append)
    reactor.advance(0)
    [port] = reactor.ports
    port.protocol.datagramReceived(reply_to(port.sent[0]), None)
    assert [call.func for call in reactor.getDelayedCalls()] == [port.protocol.retire]
    port.protocol.datagramReceived(reply_to(port.sent[0]), None)
    reactor.advance(10)  # past the try's timeout (2 s): it was stopped
    assert answered_name(seen) == "a.example."
    assert query.deliver is None and len(port.sent) == 1


def test_ask_delivers_the_error_when_every_try_failed():
    """Every try timed out: deliver gets the TransientDnsError itself (no Failure)."""
    reactor, client = make(attempts=2, timeout=1.0)
    seen: list = []
    client.ask(encode_name("a.example"), dns.rdatatype.AAAA, seen.append)
    reactor.advance(1.0)
    assert not seen
    reactor.advance(1.0)
    [error] = seen
    assert isinstance(error, TransientDnsError) and "timeout" in str(error)


def test_ask_can_deliver_before_it_returns():
    """No socket at all: the query fails inside ``ask``, before the caller holds it."""
    reactor, client = make(attempts=2)
    reactor.fail_listen = True
    seen: list = []
    query = client.ask(encode_name("a.example"), dns.rdatatype.AAAA, seen.append)
    assert isinstance(seen[0], TransientDnsError) and len(seen) == 1
    query.cancel()  # too late to matter: nothing more is delivered
    assert len(seen) == 1


def test_a_cancelled_ask_delivers_nothing_and_lets_its_try_go():
    """cancel(): the try leaves its socket, its timer is stopped, a late reply is dropped and
    deliver is never called (the lookups withdraw this way)."""
    reactor, client = make()
    seen: list = []
    query = client.ask(encode_name("a.example"), dns.rdatatype.AAAA, seen.append)
    reactor.advance(0)
    [port] = reactor.ports
    query.cancel()
    assert not port.protocol.tries and query.deliver is None
    assert [call.func for call in reactor.getDelayedCalls()] == [port.protocol.retire]
    port.protocol.datagramReceived(reply_to(port.sent[0]), None)
    reactor.advance(10)
    assert seen == []


def test_datagrams_go_out_together_at_the_end_of_the_turn_in_order():
    """Nothing is sent while the turn runs; at its end every try's datagram goes out, in the
    order the tries started, with one reactor call for all of them."""
    reactor, client = make()
    for name in ("a.example", "b.example", "c.example"):
        client.query(name, dns.rdatatype.AAAA)
    [port] = reactor.ports
    assert port.sent == []
    assert [call.func for call in reactor.getDelayedCalls()].count(client.flush) == 1
    reactor.advance(0)
    assert [dns.message.from_wire(wire).question[0].name.to_text() for wire in port.sent] == [
        "a.example.", "b.example.", "c.example."]
    assert client.outbox == []


def test_a_try_cancelled_within_its_turn_sends_nothing():
    """A query cancelled (its decision's deadline, a withdrawn lookup) before the end of the
    turn puts nothing on the wire; the others of the turn still go out."""
    reactor, client = make()
    seen: list = []
    dropped = client.ask(encode_name("a.example"), dns.rdatatype.AAAA, seen.append)
    client.ask(encode_name("b.example"), dns.rdatatype.AAAA, seen.append)
    dropped.cancel()
    reactor.advance(0)
    [port] = reactor.ports
    assert [dns.message.from_wire(wire).question[0].name.to_text() for wire in port.sent] == [
        "b.example."]
    assert seen == []


def test_a_send_that_fails_at_the_end_of_the_turn_fails_its_try():
    """A send the kernel refuses outright (no buffer space, say) at the end of the turn fails
    that try at once, naming the error, and the query goes on to its next try."""
    reactor, client = make(attempts=2)
    seen: list = []
    client.ask(encode_name("a.example"), dns.rdatatype.AAAA, seen.append)
    [port] = reactor.ports
    calls = []

    def write(data):
        calls.append(data)
        if len(calls) == 1:
            raise OSError(105, "No buffer space available")
        port.sent.append(data)

    port.write = write
    reactor.advance(0)
    assert len(calls) == 2 and len(port.sent) == 1  # the second try went out
    port.protocol.datagramReceived(reply_to(port.sent[0]), None)
    assert answered_name(seen) == "a.example."
    client.ask(encode_name("b.example"), dns.rdatatype.AAAA, seen.append)
    port.write = lambda data: (_ for _ in ()).throw(OSError(105, "No buffer space"))
    reactor.advance(0)
    reactor.advance(0)
    assert isinstance(seen[-1], TransientDnsError)
    assert "send failed (OSError)" in str(seen[-1])


def test_a_failed_send_is_failed_after_the_other_datagrams_are_out():
    """A bug set off by one failed send (here the caller's deliver raising) does not keep
    the turn's other datagrams from going out."""
    reactor, client = make(attempts=1)
    seen: list = []

    def buggy(result):
        raise RuntimeError("a bug in the caller")

    client.ask(encode_name("a.example"), dns.rdatatype.AAAA, buggy)
    client.ask(encode_name("b.example"), dns.rdatatype.AAAA, seen.append)
    [port] = reactor.ports
    real_write = port.write

    def write(data):
        if dns.message.from_wire(data).question[0].name.to_text() == "a.example.":
            raise OSError(105, "No buffer space available")
        real_write(data)

    port.write = write
    try:
        reactor.advance(0)
    except RuntimeError:
        pass  # task.Clock lets it out; the reactor logs it
    assert [dns.message.from_wire(wire).question[0].name.to_text() for wire in port.sent] == [
        "b.example."]
