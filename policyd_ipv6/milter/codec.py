"""Sans-IO codec for the Sendmail milter protocol, version 6, as Postfix speaks it.

Contract:

* Framing: every packet is a 4-byte big-endian length ``n >= 1``, a one-byte command
  code and ``n - 1`` payload bytes; strings are NUL-terminated (Postfix
  ``src/milter/milter8.c``: ``milter8_write_cmd``, ``milter8_read_resp``).
* :class:`PacketReader` turns bytes from the MTA into typed command objects, one at a
  time, buffering at most one packet of at most ``max_packet_length`` bytes.
* :func:`encode_optneg` and :func:`encode_response` turn our answers into bytes.
* Anything the MTA sends that cannot be decoded raises :class:`MilterProtocolError`
  and nothing else (the caller then disconnects without a reply, and Postfix applies
  ``milter_default_action``). A caller passing a bad value to a constructor or encoder
  gets :class:`MilterUsageError`.
* Payload strings stay ``bytes``: Postfix passes 8-bit text (SMTPUTF8) through, and
  DKIM needs the exact header bytes. Deciding what they mean is the session's job.

No I/O, no logging, nothing from Twisted.
"""

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

# The SMFIF_*, SMFIP_* and SMFIM_* bits, re-exported here with the codes.
from policyd_ipv6.milter.flags import Action, MacroStage, Protocol

# --- Vocabulary: the single definition of codes and flags, as in milter8.c L119-333 ---

MILTER_VERSION = 6  # the version we speak; 6 added SETSYMLIST (MILTER_README)
MILTER_CHUNK_SIZE = 65535  # largest body chunk Postfix sends (milter8.c)
# Largest packet accepted. A header packet carries one whole header, and Postfix's
# header_size_limit defaults to 102400 bytes; a body packet carries <= 65535 bytes.
DEFAULT_MAX_PACKET_LENGTH = 256 * 1024

# Commands, MTA -> filter (SMFIC_*).
SMFIC_ABORT, SMFIC_BODY, SMFIC_CONNECT, SMFIC_MACRO = b"A", b"B", b"C", b"D"
SMFIC_BODYEOB, SMFIC_HELO, SMFIC_HEADER, SMFIC_MAIL = b"E", b"H", b"L", b"M"
SMFIC_EOH, SMFIC_OPTNEG, SMFIC_QUIT, SMFIC_RCPT = b"N", b"O", b"Q", b"R"
SMFIC_DATA, SMFIC_UNKNOWN, SMFIC_QUIT_NC = b"T", b"U", b"K"

# Responses, filter -> MTA (SMFIR_*) that this project sends; the four data-less
# verdicts (accept, continue, reject, tempfail) are the Disposition enumeration below.
SMFIR_PROGRESS, SMFIR_REPLYCODE = b"p", b"y"
SMFIR_ADDHEADER, SMFIR_INSHEADER, SMFIR_CHGHEADER = b"h", b"i", b"m"
# The OPTNEG answer reuses the command code 'O'; the SETSYMLIST macro lists ride in its
# tail (milter8_connect "Secondary negotiations"), so 'l' never goes on the wire alone.
SMFIR_OPTNEG = SMFIC_OPTNEG

# Address families in SMFIC_CONNECT (SMFIA_*).
SMFIA_INET, SMFIA_INET6, SMFIA_UNIX, SMFIA_UNKNOWN = b"4", b"6", b"L", b"U"


class MilterProtocolError(Exception):
    """The MTA sent bytes that are not a valid milter command here."""


class MilterUsageError(ValueError):
    """The local caller asked for something the protocol cannot express."""


# --- Commands (decoded packets) ---

@dataclass(frozen=True, slots=True)
class OptNegCommand:
    version: int
    actions: Action
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class MacroCommand:
    stage: bytes  # the command code the macros belong to, e.g. b"C"
    pairs: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class ConnectCommand:
    hostname: bytes  # verified name, or "[address]" when unknown
    family: bytes  # one of SMFIA_*
    port: int | None  # None for SMFIA_UNKNOWN
    address: bytes | None  # bare address (no "IPv6:" prefix), or socket path


