"""systemd's side of the daemon without systemd: notify messages, socket activation variables,
the watchdog timer and the graceful stop, with literals, a fake transport and a fake clock."""

from types import SimpleNamespace

import pytest
from lab.daemonproc import request
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport

from policyd_ipv6.daemon.lifecycle import START_MARGIN_SECONDS, Lifecycle
from policyd_ipv6.daemon.stopping import FIRST_REQUEST_SECONDS, drain
from policyd_ipv6.daemon.systemd import (
    Notifier,
    endpoint_address,
    listen_fds,
    notify_address,
    notify_message,
    served_addresses,
    start_watchdog,
    watchdog_seconds,
)
from policyd_ipv6.policy.server import PolicyFactory


def test_notify_message_is_one_line_per_field_in_order():
    """The datagram is KEY=value lines in the order given (sd_notify(3))."""
    assert notify_message({"RELOADING": "1", "MONOTONIC_USEC": "42"}) == \
        b"RELOADING=1\nMONOTONIC_USEC=42\n"


@pytest.mark.parametrize("fields", [{"STATUS": "a\nREADY=1"}, {"ready": "1"}, {"A=B": "1"}])
def test_notify_message_refuses_a_value_that_would_forge_another_field(fields):
    """A newline in a value or a key that is not upper-case word characters is refused."""
    with pytest.raises(ValueError):
        notify_message(fields)


@pytest.mark.parametrize("value, address", [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@sd-notify/1", "\0sd-notify/1"),
    ("", None), (None, None), ("@", None), ("vsock:2:1234", None), ("relative", None)])
def test_notify_address_paths_and_the_abstract_namespace(value, address):
    """A path is used as is, '@' means the abstract namespace; anything else is not spoken."""
    assert notify_address(value) == address


def test_without_notify_socket_every_message_is_a_no_op():
    """Not under systemd, the notifier sends nothing and never fails."""
    env = {}
    notifier = Notifier.from_environment(env)
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.reloading() and not notifier.stopping()
    assert not notifier.watchdog() and not notifier.extend_timeout(120.0, "waiting")


def test_extend_timeout_is_the_extension_in_whole_microseconds_rounded_up():
    """EXTEND_TIMEOUT_USEC carries the seconds as microseconds, never fewer, then STATUS."""
    sent = []
    notifier = Notifier("\0unused")
    notifier.send = lambda fields: sent.append(notify_message(fields)) or True
    assert notifier.extend_timeout(120.0000001, "waiting for the table")
    assert notifier.extend_timeout(1.5)
    assert sent == [b"EXTEND_TIMEOUT_USEC=120000001\nSTATUS=waiting for the table\n",
                    b"EXTEND_TIMEOUT_USEC=1500000\n"]


def test_the_notify_socket_is_taken_out_of_the_environment():
    """NOTIFY_SOCKET is removed once read, so the DKIM workers cannot claim to be us."""
    env = {"NOTIFY_SOCKET": "@x", "PATH": "/bin"}
    assert Notifier.from_environment(env).address == "\0x"
    assert env == {"PATH": "/bin"}


@pytest.mark.parametrize("env, seconds", [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "77"}, 3.0),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "78"}, None),
    ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "x"}, None), ({}, None)])
def test_watchdog_seconds_only_for_this_process(env, seconds):
    """WATCHDOG_USEC counts for us only when WATCHDOG_PID is absent or ours (pid 77 here)."""
    assert watchdog_seconds(env, 77) == seconds


def test_watchdog_pings_every_half_timeout_while_the_reactor_turns():
    """WATCHDOG=1 goes out at once, then every half of the timeout, from the clock."""
    clock = task.Clock()
    sent = []
    notifier = SimpleNamespace(watchdog=lambda: sent.append(clock.seconds()))
    ping = start_watchdog(clock, notifier, 4.0)
    clock.pump([1.0] * 5)
    ping.stop()
    assert sent == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("env, fds", [
    ({"LISTEN_PID": "77", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "policy:milter"},
     [(3, "policy"), (4, "milter")]),
    ({"LISTEN_PID": "77", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "policy"},
     [(3, "unknown"), (4, "unknown")]),
    ({"LISTEN_PID": "78", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "policy"}, []),
    ({"LISTEN_FDS": "1"}, []), ({}, [])])
def test_listen_fds_are_ours_from_three_with_their_names(env, fds):
    """Sockets are taken only when LISTEN_PID is ours; names pair with fds 3, 4, ..."""
    assert listen_fds(env, 77) == fds


@pytest.mark.parametrize("env", [{"LISTEN_PID": "77", "LISTEN_FDS": "two"},
                                 {"LISTEN_PID": "77", "LISTEN_FDS": "0"},
                                 {"LISTEN_PID": "seventy", "LISTEN_FDS": "1"}])
def test_listen_fds_malformed_variables_are_an_error(env):
    """Variables that do not parse are an error, not a daemon silently binding elsewhere."""
    with pytest.raises(ValueError):
        listen_fds(env, 77)


