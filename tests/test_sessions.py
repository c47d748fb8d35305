"""Tests of the sessions registry (policyd_ipv6.sessions): keys, expiry, bounds, message life
cycle, with literal milter connections and policy attributes and a fake clock."""

from twisted.internet import task

from policyd_ipv6.facts import Facts
from policyd_ipv6.milter.events import Connection
from policyd_ipv6.milter.registry import (
    DKIM_PENDING_RULE,
    SessionKey,
    Sessions,
    milter_key,
    policy_key,
    same_sender,
)
from policyd_ipv6.policy.decision import Verdict

ADDR = "2001:db8:1::10"


def conn(port=4000, address=ADDR, daemon_addr="2001:db8:25::25", daemon_port="25", **macros):
    values = dict(macros)
    if daemon_addr is not None:
        values["daemon_addr"] = daemon_addr
    if daemon_port is not None:
        values["daemon_port"] = daemon_port
    return Connection("[x]", "6", address, port, values)


def attrs(port=4000, sender="alice@fail.test", address=ADDR, server="2001:db8:25::25",
          server_port="25"):
    out = {"client_address": address, "client_port": str(port), "sender": sender}
    if server is not None:
        out.update(server_address=server, server_port=server_port)
    return out


def test_keys_are_normalised_on_both_sides():
    """Address spellings ("IPv6:" prefix, upper case, zeros) and port text meet in one key."""
    milter = milter_key(conn(address="2001:DB8:1:0::10", daemon_addr="IPv6:2001:db8:25::25"))
    policy = policy_key(attrs(address="2001:db8:1::10", server="2001:db8:25:0::25"))
    assert milter == policy == SessionKey(ADDR, 4000, "2001:db8:25::25", 25)


def test_unusable_keys_are_none():
    """No port (Postfix before 3.0), a junk address or port 0: no key, so no correlation."""
    assert policy_key({"client_address": ADDR}) is None
    assert policy_key(attrs(address="unknown")) is None
    assert milter_key(conn(port=0)) is None
    assert milter_key(Connection("localhost", "L", "/tmp/sock", 0, {})) is None


def test_milter_port_falls_back_to_the_client_port_macro():
    """A CONNECT without a port still correlates through {client_port}."""
    assert milter_key(conn(port=None, client_port="4321")).client_port == 4321


def test_server_part_is_used_when_both_sides_have_it():
    """Same client address and port on two Postfix hosts (two server addresses): two sessions."""
    sessions = Sessions(task.Clock())
    a = sessions.register(conn(daemon_addr="2001:db8:25::25"))
    b = sessions.register(conn(daemon_addr="2001:db8:26::25"))
    a.begin_message("<alice@fail.test>")
    b.begin_message("<other@fail.test>")
    assert sessions.message_for(attrs(server="2001:db8:25::25")) is a.current
    assert sessions.message_for(attrs(server="2001:db8:26::25", sender="other@fail.test")) \
        is b.current
    assert sessions.find(attrs(server="2001:db8:27::25")) is None


def test_a_milter_without_server_macros_still_matches_a_policy_request_with_them():
    """The milter lacks {daemon_addr}/{daemon_port}: the client part alone is the key."""
    sessions = Sessions(task.Clock())
    state = sessions.register(conn(daemon_addr=None, daemon_port=None))
    assert sessions.find(attrs()) is state and sessions.find(attrs(server=None)) is state


def test_entries_expire_unless_touched():
    """An entry lives ttl_seconds after the milter last touched it."""
    clock = task.Clock()
    sessions = Sessions(clock, ttl_seconds=100)
    kept = sessions.register(conn(4001))
    sessions.register(conn(4002))
    clock.advance(60)
    sessions.touch(kept)
    clock.advance(60)
    assert sessions.find(attrs(4001)) is kept and sessions.find(attrs(4002)) is None


def test_the_registry_is_bounded_and_an_evicted_session_keeps_its_records():
    """Over max_sessions the least recently used entry goes: later policy requests for it fall
    back to SPF alone, while what was recorded stays with the milter's own state."""
    sessions = Sessions(task.Clock(), max_sessions=2)
    first = sessions.register(conn(4001))
    record = first.begin_message("<alice@fail.test>")
    record.record(None, Verdict("DUNNO", DKIM_PENDING_RULE), Facts())
    sessions.register(conn(4002))
    sessions.register(conn(4003))
    assert len(sessions) == 2 and sessions.find(attrs(4001)) is None
    assert first.take_message() is record and record.needs_dkim


def test_a_second_registration_of_a_live_key_never_replaces_it():
    """A second CONNECT with a live key gets no session and the key matches nothing (SPF
    decides at RCPT) until the first connection closes; then it is free again."""
    sessions = Sessions(task.Clock())
    first = sessions.register(conn())
    first.begin_message("<alice@fail.test>")
    assert sessions.register(conn()) is None
    assert sessions.find(attrs()) is None and sessions.message_for(attrs()) is None
    assert sessions.register(conn()) is None  # a third try changes nothing
    assert sessions.find(attrs()) is None
    sessions.remove(first)
    again = sessions.register(conn())
    assert again is not None and sessions.find(attrs()) is again


def test_a_claim_on_the_bare_key_does_not_hide_the_full_one():
    """A registration without the server macros never shadows a live full-key session."""
    sessions = Sessions(task.Clock())
    real = sessions.register(conn())
    assert sessions.register(conn(daemon_addr=None, daemon_port=None)) is not None
    assert sessions.find(attrs()) is real


def test_message_life_cycle_mail_abort_end_of_message():
    """MAIL opens a record, ABORT and end of message close it; a closed session opens none."""
    sessions = Sessions(task.Clock())
    state = sessions.register(conn())
    first = state.begin_message("<alice@fail.test>")
    assert sessions.message_for(attrs()) is first and first.open
    state.end_message()
    assert not first.open and sessions.message_for(attrs()) is None
    second = state.begin_message("<alice@fail.test>")
    assert second is not first and second.verdicts == {}
    assert state.take_message() is second and not second.open
    assert state.take_message() is None
    state.skip_message()
    sessions.remove(state)
    assert state.begin_message("<a@b>") is None and sessions.message_for(attrs()) is None


def test_a_new_mail_from_without_abort_closes_the_previous_record():
    """A second MAIL FROM drops the first message's record, whatever it held."""
    sessions = Sessions(task.Clock())
    state = sessions.register(conn())
    first = state.begin_message("<alice@fail.test>")
    first.record(None, Verdict("DUNNO", "pass"), Facts())
    second = state.begin_message("<alice@fail.test>")
    assert not first.open and not second.concerned


def test_sender_spellings():
    """<A@x> and a@x are one sender; the null sender matches the empty policy sender."""
    assert same_sender("<Alice@Fail.test>", "alice@fail.test")
    assert same_sender("<>", "") and not same_sender("<a@x>", "b@x")
    assert not same_sender(None, "")
