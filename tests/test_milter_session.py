"""Tests of the sans-IO milter session (policyd_ipv6.milter_session) at the byte level.

The MTA side is written out by hand from Postfix's src/milter/milter8.c: what it sends
(OPTNEG, MACRO before each event, CONNECT, ...), what it expects back, and which
answers it skips once SMFIP_NR_* flags are agreed.
"""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd_ipv6.milter.codec import (
    AddHeader,
    ChangeHeader,
    InsertHeader,
    MilterProtocolError,
    MilterUsageError,
    ReplyCode,
)
from policyd_ipv6.milter.codec import Disposition as Verdict
from policyd_ipv6.milter.events import (
    Aborted,
    Closed,
    Connected,
    DataStarted,
    EndOfMessage,
    Helo,
    MailFrom,
    Negotiated,
    Recipient,
    UnknownCommand,
)
from policyd_ipv6.milter.session import MilterSession, Stage, State

CONTINUE = b"\x00\x00\x00\x01c"


def pkt(code: bytes, payload: bytes = b"") -> bytes:
    """One packet: 4-byte big-endian length counting the code byte, code, payload."""
    return struct.pack(">I", 1 + len(payload)) + code + payload


def cstr(*strings: bytes) -> bytes:
    return b"".join(s + b"\0" for s in strings)


def macro(stage: bytes, **values: str) -> bytes:
    """SMFIC_MACRO as milter8_event() sends it: stage code, then name/value strings."""
    names = [(n if len(n) == 1 else "{%s}" % n).encode() for n in values]
    return pkt(b"D", stage + cstr(*[x for name, value in zip(names, values.values())
                                    for x in (name, value.encode())]))


def optneg(version=6, actions=0x1FF, protocol=0x1FFFFF) -> bytes:
    """Postfix's opening packet; the defaults are milter8_connect() with protocol 6."""
    return pkt(b"O", struct.pack(">III", version, actions, protocol))


def connect6(host=b"mx.example.net", addr=b"2001:db8::25", port=4321) -> bytes:
    return pkt(b"C", host + b"\x00" + b"6" + struct.pack(">H", port) + addr + b"\0")


