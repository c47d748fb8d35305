"""Sans-IO state machine for one milter connection from Postfix (protocol version 6).

Contract, in the spirit of h11 (events out, bytes out, no callbacks, no I/O):

* ``session.receive(data)`` decodes every complete packet and returns
  ``Received(events, reply)``: the events, in order, and the bytes to write now (the
  OPTNEG answer and the automatic "continue" answers). Write ``reply`` before acting on
  the events.
* An event with ``needs_verdict`` true (``EndOfMessage`` always; ``Connected``,
  ``Helo``, ``MailFrom``, ``Recipient``, ``DataStarted`` when their stage is in
  ``verdict_stages``) leaves Postfix waiting: compute the verdict, possibly
  asynchronously, then write ``session.send_verdict(verdict, header_edits)``. Meanwhile
  ``session.send_progress()`` may be written to keep Postfix waiting. Postfix sends
  nothing while it waits, so bytes received then are a protocol error.
* For stages outside ``verdict_stages`` the session negotiates SMFIP_NR_* (Postfix
  then expects no answer) or, where the MTA did not offer that, answers "continue".
* Errors: bytes that are not what Postfix sends here raise ``MilterProtocolError``
  (log, then disconnect without a reply; Postfix applies ``milter_default_action``);
  misuse by the caller raises ``MilterUsageError``. Nothing else is raised.
* Bounds: packets (``max_packet_length``), headers per message (``max_headers``), header
  plus body bytes (``max_message_bytes``), stored recipients (``max_recipients``). Over
  the header or byte bound a message is still handled to the end, with collection stopped,
  the body dropped and ``Message.too_large`` true: never judged on an incomplete copy.
  Macros: at most ``max_macros`` names and ``max_macro_bytes`` characters (names and
  values) in one MACRO packet, in the connection's (CONNECT and HELO) and in a message's
  (MAIL to end of message) merged macros; more is a MilterProtocolError (Postfix sends a few
  dozen short ones).
* Body: ``wants_body()`` is asked at each message's first body byte (the caller knows by
  then whether end of message will read the body); when false, the body is counted but not
  kept (``Message.body`` empty). A body over ``max_body_kept`` keeps only its first
  ``max_body_kept + 1`` bytes; ``Message.body_size`` is always the whole size.
* Marking: headers for which ``mark_header(name, value)`` holds are listed (name and index)
  in ``Message.marked`` past those bounds too, up to ``max_marked`` (then ``marked`` is
  None): the milter deletes forged Authentication-Results from every message this way.
  ``milter.collect`` keeps the message within these bounds; this module, the protocol.
* QUIT and QUIT_NC are also accepted after a final verdict at CONNECT (libmilter MTAs and
  miltertest send them); QUIT_NC starts a new session on the same connection. Sendmail's
  CONNECT address form "IPv6:2001:db8::1" loses its prefix.

The events and the data they carry are defined in ``milter.events``; ``milter.server``
is the transport adapter (an event with ``needs_verdict`` is answered exactly once; after
``Closed(new_connection=False)`` the connection is closed).
"""

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import NamedTuple

from policyd_ipv6.milter import codec
from policyd_ipv6.milter.codec import (
    Action,
    AddHeader,
    ChangeHeader,
    Disposition,
    HeaderEdit,
    InsertHeader,
    MacroStage,
    MilterProtocolError,
    MilterUsageError,
    Protocol,
    ReplyCode,
)
from policyd_ipv6.milter.collect import (
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_MACRO_BYTES,
    DEFAULT_MAX_MACROS,
    DEFAULT_MAX_MARKED,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_RECIPIENTS,
    Bounds,
    MessageBuilder,
)
from policyd_ipv6.milter.events import (
    Aborted,
    Closed,
    Connected,
    Connection,
    DataStarted,
    EndOfMessage,
    Event,
    Helo,
    MailFrom,
    Negotiated,
    Recipient,
    UnknownCommand,
    text,
)


