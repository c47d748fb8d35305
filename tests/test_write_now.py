"""Tests of connection.write_now: a reply sent at once when nothing is queued, and Twisted's
own write path whenever something is (queued data, a partial send, an error, a transport that
is not a Twisted socket); and of ReplyWriter, which holds a turn's replies until its end."""

from types import SimpleNamespace

from twisted.internet import main
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from policyd_ipv6.connection import ReplyWriter, write_now
from policyd_ipv6.policy.server import PolicyFactory


class Socketish:
    """The parts of a Twisted socket transport write_now reads, recording what it is asked."""

    def __init__(self, sends=None, **state):
        self.connected, self.disconnecting, self._writeDisconnected = True, False, False
        self.producer, self._tempDataBuffer, self.dataBuffer, self.offset = None, [], b"", 0
        self.__dict__.update(state)
        self.sends = list(sends or [])
        self.sent: list[bytes] = []
        self.written: list[bytes] = []

    def writeSomeData(self, data):
        self.sent.append(data)
        return self.sends.pop(0) if self.sends else len(data)

    def write(self, data):
        self.written.append(data)


def test_idle_connection_sends_at_once():
    """Nothing queued: the reply goes out through one send, and nothing is left to write."""
    t = Socketish()
    write_now(t, b"action=DUNNO\n\n")
    assert t.sent == [b"action=DUNNO\n\n"] and t.written == []


def test_partial_send_leaves_the_rest_to_twisted():
    """A send that takes only part of the reply leaves exactly the rest to transport.write."""
    t = Socketish(sends=[5])
    write_now(t, b"action=DUNNO\n\n")
    assert t.written == [b"n=DUNNO\n\n"]


def test_error_leaves_everything_to_twisted():
    """A send error (Twisted's CONNECTION_LOST value) hands the whole reply to
    transport.write, whose own path notices the error and closes the connection."""
    t = Socketish(sends=[main.CONNECTION_LOST])
    write_now(t, b"action=DUNNO\n\n")
    assert t.written == [b"action=DUNNO\n\n"]


def test_anything_queued_keeps_the_order():
    """Data already queued (or a closing connection, or a producer) means no direct send, so
    replies never overtake what is waiting."""
    for state in ({"_tempDataBuffer": [b"x"]}, {"dataBuffer": b"abc", "offset": 1},
                  {"disconnecting": True}, {"connected": False}, {"producer": object()},
                  {"_writeDisconnected": True}):
        t = Socketish(**state)
        write_now(t, b"reply")
        assert t.sent == [] and t.written == [b"reply"], state


def test_other_transports_just_write():
    """A transport without Twisted's socket internals (a test or TLS transport) gets write."""
    t = StringTransport()
    write_now(t, b"action=DUNNO\n\n")
    assert t.value() == b"action=DUNNO\n\n"
    odd = SimpleNamespace(written=[])
    odd.write = odd.written.append
    write_now(odd, b"x")
    assert odd.written == [b"x"]


def test_replies_are_held_until_the_end_of_the_turn_then_sent_in_order():
    """ReplyWriter sends nothing during the turn, then every held reply, in the order
    written, through one direct send each, when the turn's callLater(0) runs."""
    clock = Clock()
    writer = ReplyWriter(clock)
    a, b = Socketish(), Socketish()
    writer.write(a, b"1")
    writer.write(b, b"2")
    writer.write(a, b"3")
    assert a.sent == b.sent == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert a.sent == [b"1", b"3"] and b.sent == [b"2"] and writer.held == []
    writer.write(b, b"4")  # the next turn schedules its own flush
    clock.advance(0)
    assert b.sent == [b"2", b"4"]


def test_release_sends_the_held_replies_at_once():
    """release(transport) sends that connection's held replies now, before a close, with the
    others' (in the order written); the end of the turn then has nothing left to send."""
    clock = Clock()
    writer = ReplyWriter(clock)
    a, b = Socketish(), Socketish()
    writer.write(a, b"1")
    writer.write(b, b"2")
    writer.write(a, b"3")
    writer.release(a)
    assert a.sent == [b"1", b"3"] and b.sent == [b"2"] and writer.held == []
    writer.release(b)  # already sent: nothing twice
    clock.advance(0)
    assert a.sent == [b"1", b"3"] and b.sent == [b"2"]


def test_a_drain_of_many_connections_sends_each_reply_once_in_linear_time():
    """Closing thousands of connections answered in one turn: each reply goes out once, and
    the held list is walked once, not once per connection."""
    clock = Clock()
    writer = ReplyWriter(clock)
    transports = [Socketish() for _ in range(5000)]
    for n, t in enumerate(transports):
        writer.write(t, b"%d" % n)
    walked = []
    real_flush = writer.flush
    writer.flush = lambda: (walked.append(len(writer.held)), real_flush())[1]
    for t in transports:
        writer.release(t)
    assert walked == [5000]
    assert [t.sent for t in transports] == [[b"%d" % n] for n in range(5000)]


def test_writer_hands_other_transports_their_reply_at_once():
    """A transport that is not a Twisted socket (tests, TLS) gets write at once, with no
    delayed call."""
    clock = Clock()
    writer = ReplyWriter(clock)
    t = StringTransport()
    writer.write(t, b"action=DUNNO\n\n")
    assert t.value() == b"action=DUNNO\n\n" and clock.getDelayedCalls() == []


def test_closing_a_policy_connection_sends_its_held_reply_first():
    """A policy connection closed in the turn that answered it (a drain, an eviction)
    still sends that reply before Twisted's close."""
    clock = Clock()
    factory = PolicyFactory(engine=None, clock=clock)
    proto = factory.buildProtocol(None)
    t = Socketish()
    t.loseConnection = lambda: t.written.append(b"<closed>")
    proto.transport = t
    factory.writer.write(t, b"action=DUNNO\n\n")
    proto._close()
    assert t.sent == [b"action=DUNNO\n\n"] and t.written == [b"<closed>"]
