"""Byte-level tests of the sans-IO milter codec (policyd_ipv6.milter_codec).

Expected bytes are written out by hand from the protocol as Postfix implements it
(src/milter/milter8.c): a 4-byte big-endian length that counts the command byte, the
command byte, then the payload; strings end in NUL; numbers are big-endian.
"""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd_ipv6.milter.codec import (
    Action,
    AddHeader,
    BodyCommand,
    ChangeHeader,
    ConnectCommand,
    EndOfMessageCommand,
    HeaderCommand,
    HeloCommand,
    InsertHeader,
    MacroCommand,
    MacroStage,
    MailCommand,
    MilterProtocolError,
    MilterUsageError,
    OptNegCommand,
    PacketReader,
    Protocol,
    RcptCommand,
    ReplyCode,
    SimpleCommand,
    UnknownCommand,
    encode_optneg,
    encode_packet,
    encode_response,
)
from policyd_ipv6.milter.codec import Disposition as Verdict


def pkt(code: bytes, payload: bytes = b"") -> bytes:
    """One MTA packet, framed by hand: length (command byte included), code, payload."""
    return struct.pack(">I", 1 + len(payload)) + code + payload


def decode_all(data: bytes, **kwargs) -> list:
    reader = PacketReader(**kwargs)
    reader.feed(data)
    commands = []
    while (command := reader.next_command()) is not None:
        commands.append(command)
    return commands


# What Postfix 3.x sends first with milter_protocol = 6 (milter8_connect): version 6, all
# nine SMFIF_* actions (0x1ff) and all 21 SMFIP_* protocol bits (MILTER8_V6_PROTO_MASK).
POSTFIX_OPTNEG = (b"\x00\x00\x00\x0dO" + b"\x00\x00\x00\x06" + b"\x00\x00\x01\xff"
                  + b"\x00\x1f\xff\xff")

# Every command the daemon handles, as Postfix frames it, with the decoded value.
COMMANDS = [
    (POSTFIX_OPTNEG, OptNegCommand(6, Action(0x1FF), Protocol(0x1FFFFF))),
    (pkt(b"D", b"Cj\0mx.example.org\0{daemon_port}\x0025\0"),
     MacroCommand(b"C", ((b"j", b"mx.example.org"), (b"{daemon_port}", b"25")))),
    (pkt(b"D", b"U"), MacroCommand(b"U", ())),  # Postfix sends empty macro lists too
    (pkt(b"C", b"mx.example.net\x006\x10\xe1" + b"2001:db8::25\0"),
     ConnectCommand(b"mx.example.net", b"6", 4321, b"2001:db8::25")),
    (pkt(b"C", b"[192.0.2.25]\x004\x00\x19" + b"192.0.2.25\0"),
     ConnectCommand(b"[192.0.2.25]", b"4", 25, b"192.0.2.25")),
    (pkt(b"C", b"localhost\x00L\x00\x00/run/smtp.sock\0"),
     ConnectCommand(b"localhost", b"L", 0, b"/run/smtp.sock")),
    (pkt(b"C", b"unknown\x00U"), ConnectCommand(b"unknown", b"U", None, None)),
    (pkt(b"H", b"mx.example.net\0"), HeloCommand(b"mx.example.net")),
    (pkt(b"M", b"<alice@example.net>\0SIZE=1234\0BODY=8BITMIME\0"),
     MailCommand((b"<alice@example.net>", b"SIZE=1234", b"BODY=8BITMIME"))),
    (pkt(b"M", b"<>\0"), MailCommand((b"<>",))),
    (pkt(b"R", b"<bob@contoso.com>\0"), RcptCommand((b"<bob@contoso.com>",))),
    (pkt(b"T"), SimpleCommand(b"T")),
    (pkt(b"L", b"Subject\0 two\n\tlines\0"), HeaderCommand(b"Subject", b" two\n\tlines")),
    (pkt(b"L", b"X-Empty\0\0"), HeaderCommand(b"X-Empty", b"")),
    (pkt(b"N"), SimpleCommand(b"N")),
    (pkt(b"B", b"line one\r\nline two\r\n"), BodyCommand(b"line one\r\nline two\r\n")),
    (pkt(b"E"), EndOfMessageCommand(b"")),
    (pkt(b"E", b"tail\r\n"), EndOfMessageCommand(b"tail\r\n")),  # Sendmail style
    (pkt(b"A"), SimpleCommand(b"A")),
    (pkt(b"U", b"XFOO bar\0"), UnknownCommand(b"XFOO bar")),
    (pkt(b"Q"), SimpleCommand(b"Q")),
    (pkt(b"K"), SimpleCommand(b"K")),
]
STREAM = b"".join(raw for raw, _ in COMMANDS)
DECODED = [command for _, command in COMMANDS]


