"""Tests of connection.write_now: a reply sent at once when nothing is queued, and Twisted's
own write path whenever something is (queued data, a partial send, an error, a transport that
is not a Twisted socket)."""

from types import SimpleNamespace

from twisted.internet import main
from twisted.internet.testing import StringTransport

from policyd_ipv6.connection import write_now


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
