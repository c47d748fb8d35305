"""The data a milter session reports: events, and the connection and message they carry.

Contract: plain frozen values, built by ``milter_session`` and read by the caller (the
Twisted adapter and the end-of-message decision). Strings from the envelope and macros
are ``str`` decoded as UTF-8 with ``surrogateescape`` (lossless); header names, values
and the body stay ``bytes`` so that DKIM sees the exact bytes. Macro names lose their
braces: ``{daemon_name}`` becomes ``daemon_name``. Nothing here does I/O.

``envelope_address`` turns a MAIL FROM argument as the client wrote it into the form
Postfix uses internally (and sends in policy requests), so the two sides compare equal.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from policyd_ipv6.milter.codec import Action, ChangeHeader, Protocol


def text(raw: bytes) -> str:
    """Decode protocol bytes losslessly (UTF-8, undecodable bytes as surrogates)."""
    return raw.decode("utf-8", "surrogateescape")


def envelope_address(raw: str) -> str:
    """An envelope address in Postfix's internal form: no angle brackets, no source route,
    the local part unquoted ("<\"john smith\"@example.net>" gives "john smith@example.net").

    Why: Postfix hands the milter the MAIL argument as written, quotes included, while the
    policy request's ``sender`` is the internal form (smtpd's extract_addr() and
    tok822_internalize(); unquote_822_local() drops the quotes and resolves quoted pairs).
    """
    address = raw.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if address.startswith("@") and ":" in address:  # RFC 5321 source route: ignored
        address = address.partition(":")[2]
    local, at, domain = address, "", ""
    if address.startswith('"'):
        i = 1
        while i < len(address) and address[i] != '"':
            i += 2 if address[i] == "\\" else 1
        local, at, domain = address[:i + 1], address[i + 1:i + 2], address[i + 2:]
        if at != "@":
            local, at, domain = address, "", ""
    else:
        local, at, domain = address.rpartition("@")
        if not at:
            local = address
    out, i = [], 0
    while i < len(local):
        c = local[i]
        if c == "\\" and i + 1 < len(local):
            out.append(local[i + 1])
            i += 2
            continue
        if c != '"':
            out.append(c)
        i += 1
    return "".join(out) + at + domain


@dataclass(frozen=True, slots=True)
class Connection:
    """What SMFIC_CONNECT and HELO told us. ``address`` is bare ("2001:db8::25"): Postfix
    sends it so, and Sendmail's "IPv6:2001:db8::25" loses its prefix; the ``client_addr``
    macro carries Postfix's "IPv6:" form."""

    hostname: str
    family: str  # "4", "6", "L" (UNIX socket) or "U" (unknown)
    address: str | None
    port: int | None
    macros: Mapping[str, str]  # CONNECT and HELO stages merged
    helo: str | None = None


@dataclass(frozen=True, slots=True)
class Header:
    """One header as Postfix passed it; ``index`` counts headers of this name
    (case-insensitively) from 1, which is what ``ChangeHeader`` expects."""

    name: bytes
    value: bytes  # leading whitespace kept; continuation lines joined with bare "\n"
    index: int

    def raw(self) -> bytes:
        """The header as it appeared in the message, CRLF line ends."""
        return self.name + b":" + self.value.replace(b"\n", b"\r\n") + b"\r\n"


