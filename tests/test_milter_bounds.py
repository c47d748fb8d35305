"""Tests of what one milter connection holds and of authserv_id reloads (policyd_ipv6.milter
server and session together): bodies kept only when end of message reads them, and then
only up to what DKIM verifies; macros bounded; forgeries of the id in force at end of message
deleted after a reload. Same harness as test_milter_server: policy and milter sides of the
same SMTP sessions, a fake transport and clock, the DNS fake, dkimpy signatures."""

import struct

import pytest
from dkimkeys import DkimKey, message, require_openssl, sign
from test_milter_server import (
    ADDR,
    AUTHSERV,
    NO_AUTH,
    Harness,
    ask,
    connect,
    content,
    deletions,
    mail,
    packets,
    session,
)
from test_milter_session import cstr, macro, pkt

from policyd_ipv6.checks.dkim import MAX_BODY_BYTES
from policyd_ipv6.vocabulary import EndRule

NEW_ID = "mx2.contoso.com"
LINE = b"x" * 998 + b"\r\n"
CHUNK = 65535  # Postfix's MILTER_CHUNK_SIZE


@pytest.fixture(scope="module")
def key():
    require_openssl()
    return DkimKey.generate(1024)


def upload(milter, raw: bytes) -> tuple[int, list]:
    """RCPT, DATA, headers, the body in Postfix's chunks, end of message; returns the body
    bytes the session held just before end of message, and the end-of-message packets."""
    head, _, body = raw.partition(b"\r\n\r\n")
    start = content(head + b"\r\n\r\n")  # RCPT, DATA, the headers as Postfix sends them
    assert milter.send(start[:start.index(pkt(b"N")) + len(pkt(b"N"))]) == b""
    for start in range(0, len(body), CHUNK):
        assert milter.send(pkt(b"B", body[start:start + CHUNK])) == b""
    held = sum(map(len, milter.proto.session._message.body))
    return held, packets(milter.send(macro(b"E", i="4ABC") + pkt(b"E")))


def opened(h, port: int, sender: str, address: str = ADDR, policy: bool = True):
    """A milter connection past MAIL FROM, the policy asked for the recipient (or not)."""
    milter = h.milter()
    connect(milter, port, address)
    mail(milter, sender)
    if policy:
        ask(h.policy(), sender, port, address=address)
    return milter


# -- bodies --------------------------------------------------------------------------------

@pytest.mark.parametrize("address, policy", [("192.0.2.10", True), (ADDR, False)])
def test_a_body_end_of_message_never_reads_is_not_kept_and_the_verdict_is_unchanged(
        key, address, policy):
    """An IPv4 client, or an IPv6 message the policy recorded nothing on: no body byte is
    held, and end of message still deletes the forged header and accepts, as before."""
    h = Harness(key)
    forged = f"Authentication-Results: {AUTHSERV}; dkim=pass\r\n".encode()
    milter = opened(h, 4300, "alice@fail.test", address, policy)
    held, eom = upload(milter, message("alice@fail.test", extra=forged, body=LINE * 300))
    assert held == 0
    assert [c for c, _ in eom] == [b"m", b"a"] and deletions(eom) == [1]
    assert h.milter_factory.messages == {EndRule.NOT_CONCERNED: 1}


def test_a_record_not_concerned_at_the_body_is_closed_to_late_policy_answers(key):
    """The body began with nothing recorded: an answer Postfix no longer waits for cannot make
    the message need the body it did not keep (the policy then enforces SPF alone)."""
    h = Harness(key)
    milter = opened(h, 4301, "alice@fail.test", policy=False)
    assert milter.send(pkt(b"R", cstr(b"<bob@contoso.com>")) + pkt(b"T")
                       + pkt(b"L", cstr(b"From", b" <alice@fail.test>")) + pkt(b"N")
                       + pkt(b"B", LINE)) == b""
    assert milter.proto.session._message.body == []
    assert ask(h.policy(), "alice@fail.test", 4301) == NO_AUTH  # not DUNNO: SPF decides
    assert packets(milter.send(pkt(b"E"))) == [(b"a", b"")]