@pytest.mark.parametrize("raw, expected", COMMANDS, ids=[repr(r[4:5]) for r, _ in COMMANDS])
def test_each_command_decodes_from_its_bytes(raw, expected):
    """Each command Postfix sends decodes from its hand-built bytes to the expected value."""
    assert decode_all(raw) == [expected]


def test_optneg_flags_have_the_bit_numbers_of_milter8_c():
    """The flag vocabulary uses milter8.c's bit numbers (checked against the source)."""
    assert Action.ADDHDRS == 1 and Action.CHGHDRS == 0x10 and Action.SETSYMLIST == 0x100
    assert Protocol.NR_HDR == 1 << 7 and Protocol.NOUNKNOWN == 1 << 8
    assert Protocol.NR_CONN == 1 << 12 and Protocol.NR_BODY == 1 << 19
    assert Protocol.HDR_LEADSPC == 1 << 20
    assert [MacroStage.CONNECT, MacroStage.ENVRCPT, MacroStage.EOM, MacroStage.EOH] == [0, 3, 5, 6]


def test_split_at_every_position_gives_the_same_commands():
    """Splitting the whole stream in two at any byte gives the same commands."""
    for cut in range(len(STREAM) + 1):
        reader, got = PacketReader(), []
        for part in (STREAM[:cut], STREAM[cut:]):
            reader.feed(part)
            while (command := reader.next_command()) is not None:
                got.append(command)
        assert got == DECODED, cut
        assert reader.buffered == 0


def test_byte_at_a_time_gives_each_command_when_its_last_byte_arrives():
    """Feeding one byte at a time yields a command exactly when its packet completes."""
    reader, ends, position = PacketReader(), set(), 0
    for raw, _ in COMMANDS:
        position += len(raw)
        ends.add(position)
    got = []
    for i in range(len(STREAM)):
        reader.feed(STREAM[i:i + 1])
        command = reader.next_command()
        assert (command is not None) == (i + 1 in ends)
        if command is not None:
            got.append(command)
    assert got == DECODED


MALFORMED = [
    (b"\x00\x00\x00\x00", "length 0"),
    (pkt(b"Z"), "unknown command code"),
    (pkt(b"O", b"\x00\x00\x00\x06" * 2), "OPTNEG too short"),
    (pkt(b"O", b"\x00\x00\x00\x06" * 4), "OPTNEG too long"),
    (pkt(b"D", b""), "MACRO without stage"),
    (pkt(b"D", b"Xj\0v\0"), "MACRO for an unknown stage"),
    (pkt(b"D", b"Cj\0"), "MACRO name without value"),
    (pkt(b"D", b"Cj\0v"), "MACRO value not terminated"),
    (pkt(b"C", b"host"), "CONNECT host name not terminated"),
    (pkt(b"C", b"host\0"), "CONNECT without family"),
    (pkt(b"C", b"host\x007\x00\x19addr\0"), "CONNECT bad family"),
    (pkt(b"C", b"host\x006\x00"), "CONNECT short port"),
    (pkt(b"C", b"host\x006\x00\x19addr"), "CONNECT address not terminated"),
    (pkt(b"C", b"host\x006\x00\x19a\0b\0"), "CONNECT two addresses"),
    (pkt(b"C", b"host\x00Uextra"), "CONNECT data after unknown family"),
    (pkt(b"H", b""), "HELO empty"),
    (pkt(b"H", b"a\0b\0"), "HELO two names"),
    (pkt(b"M", b"<a@b>"), "MAIL not terminated"),
    (pkt(b"R", b""), "RCPT empty"),
    (pkt(b"L", b"Subject\0"), "HEADER without value"),
    (pkt(b"L", b"Subject\0x\0y\0"), "HEADER three strings"),
    (pkt(b"T", b"x"), "DATA with data"),
    (pkt(b"N", b"x"), "EOH with data"),
    (pkt(b"A", b"x"), "ABORT with data"),
    (pkt(b"Q", b"\0"), "QUIT with data"),
    (pkt(b"K", b"x"), "QUIT_NC with data"),
    (pkt(b"U", b"cmd"), "UNKNOWN not terminated"),
]