@pytest.mark.parametrize("description, address", [
    ("tcp:10045", "tcp:0.0.0.0:10045"),  # Twisted's default interface for tcp: INADDR_ANY
    ("tcp6:10045", "tcp::::10045"),  # and for tcp6: ::
    ("tcp:10045:interface=127.0.0.1:backlog=5", "tcp:127.0.0.1:10045"),
    (r"tcp6:10045:interface=\:\:1", "tcp:::1:10045"),  # an escaped colon is the address's
    (r"tcp:10045:interface=\:\:1", "tcp:::1:10045"),  # tcp with an IPv6 interface
    (r"tcp6:10045:interface=0\:0\:0\:0\:0\:0\:0\:1", "tcp:::1:10045"),  # canonical form
    ("unix:/run/policyd-ipv6/policy:mode=660", "unix:/run/policyd-ipv6/policy"),
    ("tcp:10045:interface=localhost", ""),  # a host name is never taken for an address
    ("tcp:port", ""), ("carrier-pigeon:1", ""), ("", "")])
def test_endpoint_address_reads_the_string_by_twisted_rules(description, address):
    """A configured endpoint's address comes from Twisted's own parse (escapes, defaults)."""
    assert endpoint_address(description) == address


class AdoptedSocket:
    """What served_addresses reads of an adopted socket: IPV6_V6ONLY."""

    def __init__(self, v6only: int) -> None:
        self.v6only = v6only

    def getsockopt(self, level, option):
        return self.v6only


class AdoptedPort(SimpleNamespace):
    def getHost(self):
        return self.host


def _adopted(host: str, port: int = 10045, v6only: int = 0) -> AdoptedPort:
    if host.startswith("/"):
        return AdoptedPort(host=UNIXAddress(host), socket=None)
    address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
    return AdoptedPort(host=address, socket=AdoptedSocket(v6only))


@pytest.mark.parametrize("description, host, v6only, served", [
    # ListenStream=10045 is [::] dual-stack: tcp:10045 (0.0.0.0) could not be bound beside it.
    ("tcp:10045", "::", 0, True),
    ("tcp:10045", "::", 1, False),  # IPV6_V6ONLY: 0.0.0.0:10045 is free, and bound
    ("tcp:10045", "0.0.0.0", 0, True),
    ("tcp6:10045", "::", 0, True),
    ("tcp6:10045", "::", 1, True),
    ("tcp6:10045", "0.0.0.0", 0, False),  # an IPv4 socket never serves ::
    (r"tcp6:10045:interface=\:\:1", "::1", 0, True),
    ("tcp:10045:interface=127.0.0.1", "127.0.0.1", 0, True),
    ("tcp:10045:interface=127.0.0.1", "::", 0, False),  # a specific address: no wildcard
    ("tcp:10046", "::", 0, False),  # another port
    ("unix:/run/p/policy:mode=660", "/run/p/policy", 0, True),
    ("unix:/run/p/other", "/run/p/policy", 0, False),
    ("tcp:10045", "/run/p/policy", 0, False)])
def test_a_configured_endpoint_is_served_by_an_adopted_socket_at_its_address(
        description, host, v6only, served):
    """A configured endpoint is skipped exactly when an adopted socket serves its address: the
    same one, or 0.0.0.0:PORT under a dual-stack [::]:PORT."""
    assert (endpoint_address(description) in served_addresses(_adopted(host, 10045, v6only))) \
        is served


class SlowEngine:
    """Answers each request when the test says so."""

    def __init__(self):
        self.waiting: list = []

    def answer_with(self, _request, deliver, _failed):
        self.waiting.append(deliver)
        return None

    def settle(self, action="DUNNO"):
        for deliver in self.waiting:
            deliver(SimpleNamespace(verdict=SimpleNamespace(action=action)))
        self.waiting.clear()


def _connect(factory):
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def _lose_closed(protos):
    """What the reactor does for a transport told to close: connectionLost, once."""
    for proto, transport in protos:
        if transport.disconnecting and not getattr(transport, "lost", False):
            transport.lost = True
            proto.connectionLost()


class FakePort:
    def __init__(self):
        self.listening = True

    def stopListening(self):
        self.listening = False


def test_drain_answers_the_request_in_flight_then_closes():
    """On stop, a connection between requests closes at once; one deciding gets its reply,
    then closes; a new one gets FIRST_REQUEST_SECONDS to send its request."""
    clock, engine = task.Clock(), SlowEngine()
    factory = PolicyFactory(engine, clock)
    idle, busy, fresh = _connect(factory), _connect(factory), _connect(factory)
    idle[0].dataReceived(request())
    engine.settle()
    busy[0].dataReceived(request())
    port = FakePort()
    done = drain(clock, [port], factory, None, 5.0)
    assert not port.listening and idle[1].disconnecting
    assert not busy[1].disconnecting and not fresh[1].disconnecting
    _lose_closed([idle, busy, fresh])
    clock.advance(1.0)
    fresh[0].dataReceived(request())  # late, but before FIRST_REQUEST_SECONDS
    assert not done.called
    engine.settle("451 4.4.3 later")
    clock.advance(0.1)
    assert busy[1].value() == fresh[1].value() == b"action=451 4.4.3 later\n\n"
    assert busy[1].disconnecting and fresh[1].disconnecting
    _lose_closed([idle, busy, fresh])
    clock.advance(0.1)
    assert done.called