def bit(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


# Our OPTNEG answer with the default verdict stages (MAIL and EOM), built by hand:
# version 6; actions ADDHDRS (bit 0) | CHGHDRS (4) | SETSYMLIST (8); protocol:
# NR_HDR (7), NOUNKNOWN (8), NR_CONN (12), NR_HELO (13), NR_RCPT (15),
# NR_DATA (16), NR_UNKN (17), NR_EOH (18), NR_BODY (19), HDR_LEADSPC (20); then each
# SETSYMLIST list as a stage number (SMFIM_CONNECT 0, ENVFROM 2, ENVRCPT 3, DATA 4, EOH 6,
# EOM 5) and a string.
OPTNEG_ANSWER = pkt(b"O", struct.pack(">III", 6, bit(0, 4, 8),
                                      bit(7, 8, 12, 13, 15, 16, 17, 18, 19, 20))
                    + b"\0\0\0\0" + b"j {daemon_name} {daemon_addr} {daemon_port} "
                    b"{client_addr} {client_port} {client_ptr} {client_resolve} _\0"
                    + b"\0\0\0\x02" + b"i {auth_type} {auth_authen} {mail_addr}\0"
                    + b"\0\0\0\x03" + b"i {rcpt_addr}\0"
                    + b"\0\0\0\x04" + b"i\0" + b"\0\0\0\x06" + b"i\0" + b"\0\0\0\x05" + b"i\0")


# The stages the milter decided at before it stayed on every connection: the session still
# supports them, and the golden transcript exercises them.
DECIDING = (Stage.CONNECT, Stage.MAIL, Stage.EOM)

# The same answer when CONNECT is decided too: no NR_CONN (12).
OPTNEG_ANSWER_DECIDING = OPTNEG_ANSWER[:13] + struct.pack(
    ">I", bit(7, 8, 13, 15, 16, 17, 18, 19, 20)) + OPTNEG_ANSWER[17:]


def connected_session(**kwargs) -> MilterSession:
    """A session past OPTNEG and CONNECT (answered "continue")."""
    session = MilterSession(**kwargs)
    session.receive(optneg())
    events, _ = session.receive(connect6())
    if events[-1].needs_verdict:
        session.send_verdict(Verdict.CONTINUE)
    return session


# --- negotiation ---

def test_negotiation_answers_with_the_exact_bytes():
    """OPTNEG from Postfix gets version 6, our actions and flags, and the macro lists."""
    events, reply = MilterSession().receive(optneg())
    assert reply == OPTNEG_ANSWER
    assert events == [Negotiated(6, bit(0, 4, 8),
                                 bit(7, 8, 12, 13, 15, 16, 17, 18, 19, 20))]


def test_postfix_would_accept_the_negotiation_answer():
    """The answer passes milter8_connect()'s checks and its macro lists parse as Postfix
    parses them (uint32 stage 0..6, then a NUL-terminated string, until the data ends)."""
    _, reply = MilterSession().receive(optneg())
    length, code = struct.unpack(">Ic", reply[:5])
    assert length == len(reply) - 4 and code == b"O"
    version, actions, protocol = struct.unpack(">III", reply[5:17])
    assert version <= 6 and actions & 0x1FF == actions and protocol & 0x1FFFFF == protocol
    data, lists = reply[17:], {}
    while data:
        (stage,), data = struct.unpack(">I", data[:4]), data[4:]
        name_list, _, data = data.partition(b"\0")
        assert 0 <= stage <= 6 and stage not in lists
        lists[stage] = name_list.decode().split()
    assert lists[0] == ["j", "{daemon_name}", "{daemon_addr}", "{daemon_port}", "{client_addr}",
                        "{client_port}", "{client_ptr}", "{client_resolve}", "_"]
    assert lists[2] == ["i", "{auth_type}", "{auth_authen}", "{mail_addr}"]
    assert lists[3] == ["i", "{rcpt_addr}"] and lists[4] == lists[5] == lists[6] == ["i"]


def test_verdict_stages_decide_which_no_reply_flags_are_asked():
    """Deciding at every stage drops the NR_CONN..NR_DATA flags; deciding only at EOM asks all."""
    every = MilterSession(verdict_stages=list(Stage)).receive(optneg()).events[0].protocol
    only_eom = MilterSession(verdict_stages=()).receive(optneg()).events[0].protocol
    assert every == bit(7, 8, 17, 18, 19, 20)
    assert only_eom == bit(7, 8, 12, 13, 14, 15, 16, 17, 18, 19, 20)


def test_flags_the_mta_does_not_offer_are_not_asked_and_continue_is_sent_instead():
    """With an MTA that offers no NR_* flags the session answers "continue" itself."""
    session = MilterSession(verdict_stages=())
    events, _ = session.receive(optneg(protocol=bit(8, 20)))
    assert events[0].protocol == bit(8, 20)
    _, reply = session.receive(connect6())
    assert reply == CONTINUE
    _, reply = session.receive(pkt(b"H", b"x\0") + pkt(b"M", b"<>\0") + pkt(b"R", b"<a@b>\0")
                               + pkt(b"T") + pkt(b"L", b"A\0 b\0") + pkt(b"N")
                               + pkt(b"B", b"x\r\n"))
    assert reply == CONTINUE * 7


@pytest.mark.parametrize("packet", [
    optneg(version=4, protocol=0x37F),  # milter_protocol = 4: no SETSYMLIST, no LEADSPC
    optneg(protocol=0x1FFFFF & ~bit(20)),  # no HDR_LEADSPC: header bytes would be lost
    optneg(actions=0x1FF & ~bit(4)),  # may not change headers
    optneg(actions=0x1FF & ~bit(8)),  # may not send macro lists
])
def test_negotiation_without_what_we_need_is_a_protocol_error(packet):
    """An MTA lacking protocol 6, HDR_LEADSPC, CHGHDRS or SETSYMLIST is refused."""
    with pytest.raises(MilterProtocolError):
        MilterSession().receive(packet)


@pytest.mark.parametrize("stream", [
    connect6(),  # before OPTNEG
    optneg() + optneg(),
    optneg() + pkt(b"H", b"x\0"),  # HELO before CONNECT
    optneg() + connect6() + connect6(),
])
def test_commands_out_of_order_are_protocol_errors(stream):
    """OPTNEG must come first and once; CONNECT must precede the rest, once."""
    with pytest.raises(MilterProtocolError):
        MilterSession(verdict_stages=()).receive(stream)


def test_protocol_error_is_sticky():
    """After a protocol error the session is in State.ERROR and refuses even valid bytes."""
    session = connected_session(verdict_stages=())
    with pytest.raises(MilterProtocolError):
        session.receive(connect6())
    assert session.state is State.ERROR
    with pytest.raises(MilterProtocolError):
        session.receive(pkt(b"Q"))


def test_bad_verdict_stages_are_a_usage_error():
    """verdict_stages must hold Stage members."""
    with pytest.raises(MilterUsageError):
        MilterSession(verdict_stages=["connect"])


# --- verdicts ---

def test_connect_waits_for_a_verdict_and_bytes_meanwhile_are_an_error():
    """Connected needs a verdict; Postfix sends nothing while waiting, so bytes are an error."""
    session = MilterSession(verdict_stages=DECIDING)
    session.receive(optneg())
    events, reply = session.receive(macro(b"C", j="mx.contoso.com", client_addr="IPv6:2001:db8::25",
                                          client_port="4321") + connect6())
    [connected] = events
    assert isinstance(connected, Connected) and connected.needs_verdict and reply == b""
    assert connected.connection.address == "2001:db8::25" and connected.connection.port == 4321
    assert connected.connection.family == "6" and connected.connection.hostname == "mx.example.net"
    assert connected.connection.macros == {"j": "mx.contoso.com",
                                           "client_addr": "IPv6:2001:db8::25",
                                           "client_port": "4321"}
    assert session.pending is Stage.CONNECT
    with pytest.raises(MilterProtocolError, match="pending"):
        session.receive(pkt(b"H", b"x\0"))


def test_accept_at_connect_closes_the_session_but_quit_and_quit_nc_are_normal():
    """After ACCEPT at CONNECT the conversation is over: QUIT (as libmilter MTAs and
    miltertest send it) is a normal Closed, QUIT_NC starts a new session, anything else is
    an error."""
    session = MilterSession(verdict_stages=DECIDING)
    session.receive(optneg())
    session.receive(connect6())
    assert session.send_verdict(Verdict.ACCEPT) == b"\x00\x00\x00\x01a"
    assert session.state is State.CLOSED
    with pytest.raises(MilterProtocolError):
        session.receive(pkt(b"H", b"x\0"))
    for code, new in ((b"Q", False), (b"K", True)):
        session = MilterSession(verdict_stages=DECIDING)
        session.receive(optneg())
        session.receive(connect6())
        session.send_verdict(Verdict.ACCEPT)
        events, reply = session.receive(pkt(code))
        assert events == [Closed(new_connection=new)] and reply == b""
    events, _ = session.receive(connect6(addr=b"2001:db8::26"))
    assert events[0].connection.address == "2001:db8::26" and session.state is State.CONNECTED


def test_sendmail_ipv6_address_form_in_connect_is_parsed():
    """Sendmail writes "IPv6:2001:db8::1" in SMFIC_CONNECT: the address comes out bare."""
    session = MilterSession()
    session.receive(optneg())
    events, _ = session.receive(connect6(addr=b"IPv6:2001:db8::1"))
    assert events[0].connection.address == "2001:db8::1"
    events, _ = MilterSession().receive(optneg() + connect6(addr=b"ipv6:2001:DB8::2"))
    assert events[1].connection.address == "2001:DB8::2"


def test_by_default_only_mail_and_end_of_message_are_answered():
    """The milter stays on every connection cheaply: CONNECT, HELO, RCPT, DATA and the
    content get no reply (SMFIP_NR_*); MAIL (for ordering with the policy request) and end
    of message wait for a verdict."""
    session = MilterSession()
    session.receive(optneg())
    events, reply = session.receive(
        connect6() + pkt(b"H", b"mx\0") + pkt(b"M", b"<a@b>\0"))
    assert reply == b"" and [e.needs_verdict for e in events] == [False, False, True]
    assert session.pending is Stage.MAIL and session.send_verdict(Verdict.CONTINUE) == CONTINUE
    events, reply = session.receive(
        pkt(b"R", b"<c@d>\0") + pkt(b"T") + pkt(b"L", b"S\0 x\0") + pkt(b"N")
        + pkt(b"B", b"x\r\n") + pkt(b"E"))
    assert reply == b"" and [e.needs_verdict for e in events] == [False, False, True]
    assert session.pending is Stage.EOM


def test_reject_at_mail_keeps_the_connection():
    """A verdict at MAIL concerns the message only; the next MAIL is handled."""
    session = connected_session(verdict_stages=DECIDING)
    events, _ = session.receive(pkt(b"M", b"<spam@example.net>\0"))
    assert isinstance(events[0], MailFrom) and events[0].needs_verdict
    assert session.send_verdict(ReplyCode("550 5.7.1 no")) == pkt(b"y", b"550 5.7.1 no\0")
    events, _ = session.receive(pkt(b"A") + pkt(b"M", b"<ok@example.net>\0"))
    assert [type(e) for e in events] == [Aborted, MailFrom]
    assert session.state is State.CONNECTED


def test_send_verdict_without_a_pending_event_is_a_usage_error():
    """send_verdict and send_progress need an event that waits for a verdict."""
    session = connected_session()
    with pytest.raises(MilterUsageError):
        session.send_verdict(Verdict.CONTINUE)
    with pytest.raises(MilterUsageError):
        session.send_progress()


def test_header_edits_only_at_end_of_message():
    """Header edits with a MAIL verdict are refused (Postfix accepts them only at EOM)."""
    session = connected_session(verdict_stages=DECIDING)
    session.receive(pkt(b"M", b"<a@example.net>\0"))
    with pytest.raises(MilterUsageError):
        session.send_verdict(Verdict.CONTINUE, [ChangeHeader(1, "X", "")])
    with pytest.raises(MilterUsageError):
        session.send_verdict(InsertHeader(0, "X", " y"))
    assert session.send_verdict(Verdict.CONTINUE) == CONTINUE


def test_header_changes_are_sent_before_insertions():
    """ChangeHeader edits go out first (given order kept), so that an inserted header cannot
    shift the indexes Postfix counts; additions and insertions follow in their order."""
    session = connected_session(verdict_stages=())
    session.receive(pkt(b"M", b"<a@b>\0") + pkt(b"E"))
    edits = [InsertHeader(0, "A", " 1"), ChangeHeader(2, "X", ""), AddHeader("B", " 2"),
             ChangeHeader(1, "X", "")]
    assert session.send_verdict(Verdict.CONTINUE, edits) == (
        pkt(b"m", b"\0\0\0\x02X\0\0") + pkt(b"m", b"\0\0\0\x01X\0\0")
        + pkt(b"i", b"\0\0\0\0A\0 1\0") + pkt(b"h", b"B\0 2\0") + CONTINUE)


def test_verdict_in_place_of_a_header_edit_is_a_usage_error():
    """Only header edits may be passed as header_edits."""
    session = connected_session(verdict_stages=())
    session.receive(pkt(b"M", b"<a@b>\0") + pkt(b"E"))
    with pytest.raises(MilterUsageError):
        session.send_verdict(Verdict.CONTINUE, [Verdict.ACCEPT])


def test_progress_while_end_of_message_waits():
    """SMFIR_PROGRESS may be sent while the EOM verdict is pending, then the verdict."""
    session = connected_session(verdict_stages=())
    session.receive(pkt(b"M", b"<a@b>\0") + pkt(b"E"))
    assert session.send_progress() == b"\x00\x00\x00\x01p"
    assert session.send_verdict(Verdict.TEMPFAIL) == b"\x00\x00\x00\x01t"


# --- message collection ---

def test_abort_resets_the_message_and_keeps_the_connection():
    """ABORT drops envelope, headers and body; HELO and CONNECT data survive."""
    session = connected_session(verdict_stages=())
    session.receive(pkt(b"H", b"mx.example.net\0") + pkt(b"M", b"<one@example.net>\0")
                    + pkt(b"R", b"<a@contoso.com>\0") + pkt(b"L", b"Subject\0 one\0")
                    + pkt(b"B", b"first\r\n") + pkt(b"A"))
    events, _ = session.receive(pkt(b"M", b"<two@example.net>\0") + pkt(b"R", b"<b@contoso.com>\0")
                                + pkt(b"L", b"Subject\0 two\0") + pkt(b"B", b"second\r\n")
                                + pkt(b"E"))
    end = events[-1]
    assert end.message.sender == "<two@example.net>"
    assert end.message.recipients == ("<b@contoso.com>",)
    assert end.message.raw() == b"Subject: two\r\n\r\nsecond\r\n"
    assert end.connection.helo == "mx.example.net" and end.connection.address == "2001:db8::25"


def test_headers_keep_exact_bytes_for_dkim():
    """With HDR_LEADSPC the value keeps its leading whitespace; folded lines get CRLF back."""
    session = connected_session(verdict_stages=())
    events, _ = session.receive(
        pkt(b"M", b"<a@b>\0") + pkt(b"L", b"DKIM-Signature\0 v=1; d=example.net;\n\tb=abc\0")
        + pkt(b"L", b"Subject\0\ttabbed  \0") + pkt(b"L", b"X-Empty\0\0") + pkt(b"N")
        + pkt(b"B", b"body\r\n") + pkt(b"E", b""))
    message = events[-1].message
    assert message.raw() == (b"DKIM-Signature: v=1; d=example.net;\r\n\tb=abc\r\n"
                             b"Subject:\ttabbed  \r\nX-Empty:\r\n\r\nbody\r\n")


def test_header_index_counts_same_name_case_insensitively_and_deletes_highest_first():
    """Header.index counts headers of one name (any case) from 1; deletions go highest first."""
    session = connected_session(verdict_stages=())
    events, _ = session.receive(
        pkt(b"M", b"<a@b>\0") + pkt(b"L", b"Authentication-Results\0 mx.contoso.com; spf=pass\0")
        + pkt(b"L", b"Received\0 from x\0")
        + pkt(b"L", b"authentication-results\0 other.example; dkim=pass\0")
        + pkt(b"L", b"AUTHENTICATION-RESULTS\0 mx.contoso.com; dkim=pass\0") + pkt(b"E"))
    message = events[-1].message
    assert [(h.name, h.index) for h in message.headers] == [
        (b"Authentication-Results", 1), (b"Received", 1), (b"authentication-results", 2),
        (b"AUTHENTICATION-RESULTS", 3)]
    forged = message.header_deletions(lambda h: h.name.lower() == b"authentication-results"
                                      and h.value.lstrip().startswith(b"mx.contoso.com;"))
    assert forged == (ChangeHeader(3, "AUTHENTICATION-RESULTS", ""),
                      ChangeHeader(1, "Authentication-Results", ""))
    assert session.send_verdict(Verdict.ACCEPT, forged) == (
        pkt(b"m", b"\0\0\0\x03AUTHENTICATION-RESULTS\0\0")
        + pkt(b"m", b"\0\0\0\x01Authentication-Results\0\0") + b"\x00\x00\x00\x01a")


def test_too_many_headers_mark_the_message_too_large_but_it_is_still_handled():
    """Past max_headers collection stops, too_large is set, and EOM still needs a verdict."""
    session = connected_session(verdict_stages=(), max_headers=3)
    headers = b"".join(pkt(b"L", b"X-%d\0 v\0" % n) for n in range(5))
    events, _ = session.receive(pkt(b"M", b"<a@b>\0") + headers + pkt(b"B", b"x\r\n") + pkt(b"E"))
    message = events[-1].message
    assert message.too_large and len(message.headers) == 3 and message.body == b""
    assert session.send_verdict(Verdict.ACCEPT) == b"\x00\x00\x00\x01a"
    events, _ = session.receive(pkt(b"A") + pkt(b"M", b"<a@b>\0") + pkt(b"L", b"X\0 v\0")
                                + pkt(b"E"))
    assert not events[-1].message.too_large  # the bound is per message


def test_marked_headers_are_recorded_past_the_header_bound_by_index_only():
    """Over max_headers, headers that mark_header matches are still listed (name, index), so
    forged ones can be deleted; past max_marked the list is None (incomplete)."""
    def ar(name, value):
        return name.lower() == b"authentication-results" and b"ours" in value

    session = connected_session(verdict_stages=(), max_headers=2, mark_header=ar, max_marked=3)
    headers = [b"Authentication-Results\0 ours; x\0", b"X\0 v\0", b"X\0 v\0",
               b"authentication-results\0 theirs; x\0", b"AUTHENTICATION-RESULTS\0 ours; y\0"]
    events, _ = session.receive(pkt(b"M", b"<a@b>\0") + b"".join(pkt(b"L", h) for h in headers)
                                + pkt(b"E"))
    message = events[-1].message
    assert message.too_large and len(message.headers) == 2
    assert message.marked == ((b"Authentication-Results", 1), (b"AUTHENTICATION-RESULTS", 3))
    assert message.marked_deletions() == (ChangeHeader(3, "AUTHENTICATION-RESULTS", ""),
                                          ChangeHeader(1, "Authentication-Results", ""))
    session.send_verdict(Verdict.ACCEPT)
    events, _ = session.receive(pkt(b"M", b"<a@b>\0") + pkt(b"L", headers[0]) * 4 + pkt(b"E"))
    assert events[-1].message.marked is None and events[-1].message.marked_deletions() is None


def test_mail_from_address_in_postfixs_internal_form():
    """MailFrom.address unquotes the local part and drops brackets and a source route, as
    Postfix does for the policy request's sender."""
    session = connected_session(verdict_stages=())
    for raw, internal in [('<"john smith"@example.net>', "john smith@example.net"),
                          ('<"a\\"b\\\\c"@example.net>', 'a"b\\c@example.net'),
                          ("<@relay.example:alice@example.net>", "alice@example.net"),
                          ("<Alice@Example.NET>", "Alice@Example.NET"), ("<>", ""),
                          ('<"x@y"@example.net>', "x@y@example.net")]:
        events, _ = session.receive(pkt(b"M", raw.encode() + b"\0"))
        assert (events[0].sender, events[0].address) == (raw, internal)


def test_too_large_body_is_dropped():
    """Past max_message_bytes the body collected so far is dropped and too_large is set."""
    session = connected_session(verdict_stages=(), max_message_bytes=100)
    events, _ = session.receive(pkt(b"M", b"<a@b>\0") + pkt(b"L", b"S\0 x\0")
                                + pkt(b"B", b"a" * 60) + pkt(b"B", b"b" * 60) + pkt(b"E"))
    message = events[-1].message
    assert message.too_large and message.body == b"" and len(message.headers) == 1


def test_a_body_not_wanted_is_counted_but_not_kept_and_wants_body_is_asked_once():
    """wants_body() false at the first body byte: no body byte is kept, body_size counts
    them all, the headers are still collected; it is asked once per message."""
    asked = []
    session = connected_session(verdict_stages=(), wants_body=lambda: asked.append(1) or False)
    events, _ = session.receive(pkt(b"M", b"<a@b>\0") + pkt(b"L", b"S\0 x\0") + pkt(b"N")
                                + pkt(b"B", b"a" * 60) + pkt(b"B", b"b" * 60) + pkt(b"E", b"c"))
    message = events[-1].message
    assert (message.body, message.body_size, len(message.headers)) == (b"", 121, 1)
    assert session._message.body == [] and asked == [1] and not message.too_large


def test_a_body_over_max_body_kept_keeps_one_byte_more_than_the_bound():
    """Past max_body_kept only the first max_body_kept + 1 bytes are kept (showing that the
    body is longer), body_size is the whole; a body within the bound is kept whole."""
    session = connected_session(verdict_stages=(), max_body_kept=100, wants_body=lambda: True)
    events, _ = session.receive(pkt(b"M", b"<a@b>\0") + pkt(b"B", b"a" * 60)
                                + pkt(b"B", b"b" * 60) + pkt(b"B", b"c" * 60) + pkt(b"E"))
    message = events[-1].message
    assert message.body == b"a" * 60 + b"b" * 41 and message.body_size == 180
    assert session._message.body == [message.body]  # one copy held, not chunks and a join
    session.send_verdict(Verdict.CONTINUE)
    events, _ = session.receive(pkt(b"M", b"<a@b>\0") + pkt(b"B", b"a" * 100) + pkt(b"E"))
    assert events[-1].message.body == b"a" * 100 and not events[-1].message.too_large


@pytest.mark.parametrize("flood", [
    [macro(b"M", **{f"m{n}": "v" for n in range(501)})],  # too many in one packet
    [macro(b"M", big="v" * 70000)],  # too long in one packet
    [macro(b"M", a="v" * 40000), pkt(b"M", b"<a@b>\0"),  # the message's merged macros
     macro(b"R", b="v" * 40000), pkt(b"R", b"<r@c>\0")],
    [macro(b"H", a="v" * 40000), pkt(b"H", b"x\0"),  # the connection's merged macros
     macro(b"H", b="v" * 40000), pkt(b"H", b"y\0")],
])
def test_macros_over_the_bound_are_a_protocol_error(flood):
    """More than 500 macros or 64 KiB of them in a packet, a connection or a message is a
    protocol error (the adapter closes without a reply): macros never grow memory unbounded."""
    session = connected_session(verdict_stages=())
    with pytest.raises(MilterProtocolError, match="macros"):
        for packet in flood:
            session.receive(packet)
    assert session.state is State.ERROR


def test_macros_as_postfix_sends_them_are_kept():
    """Postfix's own macros, each stage's packet, merge into the message as before."""
    session = connected_session(verdict_stages=())
    events, _ = session.receive(macro(b"M", i="", mail_addr="a@b", auth_type="")
                                + pkt(b"M", b"<a@b>\0") + macro(b"R", rcpt_addr="r@c")
                                + pkt(b"R", b"<r@c>\0") + macro(b"E", i="4ABC") + pkt(b"E"))
    assert events[-1].message.macros == {"i": "4ABC", "mail_addr": "a@b", "auth_type": "",
                                         "rcpt_addr": "r@c"}


def test_recipients_beyond_the_bound_are_counted_not_stored():
    """Only max_recipients recipients are stored; recipient_count counts them all."""
    session = connected_session(verdict_stages=(), max_recipients=2)
    rcpts = b"".join(pkt(b"R", b"<r%d@contoso.com>\0" % n) for n in range(4))
    events, _ = session.receive(pkt(b"M", b"<a@b>\0") + rcpts + pkt(b"E"))
    message = events[-1].message
    assert message.recipients == ("<r0@contoso.com>", "<r1@contoso.com>")
    assert message.recipient_count == 4


def test_oversized_packet_is_a_protocol_error():
    """A packet longer than max_packet_length is refused."""
    session = connected_session(verdict_stages=(), max_packet_length=1000)
    with pytest.raises(MilterProtocolError):
        session.receive(pkt(b"L", b"X\0" + b"v" * 1000 + b"\0"))


def test_unknown_command_is_reported_and_answered_only_without_nr_unkn():
    """UNKNOWN (sent only if NOUNKNOWN was refused) is an event; "continue" unless NR_UNKN."""
    session = MilterSession(verdict_stages=())
    session.receive(optneg(protocol=bit(20)))
    session.receive(connect6())
    events, reply = session.receive(macro(b"U") + pkt(b"U", b"XFOO\0"))
    assert events == [UnknownCommand("XFOO")] and reply == CONTINUE
    session = connected_session(verdict_stages=())
    assert session.receive(pkt(b"U", b"XFOO\0")).reply == b""


def test_quit_closes_and_quit_nc_starts_a_new_connection():
    """QUIT ends the session; QUIT_NC resets it so that a new CONNECT is accepted."""
    session = connected_session(verdict_stages=())
    events, _ = session.receive(pkt(b"K") + connect6(addr=b"2001:db8::26", port=25))
    assert events[0] == Closed(new_connection=True)
    assert events[1].connection.address == "2001:db8::26"
    events, _ = session.receive(pkt(b"Q"))
    assert events == [Closed(new_connection=False)] and session.state is State.CLOSED
    with pytest.raises(MilterProtocolError):
        session.receive(pkt(b"A"))


def test_non_utf8_envelope_is_decoded_losslessly():
    """8-bit bytes in the envelope survive as surrogates (round-trip to the same bytes)."""
    session = connected_session(verdict_stages=())
    events, _ = session.receive(pkt(b"M", b"<j\xf6rg@example.net>\0"))
    assert events[0].sender.encode("utf-8", "surrogateescape") == b"<j\xf6rg@example.net>"


# --- a whole Postfix conversation ---

ORIGINAL = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=sel;\r\n"
            b"\tbh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n\tb=AAAA\r\n"
            b"From: Alice <alice@example.net>\r\nTo: bob@contoso.com\r\n"
            b"Subject:  two spaces, 100% real\r\n"
            b"Authentication-Results: mx.contoso.com; spf=pass (forged)\r\n"
            b"\r\nHello Bob,\r\n\r\n.. a dot line\r\n")