@dataclass(frozen=True, slots=True)
class HeloCommand:
    name: bytes


@dataclass(frozen=True, slots=True)
class MailCommand:
    args: tuple[bytes, ...]  # sender as given ("<a@b>"), then ESMTP parameters


@dataclass(frozen=True, slots=True)
class RcptCommand:
    args: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class HeaderCommand:
    name: bytes
    value: bytes  # folded lines joined with bare "\n" (milter8_header)


@dataclass(frozen=True, slots=True)
class BodyCommand:
    chunk: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessageCommand:
    chunk: bytes  # Sendmail may append a last body chunk; Postfix sends none


@dataclass(frozen=True, slots=True)
class UnknownCommand:
    command: bytes


@dataclass(frozen=True, slots=True)
class SimpleCommand:
    """A command without payload: DATA, EOH, ABORT, QUIT, QUIT_NC."""

    code: bytes


Command = (OptNegCommand | MacroCommand | ConnectCommand | HeloCommand | MailCommand
           | RcptCommand | HeaderCommand | BodyCommand | EndOfMessageCommand
           | UnknownCommand | SimpleCommand)


def _strings(payload: bytes, what: str, count: int | None = None) -> list[bytes]:
    """Split NUL-terminated strings, insisting on ``count`` of them if given."""
    strings = payload[:-1].split(b"\0")
    if not payload.endswith(b"\0") or count not in (None, len(strings)):
        raise MilterProtocolError(f"{what}: malformed or wrong number of strings")
    return strings


def _optneg(payload: bytes) -> Command:
    if len(payload) != 12:
        raise MilterProtocolError(f"OPTNEG: {len(payload)} data bytes, expected 12")
    version, actions, protocol = (int.from_bytes(payload[i:i + 4], "big") for i in (0, 4, 8))
    return OptNegCommand(version, Action(actions), Protocol(protocol))


# Macro packets name the command they precede (milter8_event sends the event code).
_MACRO_STAGES = frozenset(bytes([c]) for c in b"CHMRTLNBEU")


def _macro(payload: bytes) -> Command:
    stage, rest = payload[:1], payload[1:]
    if stage not in _MACRO_STAGES:
        raise MilterProtocolError(f"MACRO: unknown stage {stage!r}")
    strings = _strings(rest, "MACRO") if rest else []
    if len(strings) % 2:
        raise MilterProtocolError("MACRO: name without value")
    return MacroCommand(stage, tuple(zip(strings[0::2], strings[1::2])))


def _connect(payload: bytes) -> Command:
    end = payload.find(b"\0")
    if end < 0 or end + 1 >= len(payload):
        raise MilterProtocolError("CONNECT: missing host name or family")
    hostname, family, rest = payload[:end], payload[end + 1:end + 2], payload[end + 2:]
    if family == SMFIA_UNKNOWN:
        if rest:
            raise MilterProtocolError("CONNECT: data after unknown family")
        return ConnectCommand(hostname, family, None, None)
    if family not in (SMFIA_INET, SMFIA_INET6, SMFIA_UNIX) or len(rest) < 3:
        raise MilterProtocolError(f"CONNECT: bad family {family!r} or short data")
    (address,) = _strings(rest[2:], "CONNECT", 1)
    return ConnectCommand(hostname, family, int.from_bytes(rest[:2], "big"), address)


def _empty(code: bytes):
    def decode(payload: bytes) -> Command:
        if payload:
            raise MilterProtocolError(f"command {code!r} carries {len(payload)} data bytes")
        return SimpleCommand(code)
    return decode