@pytest.mark.parametrize("raw, why", MALFORMED, ids=[why for _, why in MALFORMED])
def test_malformed_packet_raises_the_codec_error(raw, why):
    """Each malformed packet raises MilterProtocolError (and no other exception)."""
    with pytest.raises(MilterProtocolError):
        decode_all(raw)


def test_oversized_length_is_refused_before_its_data_arrives():
    """A length above max_packet_length is refused from the 4-byte header alone."""
    reader = PacketReader(max_packet_length=65536 + 1)
    reader.feed(struct.pack(">I", 65536 + 2))
    with pytest.raises(MilterProtocolError, match="length"):
        reader.next_command()


def test_largest_postfix_body_chunk_is_accepted():
    """A 65535-byte body chunk, the largest Postfix sends, fits the default bound."""
    chunk = b"x" * 65535
    assert decode_all(pkt(b"B", chunk)) == [BodyCommand(chunk)]


def test_error_is_sticky():
    """After a protocol error the reader keeps raising, even for valid bytes."""
    reader = PacketReader()
    reader.feed(pkt(b"Z"))
    with pytest.raises(MilterProtocolError):
        reader.next_command()
    with pytest.raises(MilterProtocolError):
        reader.feed(pkt(b"Q"))
    with pytest.raises(MilterProtocolError):
        reader.next_command()


# --- responses ---

RESPONSES = [
    (Verdict.CONTINUE, b"\x00\x00\x00\x01c"),
    (Verdict.ACCEPT, b"\x00\x00\x00\x01a"),
    (Verdict.REJECT, b"\x00\x00\x00\x01r"),
    (Verdict.TEMPFAIL, b"\x00\x00\x00\x01t"),
    (ReplyCode("450 4.7.26 Service unavailable"),
     b"\x00\x00\x00\x20y450 4.7.26 Service unavailable\x00"),
    # Postfix reads "%%" as "%" (milter8.c SMFIR_REPLYCODE), so "%" goes out doubled.
    (ReplyCode("451 4.4.3 100% busy"), pkt(b"y", b"451 4.4.3 100%% busy\0")),
    (ReplyCode("550-5.2.1 first\r\n550 5.2.1 last"),
     pkt(b"y", b"550-5.2.1 first\r\n550 5.2.1 last\0")),
    (AddHeader("X-Test", " yes"), b"\x00\x00\x00\x0dhX-Test\x00 yes\x00"),
    (InsertHeader(0, "Authentication-Results", " mx.example.org; spf=pass"),
     pkt(b"i", b"\0\0\0\0" b"Authentication-Results\0" b" mx.example.org; spf=pass\0")),
    (InsertHeader(1, "X-Folded", " a\n\tb"), pkt(b"i", b"\0\0\0\x01" b"X-Folded\0" b" a\n\tb\0")),
    (ChangeHeader(2, "Authentication-Results", ""),
     b"\x00\x00\x00\x1dm\x00\x00\x00\x02Authentication-Results\x00\x00"),
    (ChangeHeader(1, "Subject", " new"), b"\x00\x00\x00\x12m\x00\x00\x00\x01Subject\x00 new\x00"),
]


@pytest.mark.parametrize("response, raw", RESPONSES, ids=[repr(r) for r, _ in RESPONSES])
def test_response_encodes_to_the_exact_bytes(response, raw):
    """Each response encodes to the hand-built packet Postfix's milter8_event() reads."""
    assert encode_response(response) == raw


def test_optneg_answer_carries_the_macro_lists_in_its_tail():
    """encode_optneg appends (stage uint32, NUL-terminated list) pairs after the masks."""
    raw = encode_optneg(6, Action.ADDHDRS | Action.CHGHDRS, Protocol.HDR_LEADSPC,
                        {MacroStage.CONNECT: "j _", MacroStage.EOM: "i"})
    payload = (b"\x00\x00\x00\x06" b"\x00\x00\x00\x11" b"\x00\x10\x00\x00"
               b"\x00\x00\x00\x00j _\x00" b"\x00\x00\x00\x05i\x00")
    assert raw == struct.pack(">I", 1 + len(payload)) + b"O" + payload