AR_VALUE = " mx.contoso.com; iprev=pass; spf=fail; dkim=pass header.d=example.net"
REFUSAL = ("450 4.7.26 Service unavailable, message sent over IPv6 [2001:db8::25] must pass "
           "either SPF or DKIM validation.")


def header_packets(message: bytes) -> bytes:
    """Headers as milter8_header() sends them: MACRO L, then name and value (LF-folded)."""
    head = message.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b"\n\t")
    return b"".join(macro(b"L", i="4XyZ1") + pkt(b"L", cstr(*line.split(b":", 1)))
                    for line in head.split(b"\r\n"))


# (bytes Postfix sends before it waits, expected events, expected immediate reply,
#  our verdict for the last event or None, expected verdict bytes)
TRANSCRIPT = [
    (optneg(), [Negotiated], OPTNEG_ANSWER_DECIDING, None, b""),
    (macro(b"C", j="mx.contoso.com", daemon_name="smtpd", daemon_addr="2001:db8::1",
           daemon_port="25", client_addr="IPv6:2001:db8::25", client_port="4321",
           client_ptr="mx.example.net", client_resolve="OK", _="mx.example.net [2001:db8::25]")
     + connect6(), [Connected], b"", (Verdict.CONTINUE, ()), CONTINUE),
    (macro(b"H") + pkt(b"H", b"mx.example.net\0")
     + macro(b"M", i="", mail_addr="alice@example.net")
     + pkt(b"M", b"<alice@example.net>\0SIZE=321\0"),
     [Helo, MailFrom], b"", (Verdict.CONTINUE, ()), CONTINUE),
    (macro(b"R", i="", rcpt_addr="bob@contoso.com") + pkt(b"R", b"<bob@contoso.com>\0")
     + macro(b"R", i="4XyZ1", rcpt_addr="carol@contoso.com") + pkt(b"R", b"<carol@contoso.com>\0")
     + macro(b"T", i="4XyZ1") + pkt(b"T") + header_packets(ORIGINAL)
     + macro(b"N", i="4XyZ1") + pkt(b"N")
     + macro(b"B", i="4XyZ1") + pkt(b"B", ORIGINAL.split(b"\r\n\r\n", 1)[1])
     + macro(b"E", i="4XyZ1") + pkt(b"E"),
     [Recipient, Recipient, DataStarted, EndOfMessage], b"",
     (Verdict.ACCEPT, (InsertHeader(0, "Authentication-Results", AR_VALUE),
                       ChangeHeader(1, "Authentication-Results", ""))),
     # The deletion goes first: Postfix 3.7 counts an inserted header too (observed).
     pkt(b"m", b"\0\0\0\x01Authentication-Results\0\0")
     + pkt(b"i", b"\0\0\0\0Authentication-Results\0" + AR_VALUE.encode() + b"\0")
     + b"\x00\x00\x00\x01a"),
    (pkt(b"A") + macro(b"M", i="", mail_addr="mallory@example.org")
     + pkt(b"M", b"<mallory@example.org>\0"), [Aborted, MailFrom], b"",
     (Verdict.CONTINUE, ()), CONTINUE),
    (macro(b"R", i="", rcpt_addr="bob@contoso.com") + pkt(b"R", b"<bob@contoso.com>\0")
     + macro(b"T", i="5AbC2") + pkt(b"T") + macro(b"L", i="5AbC2") + pkt(b"L", b"Subject\0 hi\0")
     + macro(b"N", i="5AbC2") + pkt(b"N") + macro(b"B", i="5AbC2") + pkt(b"B", b"unsigned\r\n")
     + macro(b"E", i="5AbC2") + pkt(b"E"),
     [Recipient, DataStarted, EndOfMessage], b"", (ReplyCode(REFUSAL), ()),
     pkt(b"y", REFUSAL.encode() + b"\0")),
    (pkt(b"A") + pkt(b"Q"), [Aborted, Closed], b"", None, b""),
]