class HeaderRef(NamedTuple):
    """A header the session marked (``MilterSession(mark_header=...)``): name and index
    only, so marking goes on, cheaply, past the bound on collected headers."""

    name: bytes
    # Shadows tuple.index(), on purpose: the same name as Header.index.
    index: int  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Message:
    """One transaction (MAIL FROM to end of message) as collected. When ``too_large``
    is true, collection stopped at a bound: ``headers`` is incomplete and ``body``
    empty, so the message must not be judged by its content. ``body`` is also empty when
    the session was told the body is not needed, and cut to its first ``max_body_kept + 1``
    bytes when longer (``milter.collect``); ``body_size`` counts every body byte received."""

    sender: str | None  # as given to MAIL FROM, e.g. "<a@example.org>" or "<>"
    esmtp_args: tuple[str, ...]
    recipients: tuple[str, ...]  # at most max_recipients
    recipient_count: int
    headers: tuple[Header, ...]  # Postfix's own Received: header is not shown
    body: bytes  # CRLF line ends, as Postfix sends it
    macros: Mapping[str, str]  # MAIL ... EOM stages merged, later values win
    too_large: bool
    # Every header the session's mark_header matched, in message order, even past the
    # bounds; None when more matched than the session keeps (the list is incomplete).
    marked: tuple[HeaderRef, ...] | None = ()
    body_size: int = 0

    def raw(self) -> bytes:
        """Headers, empty line and body: the RFC 5322 message for DKIM verification."""
        return b"".join(header.raw() for header in self.headers) + b"\r\n" + self.body

    def header_deletions(self, match: Callable[[Header], bool]) -> tuple[ChangeHeader, ...]:
        """SMFIR_CHGHEADER deletions for the matching headers, highest index first:
        Postfix unlinks a deleted header, so the lower indexes stay valid."""
        return tuple(ChangeHeader(header.index, text(header.name), "")
                     for header in reversed(self.headers) if match(header))

    def marked_deletions(self) -> tuple[ChangeHeader, ...] | None:
        """SMFIR_CHGHEADER deletions of every marked header, highest index first; None when
        the marked list is incomplete (see ``marked``)."""
        if self.marked is None:
            return None
        return tuple(ChangeHeader(ref.index, text(ref.name), "")
                     for ref in sorted(self.marked, key=lambda ref: ref.index, reverse=True))


# --- Events: every one has ``needs_verdict``; if true, Postfix waits for send_verdict() ---

@dataclass(frozen=True, slots=True)
class Negotiated:
    """OPTNEG answered (the answer is in the same ``Received.reply``)."""

    needs_verdict: ClassVar[bool] = False
    version: int
    actions: Action
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class Connected:
    """SMFIC_CONNECT: a new SMTP client."""

    connection: Connection
    needs_verdict: bool


@dataclass(frozen=True, slots=True)
class Helo:
    """HELO or EHLO; ``Connection.helo`` now holds the name too."""

    name: str
    macros: Mapping[str, str]
    needs_verdict: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM: a new message starts. ``sender`` as written ("<a@b>"); ``address`` in
    Postfix's internal form, as the policy request has it (``envelope_address``)."""

    sender: str
    esmtp_args: tuple[str, ...]
    macros: Mapping[str, str]
    needs_verdict: bool

    @property
    def address(self) -> str:
        return envelope_address(self.sender)


@dataclass(frozen=True, slots=True)
class Recipient:
    """RCPT TO, only for recipients Postfix accepted."""

    recipient: str
    esmtp_args: tuple[str, ...]
    macros: Mapping[str, str]
    needs_verdict: bool


@dataclass(frozen=True, slots=True)
class DataStarted:
    """DATA (or BDAT); the queue ID macro "i" is known from here on."""

    macros: Mapping[str, str]
    needs_verdict: bool


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The whole message is in; Postfix waits for the verdict (and header edits)."""

    connection: Connection
    message: Message
    needs_verdict: bool = True


@dataclass(frozen=True, slots=True)
class Aborted:
    """The current message is gone (RSET, end of a transaction); the connection stays."""

    needs_verdict: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class UnknownCommand:
    """An SMTP command Postfix did not recognise (sent only if NOUNKNOWN was refused)."""

    needs_verdict: ClassVar[bool] = False
    command: str


@dataclass(frozen=True, slots=True)
class Closed:
    """QUIT (``new_connection`` false: expect EOF) or QUIT_NC (a new CONNECT follows)."""

    needs_verdict: ClassVar[bool] = False
    new_connection: bool


Event = (Negotiated | Connected | Helo | MailFrom | Recipient | DataStarted | EndOfMessage
         | Aborted | UnknownCommand | Closed)