_DECODERS = {
    SMFIC_OPTNEG: _optneg,
    SMFIC_MACRO: _macro,
    SMFIC_CONNECT: _connect,
    SMFIC_HELO: lambda p: HeloCommand(*_strings(p, "HELO", 1)),
    SMFIC_MAIL: lambda p: MailCommand(tuple(_strings(p, "MAIL"))),
    SMFIC_RCPT: lambda p: RcptCommand(tuple(_strings(p, "RCPT"))),
    SMFIC_HEADER: lambda p: HeaderCommand(*_strings(p, "HEADER", 2)),
    SMFIC_BODY: BodyCommand,
    SMFIC_BODYEOB: EndOfMessageCommand,
    SMFIC_UNKNOWN: lambda p: UnknownCommand(*_strings(p, "UNKNOWN", 1)),
    **{code: _empty(code) for code in (SMFIC_DATA, SMFIC_EOH, SMFIC_ABORT, SMFIC_QUIT,
                                       SMFIC_QUIT_NC)},
}


def decode_command(code: bytes, payload: bytes) -> Command:
    """Decode one packet's command code and payload; raise MilterProtocolError."""
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise MilterProtocolError(f"unknown command code {code!r}")
    return decoder(payload)


class PacketReader:
    """Incremental framing: ``feed(data)``, then ``next_command()`` until it returns None.

    The buffer holds at most one partial packet plus the last fed chunk, provided the
    caller drains after each feed. After an error every call raises it again.
    """

    def __init__(self, max_packet_length: int = DEFAULT_MAX_PACKET_LENGTH) -> None:
        self._buffer = bytearray()
        self._max_packet_length = max_packet_length
        self._error: MilterProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (non-zero at EOF: a truncated packet)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if self._error:
            raise self._error
        self._buffer += data

    def next_command(self) -> Command | None:
        """Return the next complete command, or None if more bytes are needed."""
        if self._error:
            raise self._error
        if len(self._buffer) < 4:
            return None
        length = int.from_bytes(self._buffer[:4], "big")
        try:
            if not 1 <= length <= self._max_packet_length:
                raise MilterProtocolError(f"bad packet length {length}")
            if len(self._buffer) < 4 + length:
                return None
            code, payload = bytes(self._buffer[4:5]), bytes(self._buffer[5:4 + length])
            del self._buffer[:4 + length]
            return decode_command(code, payload)
        except MilterProtocolError as error:
            self._error = error
            raise


# --- Responses (filter -> MTA) ---
def _uint32(value: int, what: str) -> bytes:
    if not 0 <= value < 2 ** 32:
        raise MilterUsageError(f"{what} {value} out of range")
    return value.to_bytes(4, "big")


def encode_packet(code: bytes, payload: bytes = b"") -> bytes:
    """Frame one packet: length (command byte included), code, payload."""
    return _uint32(1 + len(payload), "packet length") + code + payload


def encode_optneg(version: int, actions: Action, protocol: Protocol,
                  macro_lists: Mapping[MacroStage, str] = {}) -> bytes:
    """The OPTNEG answer, with the SETSYMLIST lists (stage number, then a
    NUL-terminated space-separated name list) appended as Postfix reads them."""
    payload = b"".join(_uint32(int(v), "OPTNEG field") for v in (version, actions, protocol))
    for stage, names in macro_lists.items():
        if (stage not in set(MacroStage) or not names.strip() or not names.isascii()
                or "\0" in names):
            raise MilterUsageError(f"bad macro list for {stage!r}: {names!r}")
        payload += _uint32(stage, "stage") + names.encode("ascii") + b"\0"
    return encode_packet(SMFIR_OPTNEG, payload)


class Disposition(enum.Enum):
    """Answers without data (milter8_event); the value is the SMFIR_* code."""

    CONTINUE = b"c"  # go on with the next event
    ACCEPT = b"a"  # at CONNECT/HELO: the whole connection, otherwise: this message
    REJECT = b"r"  # Postfix answers "550 5.7.1 Command rejected"
    TEMPFAIL = b"t"  # Postfix answers "451 4.7.1 Service unavailable - try again later"