def run_transcript(session, turns, split=lambda data: [data]):
    """Feed each turn (in the pieces split() makes), answer verdicts; return all events."""
    all_events = []
    for sent, kinds, immediate, verdict, verdict_bytes in turns:
        events, reply = [], b""
        for piece in split(sent):
            received = session.receive(piece)
            events += received.events
            reply += received.reply
        assert [type(e) for e in events] == kinds
        assert reply == immediate
        if verdict is not None:
            assert events[-1].needs_verdict
            assert session.send_verdict(verdict[0], verdict[1]) == verdict_bytes
        else:
            assert not any(e.needs_verdict for e in events)
        all_events += events
    return all_events


def test_golden_transcript_of_a_postfix_conversation():
    """A whole Postfix conversation (two messages) gives the expected events and bytes."""
    events = run_transcript(MilterSession(verdict_stages=DECIDING), TRANSCRIPT)
    first = next(e for e in events if isinstance(e, EndOfMessage))
    assert first.message.raw() == ORIGINAL
    assert first.message.sender == "<alice@example.net>"
    assert first.message.esmtp_args == ("SIZE=321",)
    assert first.message.recipients == ("<bob@contoso.com>", "<carol@contoso.com>")
    assert first.message.macros["i"] == "4XyZ1"
    assert first.message.macros["mail_addr"] == "alice@example.net"
    assert first.connection.macros["client_resolve"] == "OK"
    assert first.connection.macros["daemon_port"] == "25"
    assert first.connection.macros["_"] == "mx.example.net [2001:db8::25]"
    assert first.connection.helo == "mx.example.net"
    second = [e for e in events if isinstance(e, EndOfMessage)][1]
    assert second.message.raw() == b"Subject: hi\r\n\r\nunsigned\r\n"
    assert second.message.macros["i"] == "5AbC2"