class Stage(enum.Enum):
    """Events at which the caller may decide; the value is the SMFIC_* code."""

    CONNECT = codec.SMFIC_CONNECT
    HELO = codec.SMFIC_HELO
    MAIL = codec.SMFIC_MAIL
    RCPT = codec.SMFIC_RCPT
    DATA = codec.SMFIC_DATA
    EOM = codec.SMFIC_BODYEOB


# The no-reply flag for each stage outside verdict_stages (milter8.c honours all of them).
_NO_REPLY = {Stage.CONNECT: Protocol.NR_CONN, Stage.HELO: Protocol.NR_HELO,
             Stage.MAIL: Protocol.NR_MAIL, Stage.RCPT: Protocol.NR_RCPT,
             Stage.DATA: Protocol.NR_DATA}
_NO_REPLY_CONTENT = {codec.SMFIC_HEADER: Protocol.NR_HDR, codec.SMFIC_EOH: Protocol.NR_EOH,
                     codec.SMFIC_BODY: Protocol.NR_BODY, codec.SMFIC_UNKNOWN: Protocol.NR_UNKN}
REQUIRED_ACTIONS = Action.ADDHDRS | Action.CHGHDRS | Action.SETSYMLIST
# HDR_LEADSPC keeps the header value's leading whitespace, needed to rebuild the exact
# header bytes for DKIM (milter8_header). NOUNKNOWN: unknown SMTP commands are no concern.
REQUIRED_PROTOCOL = Protocol.HDR_LEADSPC
OPTIONAL_PROTOCOL = (Protocol.NOUNKNOWN | Protocol.NR_UNKN | Protocol.NR_HDR
                     | Protocol.NR_EOH | Protocol.NR_BODY)
# No verdict at CONNECT: the milter stays on every connection (ACCEPT would drop it) to remove
# forged Authentication-Results from all mail, cheaply (SMFIP_NR_*). MAIL is answered for
# ordering: Postfix asks the policy at RCPT only after it, so the message is open by then.
DEFAULT_VERDICT_STAGES = frozenset({Stage.MAIL, Stage.EOM})
# Requested with SETSYMLIST; Postfix keeps its main.cf lists for the other stages.
DEFAULT_MACRO_LISTS = {
    MacroStage.CONNECT: "j {daemon_name} {daemon_addr} {daemon_port} {client_addr} "
                        "{client_port} {client_ptr} {client_resolve} _",
    MacroStage.ENVFROM: "i {auth_type} {auth_authen} {mail_addr}",
    MacroStage.ENVRCPT: "i {rcpt_addr}",
    MacroStage.DATA: "i", MacroStage.EOH: "i", MacroStage.EOM: "i",
}


def _bare(address: str) -> str:
    # Sendmail writes IPv6 clients as "IPv6:2001:db8::1" in SMFIC_CONNECT; Postfix bare.
    return address[5:] if address[:5].lower() == "ipv6:" else address