def test_drain_closes_a_silent_new_connection_after_the_first_request_wait():
    """A connection that never sends its first request does not hold the stop."""
    clock = task.Clock()
    factory = PolicyFactory(SlowEngine(), clock)
    _proto, transport = _connect(factory)
    drain(clock, [], factory, None, 10.0)
    clock.pump([0.5] * int(FIRST_REQUEST_SECONDS / 0.5 - 1))
    assert not transport.disconnecting
    clock.pump([0.5] * 2)
    assert transport.disconnecting and transport.value() == b""


def test_drain_is_bounded_by_the_grace_period():
    """A request still undecided when the grace period ends does not hold the stop."""
    clock, engine = task.Clock(), SlowEngine()
    factory = PolicyFactory(engine, clock)
    _proto, transport = _connect(factory)
    _proto.dataReceived(request())
    done = drain(clock, [], factory, None, 2.0)
    clock.pump([0.5] * 3)
    assert not done.called
    clock.pump([0.5] * 2)
    assert done.called and transport.value() == b""


def test_lifecycle_reload_says_reloading_then_ready_even_when_the_reload_fails():
    """SIGHUP's action is wrapped in RELOADING=1 (with MONOTONIC_USEC) and READY=1."""
    sent = []
    notifier = Notifier("\0unused")
    notifier.send = lambda fields: sent.append(dict(fields)) or True
    reactor = SimpleNamespace(addSystemEventTrigger=lambda *a: None)
    service = SimpleNamespace(config=SimpleNamespace(decision_deadline_seconds=1.0))
    life = Lifecycle(reactor, service, notifier, [], None)

    def broken():
        raise RuntimeError("bad file")
    with pytest.raises(RuntimeError):
        life.reloading(broken)()
    assert [list(m) for m in sent] == [["RELOADING", "MONOTONIC_USEC"], ["READY"]]
    assert sent[0]["MONOTONIC_USEC"].isdigit()


def test_a_start_up_wait_extends_the_start_timeout_past_it_with_a_margin():
    """Before a start-up wait of up to 120 s, systemd is told the start may last 120 s plus
    START_MARGIN_SECONDS more, with a one-line STATUS even from a multi-line text."""
    sent = []
    notifier = Notifier("\0unused")
    notifier.send = lambda fields: sent.append(dict(fields)) or True
    reactor = SimpleNamespace(addSystemEventTrigger=lambda *a: None)
    service = SimpleNamespace(config=SimpleNamespace(decision_deadline_seconds=1.0))
    Lifecycle(reactor, service, notifier, [], None).waiting(120.0, "waiting for\nPostgreSQL")
    assert sent == [{"EXTEND_TIMEOUT_USEC": str(int((120 + START_MARGIN_SECONDS) * 1e6)),
                     "STATUS": "waiting for PostgreSQL"}]
    assert START_MARGIN_SECONDS >= 10


def test_grace_period_follows_a_reloaded_decision_deadline():
    """The stop's grace period is the decision deadline in force when it begins (a SIGHUP may
    have raised it) plus one second, not the deadline of start-up."""
    reactor = SimpleNamespace(addSystemEventTrigger=lambda *a: None)
    service = SimpleNamespace(config=SimpleNamespace(decision_deadline_seconds=2.0))
    life = Lifecycle(reactor, service, Notifier("\0unused"), [], None)
    assert life.grace_seconds == 3.0
    service.config = SimpleNamespace(decision_deadline_seconds=20.0)  # what a reload does
    assert life.grace_seconds == 21.0


class FakeMilterConnection:
    def __init__(self, waiting=None, in_transaction=False):
        self.waiting, self.in_transaction, self.closed = waiting, in_transaction, False

    def _close(self):
        self.closed = True


def test_drain_lets_a_milter_message_under_way_be_judged_first():
    """A milter connection between messages closes at once; one in a transaction or owed a
    verdict stays open until it is neither (bounded by the grace period)."""
    clock = task.Clock()
    between, sending, judging = (FakeMilterConnection(), FakeMilterConnection(None, True),
                                 FakeMilterConnection(object(), True))
    milter = SimpleNamespace(open={between, sending, judging})
    done = drain(clock, [], None, milter, 5.0)
    assert between.closed and not sending.closed and not judging.closed
    milter.open.discard(between)
    sending.in_transaction = False  # end of message answered
    clock.advance(0.1)
    assert sending.closed and not judging.closed
    milter.open.discard(sending)
    clock.pump([1.0] * 5)
    assert done.called and not judging.closed  # left to the reactor's shutdown