def test_a_body_needed_for_dkim_is_kept_and_decided_as_before(key):
    """A message the policy let through for DKIM keeps its body and passes on its signature."""
    h = Harness(key)
    raw = sign(message("alice@fail.test", body=LINE * 100), key, "fail.test", "lab")
    held, eom = upload(opened(h, 4302, "alice@fail.test"), raw)
    assert held == len(LINE) * 100
    assert [c for c, _ in eom] == [b"i", b"c"] and b"dkim=pass" in eom[0][1]


def test_a_body_over_what_dkim_verifies_is_cut_and_gets_the_same_verdicts(key):
    """Over dkim.MAX_BODY_BYTES only MAX_BODY_BYTES + 1 bytes are held (not the whole body),
    and the verdicts are those of the whole body: a signed SPF failure gets 4.7.26, an SPF
    pass gets our header with the signature "not verified: body over 4 MiB"."""
    h = Harness(key)
    body = LINE * (MAX_BODY_BYTES // len(LINE) + 300)  # 4.3 MiB
    held, eom = upload(opened(h, 4303, "alice@fail.test"),
                       sign(message("alice@fail.test", body=body), key, "fail.test", "lab"))
    assert held == MAX_BODY_BYTES + 1
    assert eom == [(b"y", NO_AUTH.encode() + b"\0")]
    held, eom = upload(opened(h, 4304, "alice@pass.test"),
                       sign(message("alice@pass.test", body=body), key, "fail.test", "lab"))
    assert held == MAX_BODY_BYTES + 1
    assert [c for c, _ in eom] == [b"i", b"c"]
    assert b'dkim=policy reason="not verified: body over 4 MiB" header.d=fail.test' in eom[0][1]


# -- macros --------------------------------------------------------------------------------

def test_a_macro_flood_closes_the_connection_without_a_reply(key):
    """Macros past the bound (here 40 KiB twice for one message) are a protocol error: the
    connection is closed without a reply and its registry entry removed."""
    h = Harness(key)
    milter = opened(h, 4305, "alice@fail.test")
    assert milter.send(macro(b"R", a="v" * 40000) + pkt(b"R", cstr(b"<bob@contoso.com>"))
                       + macro(b"T", b="v" * 40000) + pkt(b"T")) == b""
    assert milter.closed and len(h.sessions) == 0


# -- authserv_id reloads -------------------------------------------------------------------

def test_after_a_reload_forgeries_of_the_new_and_the_first_id_are_deleted(key):
    """A connection opened before a reload that changed authserv_id: forged headers claiming
    the new id (which our header now carries) and the connection's first id both go."""
    h = Harness(key)
    milter = h.milter()
    connect(milter, 4306)
    h.milter_factory.authserv_id = NEW_ID  # SIGHUP
    mail(milter, "alice@pass.test")
    ask(h.policy(), "alice@pass.test", 4306)
    extra = (f"Authentication-Results: {NEW_ID}; dkim=pass header.d=bank.example\r\n"
             f"Authentication-Results: {AUTHSERV}; dkim=pass\r\n"
             "Authentication-Results: other.example; dkim=pass\r\n").encode()
    eom = packets(milter.send(content(message("alice@pass.test", extra=extra))))
    assert [c for c, _ in eom] == [b"m", b"m", b"i", b"c"] and deletions(eom) == [2, 1]
    assert eom[2][1][4:].startswith(b"Authentication-Results\0 " + NEW_ID.encode() + b";")


def test_a_reload_between_a_messages_headers_and_its_end_tempfails_it(key):
    """authserv_id changed after the headers arrived: they were not all checked for the id
    our header would carry, so the forged list is incomplete: TEMPFAIL, never a forgery kept."""
    h = Harness(key)
    milter = opened(h, 4307, "alice@pass.test")
    raw = message("alice@pass.test",
                  extra=f"Authentication-Results: {NEW_ID}; dkim=pass\r\n".encode())
    data = content(raw)
    eoh = data.index(pkt(b"N")) + len(pkt(b"N"))
    assert milter.send(data[:eoh]) == b""
    h.milter_factory.authserv_id = NEW_ID
    assert packets(milter.send(data[eoh:])) == [(b"t", b"")]
    _, eom, _ = session(h, 4308, "alice@pass.test",
                        raw=message("alice@pass.test", extra=raw.split(b"\r\n")[5] + b"\r\n"))
    assert [c for c, _ in eom] == [b"m", b"i", b"c"]  # the next message: deleted, ours added
    assert struct.unpack(">I", eom[0][1][:4])[0] == 1