@settings(max_examples=200, deadline=None)
@given(random=st.randoms(use_true_random=False))
def test_golden_transcript_split_anywhere_gives_the_same_result(random):
    """Cutting every turn of the transcript into random pieces changes nothing."""
    def split(data):
        cuts = sorted(random.sample(range(1, len(data)), min(len(data) - 1, random.randint(0, 8))))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    assert run_transcript(MilterSession(verdict_stages=DECIDING), TRANSCRIPT, split) == \
        run_transcript(MilterSession(verdict_stages=DECIDING), TRANSCRIPT)


def test_golden_transcript_byte_at_a_time():
    """Feeding the transcript one byte at a time gives the same events and bytes."""
    run_transcript(MilterSession(verdict_stages=DECIDING), TRANSCRIPT,
                   lambda data: [bytes([b]) for b in data])


# --- hostile input ---

command_packets = st.builds(
    lambda code, payload: pkt(code, payload),
    st.sampled_from([bytes([c]) for c in b"ABCDEHKLMNOQRTU"]),
    st.sampled_from([b"", b"\0", b"x\0", b"a\0b\0", b"<a@b>\0SIZE=1\0", b"Cj\0v\0", b"L",
                     b"h\x006\x00\x19::1\0", b"h\x00U", b"h\x00L\0\0/s\0"])
    | st.binary(max_size=30))


def _outcome(data: bytes, cuts: list[int]):
    session, events, reply = MilterSession(verdict_stages=()), [], b""
    try:
        for start, end in zip([0, *cuts], [*cuts, len(data)]):
            received = session.receive(data[start:end])
            events += received.events
            reply += received.reply
    except MilterProtocolError:
        return "error"
    return events, reply


@settings(max_examples=500, deadline=None)
@given(packets=st.lists(command_packets, max_size=12), tail=st.binary(max_size=8),
       random=st.randoms(use_true_random=False))
def test_any_bytes_give_events_or_the_codec_error_whatever_the_chunking(packets, tail, random):
    """After OPTNEG, any packets (and trailing garbage) give events or MilterProtocolError,
    never another exception, and the same outcome however the bytes are chunked."""
    data = optneg() + b"".join(packets) + tail
    cuts = sorted(random.sample(range(len(data) + 1), min(len(data) + 1, random.randint(0, 6))))
    assert _outcome(data, cuts) == _outcome(data, [])