def _macros(pairs: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Macro names without braces: "{daemon_name}" -> "daemon_name", "j" -> "j"."""
    return {text(name).removeprefix("{").removesuffix("}"): text(value)
            for name, value in pairs}


def _bounded(macros: dict[str, str], max_macros: int, max_bytes: int, what: str
             ) -> dict[str, str]:
    """``macros`` itself, or MilterProtocolError when over the bounds (module docstring)."""
    size = sum(len(name) + len(value) for name, value in macros.items())
    if len(macros) > max_macros or size > max_bytes:
        raise MilterProtocolError(f"{what}: {len(macros)} macros of {size} characters, over"
                                  f" the bound of {max_macros} and {max_bytes}")
    return macros


class Received(NamedTuple):
    events: list[Event]
    reply: bytes


class State(enum.Enum):
    NEGOTIATING = "negotiating"  # waiting for OPTNEG
    CONNECTING = "connecting"  # waiting for CONNECT
    CONNECTED = "connected"
    CLOSED = "closed"  # after QUIT, or after a final verdict at CONNECT/HELO
    ERROR = "error"  # after a MilterProtocolError


class MilterSession:
    """One milter connection; see the module docstring for the contract."""

    def __init__(self, *, verdict_stages: Iterable[Stage] = DEFAULT_VERDICT_STAGES,
                 macro_lists: Mapping[MacroStage, str] = DEFAULT_MACRO_LISTS,
                 max_packet_length: int = codec.DEFAULT_MAX_PACKET_LENGTH,
                 max_headers: int = DEFAULT_MAX_HEADERS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_recipients: int = DEFAULT_MAX_RECIPIENTS,
                 mark_header: Callable[[bytes, bytes], bool] | None = None,
                 max_marked: int = DEFAULT_MAX_MARKED,
                 wants_body: Callable[[], bool] | None = None,
                 max_body_kept: int | None = None,
                 max_macros: int = DEFAULT_MAX_MACROS,
                 max_macro_bytes: int = DEFAULT_MAX_MACRO_BYTES) -> None:
        self._verdict_stages = frozenset(verdict_stages) | {Stage.EOM}
        if not all(isinstance(stage, Stage) for stage in self._verdict_stages):
            raise MilterUsageError(f"verdict_stages must be Stage members: {verdict_stages!r}")
        codec.encode_optneg(0, Action(0), Protocol(0), macro_lists)  # validates the lists
        self._macro_lists = dict(macro_lists)
        self._reader = codec.PacketReader(max_packet_length)
        self._bounds = Bounds(max_headers, max_message_bytes, max_recipients, max_marked,
                              mark_header, wants_body, max_body_kept)
        self._max_macros, self._max_macro_bytes = max_macros, max_macro_bytes
        self.state = State.NEGOTIATING
        self.protocol = Protocol(0)  # agreed in OPTNEG
        self.pending: Stage | None = None  # the stage waiting for send_verdict()
        self.connection: Connection | None = None
        self._message = MessageBuilder(self._bounds)
        self._stage_macros: dict[bytes, dict[str, str]] = {}

    # --- input ---

    def receive(self, data: bytes) -> Received:
        """Feed bytes from Postfix; return the events and the bytes to write now.

        Raises MilterProtocolError; after that the session stays in State.ERROR and
        every later call raises too (the only right reaction is to disconnect)."""
        events: list[Event] = []
        reply = bytearray()
        try:
            if self.state is State.ERROR:
                raise MilterProtocolError("session already failed")
            self._reader.feed(data)
            while (command := self._reader.next_command()) is not None:
                if self.state is State.CLOSED and isinstance(command, codec.SimpleCommand) \
                        and command.code in (codec.SMFIC_QUIT, codec.SMFIC_QUIT_NC):
                    pass  # QUIT / QUIT_NC after a final verdict at CONNECT or HELO
                elif self.state is State.CLOSED or self.pending is not None:
                    raise MilterProtocolError(f"unexpected command in state {self.state.value}"
                                              f" (verdict pending: {self.pending})")
                self._handle(command, events, reply)
        except MilterProtocolError:
            self.state = State.ERROR
            raise
        return Received(events, bytes(reply))

    def _handle(self, command: codec.Command, events: list[Event], reply: bytearray) -> None:
        if isinstance(command, codec.OptNegCommand):
            return self._negotiate(command, events, reply)
        if self.state is State.NEGOTIATING:
            raise MilterProtocolError("command before OPTNEG")
        if isinstance(command, codec.MacroCommand):
            self._stage_macros[command.stage] = self._bounded(_macros(command.pairs),
                                                              "MACRO packet")
            return None
        if isinstance(command, codec.SimpleCommand) and command.code in (
                codec.SMFIC_ABORT, codec.SMFIC_QUIT, codec.SMFIC_QUIT_NC):
            self._message, self._stage_macros = MessageBuilder(self._bounds), {}
            if command.code == codec.SMFIC_ABORT:
                events.append(Aborted())
            else:
                new_connection = command.code == codec.SMFIC_QUIT_NC
                self.state = State.CONNECTING if new_connection else State.CLOSED
                self.connection = None
                events.append(Closed(new_connection))
            return None
        if isinstance(command, codec.ConnectCommand):
            if self.state is not State.CONNECTING:
                raise MilterProtocolError("second CONNECT")
            self.state = State.CONNECTED
            self.connection = connection = Connection(
                text(command.hostname), text(command.family),
                None if command.address is None else _bare(text(command.address)),
                command.port, self._take_macros(codec.SMFIC_CONNECT))
            return self._stage(Stage.CONNECT, events, reply,
                               lambda needs: Connected(connection, needs))
        if self.state is not State.CONNECTED:
            raise MilterProtocolError("command before CONNECT")
        self._handle_connected(command, events, reply)

    def _handle_connected(self, command: codec.Command, events: list[Event],
                          reply: bytearray) -> None:
        message, connection = self._message, self.connection
        assert connection is not None  # set at CONNECT, and the state is CONNECTED
        if isinstance(command, codec.HeloCommand):
            macros = self._take_macros(codec.SMFIC_HELO)
            self.connection = replace(connection, helo=text(command.name), macros=self._bounded(
                {**connection.macros, **macros}, "connection macros"))
            self._stage(Stage.HELO, events, reply,
                        lambda needs: Helo(text(command.name), macros, needs))
        elif isinstance(command, codec.MailCommand):
            # A new MAIL starts a new message even if no ABORT came in between.
            self._message = message = MessageBuilder(self._bounds)
            macros = self._take_macros(codec.SMFIC_MAIL, message)
            message.sender = sender = text(command.args[0])
            message.esmtp_args = tuple(text(arg) for arg in command.args[1:])
            self._stage(Stage.MAIL, events, reply, lambda needs: MailFrom(
                sender, message.esmtp_args, macros, needs))
        elif isinstance(command, codec.RcptCommand):
            macros = self._take_macros(codec.SMFIC_RCPT, message)
            recipient, args = text(command.args[0]), tuple(map(text, command.args[1:]))
            message.add_recipient(recipient)
            self._stage(Stage.RCPT, events, reply,
                        lambda needs: Recipient(recipient, args, macros, needs))
        elif isinstance(command, codec.SimpleCommand) and command.code == codec.SMFIC_DATA:
            macros = self._take_macros(codec.SMFIC_DATA, message)
            self._stage(Stage.DATA, events, reply, lambda needs: DataStarted(macros, needs))
        elif isinstance(command, codec.HeaderCommand):
            self._take_macros(codec.SMFIC_HEADER, message)
            message.add_header(command.name, command.value)
            self._content_reply(codec.SMFIC_HEADER, reply)
        elif isinstance(command, codec.SimpleCommand) and command.code == codec.SMFIC_EOH:
            self._take_macros(codec.SMFIC_EOH, message)
            self._content_reply(codec.SMFIC_EOH, reply)
        elif isinstance(command, codec.BodyCommand):
            self._take_macros(codec.SMFIC_BODY, message)
            message.add_body(command.chunk)
            self._content_reply(codec.SMFIC_BODY, reply)
        elif isinstance(command, codec.EndOfMessageCommand):
            self._take_macros(codec.SMFIC_BODYEOB, message)
            message.add_body(command.chunk)
            self.pending = Stage.EOM
            events.append(EndOfMessage(connection, message.snapshot()))
        elif isinstance(command, codec.UnknownCommand):
            self._take_macros(codec.SMFIC_UNKNOWN)
            events.append(UnknownCommand(text(command.command)))
            self._content_reply(codec.SMFIC_UNKNOWN, reply)
        else:  # OPTNEG and the connection commands were handled by _handle().
            raise AssertionError(f"unhandled command {command!r}")

    def _negotiate(self, command: codec.OptNegCommand, events: list[Event],
                   reply: bytearray) -> None:
        if self.state is not State.NEGOTIATING:
            raise MilterProtocolError("second OPTNEG")
        # milter_protocol < 6 lacks SETSYMLIST and HDR_LEADSPC, which the DKIM check needs.
        if command.version < codec.MILTER_VERSION:
            raise MilterProtocolError(f"MTA offers milter protocol {command.version} < 6")
        if REQUIRED_ACTIONS & ~command.actions or REQUIRED_PROTOCOL & ~command.protocol:
            raise MilterProtocolError(f"MTA lacks actions {REQUIRED_ACTIONS!r} or protocol"
                                      f" {REQUIRED_PROTOCOL!r}: {command!r}")
        wanted = REQUIRED_PROTOCOL | OPTIONAL_PROTOCOL
        for stage, flag in _NO_REPLY.items():
            if stage not in self._verdict_stages:
                wanted |= flag
        self.protocol = wanted & command.protocol
        self.state = State.CONNECTING
        reply += codec.encode_optneg(codec.MILTER_VERSION, REQUIRED_ACTIONS, self.protocol,
                                     self._macro_lists)
        events.append(Negotiated(codec.MILTER_VERSION, REQUIRED_ACTIONS, self.protocol))

    # --- helpers ---

    def _take_macros(self, code: bytes, message: MessageBuilder | None = None
                     ) -> dict[str, str]:
        """The macros Postfix sent just before this command; merged into the message."""
        macros = self._stage_macros.pop(code, {})
        if message is not None and macros:
            message.macros.update(macros)
            self._bounded(message.macros, "message macros")
        return macros

    def _bounded(self, macros: dict[str, str], what: str) -> dict[str, str]:
        return _bounded(macros, self._max_macros, self._max_macro_bytes, what)

    def _stage(self, stage: Stage, events: list[Event], reply: bytearray,
               make_event: Callable[[bool], Event]) -> None:
        needs_verdict = stage in self._verdict_stages
        if needs_verdict:
            self.pending = stage
        elif not self.protocol & _NO_REPLY[stage]:
            reply += codec.encode_response(Disposition.CONTINUE)
        events.append(make_event(needs_verdict))

    def _content_reply(self, code: bytes, reply: bytearray) -> None:
        if not self.protocol & _NO_REPLY_CONTENT[code]:
            reply += codec.encode_response(Disposition.CONTINUE)

    # --- output ---

    def send_verdict(self, verdict: Disposition | ReplyCode,
                     header_edits: Iterable[HeaderEdit] = ()) -> bytes:
        """Answer the pending event and return the bytes to write.

        Header edits are allowed only at end of message. Postfix applies them one by
        one and counts header indexes in the message as edited so far, so an inserted
        header would shift the indexes of ``Message.headers``: the ``ChangeHeader``
        edits therefore go first (in the given order; ``header_deletions()`` orders
        them highest index first), then the additions and insertions.
        """
        if self.pending is None:
            raise MilterUsageError("no event is waiting for a verdict")
        if not isinstance(verdict, (Disposition, ReplyCode)):
            raise MilterUsageError(f"not a verdict: {verdict!r}")
        edits = sorted(header_edits, key=lambda edit: not isinstance(edit, ChangeHeader))
        if edits and self.pending is not Stage.EOM:
            raise MilterUsageError("header edits are only possible at end of message")
        if not all(isinstance(edit, (AddHeader, InsertHeader, ChangeHeader)) for edit in edits):
            raise MilterUsageError(f"not header edits: {edits!r}")
        data = b"".join(map(codec.encode_response, (*edits, verdict)))
        stage, self.pending = self.pending, None
        if stage is Stage.EOM:
            self._message, self._stage_macros = MessageBuilder(self._bounds), {}
        elif stage in (Stage.CONNECT, Stage.HELO) and verdict is not Disposition.CONTINUE:
            self.state = State.CLOSED  # Postfix closes the connection (milter8_event)
        return data

    def send_progress(self) -> bytes:
        """Ask Postfix to keep waiting for the pending verdict (SMFIR_PROGRESS)."""
        if self.pending is None:
            raise MilterUsageError("no event is waiting for a verdict")
        return codec.encode_packet(codec.SMFIR_PROGRESS)