# A reply line as milter8_valid_smtp_reply() accepts it: 4xx/5xx, "-" on every line but
# the last, an enhanced status code (if any) of the same class. Printable ASCII only.
_REPLY_LINE = re.compile(r"([45])([0-9]{2})([ -])([0-9])?[\x20-\x7e]*\Z")


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """An exact SMTP reply, e.g. "450 4.7.26 Service unavailable, ..." (SMFIR_REPLYCODE).

    Multi-line replies join lines with CRLF. Postfix sends the text to the client
    unchanged, without a prefix (smtpd.c; cleanup_milter_apply).
    """

    text: str

    def __post_init__(self) -> None:
        lines = self.text.split("\r\n")
        codes = set()
        for number, line in enumerate(lines, 1):
            match = _REPLY_LINE.match(line)
            final = number == len(lines)
            if (not match or match[3] != (" " if final else "-")
                    or (match[4] and match[4] != match[1])):
                raise MilterUsageError(f"invalid SMTP reply line {line!r}")
            codes.add(match[1] + match[2])
        if len(codes) != 1:  # Postfix snapshots insist on one code for all lines.
            raise MilterUsageError(f"mixed reply codes in {self.text!r}")


_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 ftext: no ":"
_HEADER_VALUE = re.compile(rb"[^\0\r\n]*(?:\n[ \t][^\0\r\n]*)*\Z")  # folded with bare LF


class _HeaderEdit:
    """Header edits at end of message. With SMFIP_HDR_LEADSPC the value goes after
    the colon exactly as given, so include the leading space: " value"."""

    __slots__ = ()
    _first_index: ClassVar[int | None] = None  # None: the edit carries no index
    # The subclasses' fields (``index`` only where ``_first_index`` is set).
    name: str
    value: str
    index: int

    def __post_init__(self) -> None:
        if not _HEADER_NAME.match(self.name.encode("utf-8", "surrogateescape")):
            raise MilterUsageError(f"invalid header name {self.name!r}")
        if not _HEADER_VALUE.match(self.value.encode("utf-8", "surrogateescape")):
            raise MilterUsageError(f"invalid header value {self.value!r}")
        if self._first_index is not None and not self._first_index <= self.index < 2 ** 32:
            raise MilterUsageError(f"header index {self.index} out of range")

    def payload(self) -> bytes:
        """[index as uint32] name NUL value NUL."""
        index = b"" if self._first_index is None else self.index.to_bytes(4, "big")
        return (index + self.name.encode("utf-8", "surrogateescape") + b"\0"
                + self.value.encode("utf-8", "surrogateescape") + b"\0")


@dataclass(frozen=True, slots=True)
class AddHeader(_HeaderEdit):
    """Append a header after the last one (SMFIR_ADDHEADER)."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader(_HeaderEdit):
    """Insert a header at ``index``; 0 is the very top, above Postfix's own
    Received: header (SMFIR_INSHEADER; cleanup_milter.c)."""

    _first_index: ClassVar[int] = 0
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader(_HeaderEdit):
    """Replace the ``index``-th (1-based, counted among headers of that name,
    case-insensitively) header; an empty value deletes it (SMFIR_CHGHEADER)."""

    _first_index: ClassVar[int] = 1
    index: int
    name: str
    value: str


HeaderEdit = AddHeader | InsertHeader | ChangeHeader
Response = Disposition | ReplyCode | HeaderEdit
_EDIT_CODES = {AddHeader: SMFIR_ADDHEADER, InsertHeader: SMFIR_INSHEADER,
               ChangeHeader: SMFIR_CHGHEADER}


def encode_response(response: Response) -> bytes:
    """Encode one response packet; raise MilterUsageError for anything else."""
    if isinstance(response, Disposition):
        return encode_packet(response.value)
    if isinstance(response, ReplyCode):
        # Postfix, like Sendmail, treats the text as a format string: "%%" means "%".
        return encode_packet(SMFIR_REPLYCODE, response.text.replace("%", "%%").encode() + b"\0")
    if type(response) in _EDIT_CODES:
        return encode_packet(_EDIT_CODES[type(response)], response.payload())
    raise MilterUsageError(f"not a milter response: {response!r}")