@pytest.mark.parametrize("lists", [{7: "i"}, {MacroStage.EOM: ""}, {MacroStage.EOM: "i\0j"},
                                   {MacroStage.EOM: "{é}"}])
def test_bad_macro_list_is_a_usage_error(lists):
    """An unknown stage, an empty list, a NUL or non-ASCII name is refused locally."""
    with pytest.raises(MilterUsageError):
        encode_optneg(6, Action(0), Protocol(0), lists)


BAD_REPLIES = [
    "250 2.0.0 ok",  # milter8_valid_smtp_reply(): only 4xx and 5xx
    "450",  # too short
    "4500 x", "45x 4.7.1 x", "450-4.7.1 final line with dash",
    "450 5.7.1 class mismatch",  # enhanced code class must match the reply code
    "450 4.7.1 a\r\n450 4.7.1 b",  # non-final line must use "-"
    "450-4.7.1 a\r\n451 4.7.1 b",  # one code for all lines
    "450-4.7.1 a\n450 4.7.1 b",  # bare LF
    "450 4.7.1 a\r\n",  # the final line has no line end
    "450 4.7.1 tab\there", "450 4.7.1 caf\u00e9", "450 4.7.1 nul\0",
    "450 \u0664.7.1 non-ASCII digit",
]


@pytest.mark.parametrize("text", BAD_REPLIES)
def test_reply_postfix_would_refuse_is_a_usage_error(text):
    """A reply text Postfix's milter8_valid_smtp_reply() refuses cannot be built."""
    with pytest.raises(MilterUsageError):
        ReplyCode(text)


@pytest.mark.parametrize("make", [
    lambda: AddHeader("", " x"), lambda: AddHeader("Bad Name", " x"),
    lambda: AddHeader("Bad:Name", " x"), lambda: AddHeader("X", " a\nb"),
    lambda: AddHeader("X", " a\r\n b"), lambda: AddHeader("X", " a\n"),
    lambda: AddHeader("X", " a\0"), lambda: InsertHeader(-1, "X", " x"),
    lambda: ChangeHeader(0, "X", ""), lambda: ChangeHeader(2 ** 32, "X", ""),
])
def test_header_edit_postfix_cannot_apply_is_a_usage_error(make):
    """Bad header names, unfolded or CR/NUL values and out-of-range indexes are refused."""
    with pytest.raises(MilterUsageError):
        make()


def test_non_response_is_a_usage_error():
    """encode_response refuses values that are not responses."""
    with pytest.raises(MilterUsageError):
        encode_response("c")


def test_encode_packet_frames_progress():
    """encode_packet frames a bare code: SMFIR_PROGRESS is five bytes."""
    assert encode_packet(b"p") == b"\x00\x00\x00\x01p"


# --- properties ---

def _decode_in_chunks(data: bytes, cuts: list[int]):
    """Commands and the error (if any) when data arrives cut at the given offsets."""
    reader, commands = PacketReader(max_packet_length=4096), []
    try:
        for start, end in zip([0, *cuts], [*cuts, len(data)]):
            reader.feed(data[start:end])
            while (command := reader.next_command()) is not None:
                commands.append(command)
    except MilterProtocolError:
        return commands, True
    return commands, False


packet_bytes = st.builds(
    lambda code, payload: pkt(code, payload),
    st.sampled_from([bytes([c]) for c in b"ABCDEHKLMNOQRTUZ"]),
    st.binary(max_size=40) | st.sampled_from([b"", b"\0", b"Cj\0v\0", b"a\0b\0",
                                              b"h\x006\x00\x19a\0"]))
streams = st.lists(packet_bytes, max_size=8).map(b"".join) | st.binary(max_size=200)


@settings(max_examples=400, deadline=None)
@given(data=streams, random=st.randoms(use_true_random=False))
def test_any_bytes_give_commands_or_the_codec_error_whatever_the_chunking(data, random):
    """Any byte stream decodes to commands or MilterProtocolError, never another
    exception, and the same commands and outcome however it is cut into chunks."""
    cuts = sorted(random.sample(range(len(data) + 1), min(len(data) + 1, random.randint(0, 6))))
    assert _decode_in_chunks(data, cuts) == _decode_in_chunks(data, [])
