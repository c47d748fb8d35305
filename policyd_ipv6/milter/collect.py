"""One message as a milter session collects it: envelope, headers and body, within bounds.

Contract: ``MessageBuilder(bounds)`` is an empty message. The session (``milter.session``)
sets ``sender`` and ``esmtp_args``, merges each stage's ``macros``, and calls
``add_recipient``, ``add_header`` and ``add_body`` in the order Postfix sends them;
``snapshot()`` returns the immutable ``events.Message`` handed out at end of message.

Bounds (``Bounds``): recipients stored (``max_recipients``; every one is counted in
``recipient_count``), headers kept (``max_headers``) and header plus body bytes
(``max_message_bytes``). Past the header or byte bound collection stops, the body is dropped
at once and ``too_large`` is set, so that a message is never judged on an incomplete copy.
Body bytes are always counted (``body_size``), but only kept when needed: ``wants_body()`` is
asked once, at the message's first body byte, and a false answer keeps none of it; a body
longer than ``max_body_kept`` keeps only its first ``max_body_kept + 1`` bytes (enough to
show it is longer: the DKIM check verifies no body over that size).
Marking: headers for which ``mark_header(name, value)`` holds are listed in ``marked`` (name
and index among the headers of that name, counted case-insensitively as Postfix does) past
those bounds too, up to ``max_marked``; one more makes ``marked`` None (the list would be
incomplete). Pure: no I/O, no Twisted, and nothing is raised.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from policyd_ipv6.milter.events import Header, HeaderRef, Message

__all__ = ["Bounds", "MessageBuilder", "DEFAULT_MAX_HEADERS", "DEFAULT_MAX_MESSAGE_BYTES",
           "DEFAULT_MAX_RECIPIENTS", "DEFAULT_MAX_MARKED", "DEFAULT_MAX_MACROS",
           "DEFAULT_MAX_MACRO_BYTES"]

DEFAULT_MAX_HEADERS = 1000
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # Postfix message_size_limit: 10240000
DEFAULT_MAX_RECIPIENTS = 1000  # Postfix smtpd_recipient_limit
# Marked headers kept per message: each costs one SMFIR_CHGHEADER at end of message. More
# means the list is incomplete (Message.marked None) and the caller refuses temporarily.
DEFAULT_MAX_MARKED = 10000
# Macros kept per connection and per message (milter.session): Postfix sends a few dozen
# short ones (the SETSYMLIST lists and main.cf's milter_*_macros), a few KiB at most.
DEFAULT_MAX_MACROS = 500
DEFAULT_MAX_MACRO_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one message may hold; see the module docstring."""

    max_headers: int = DEFAULT_MAX_HEADERS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    max_marked: int = DEFAULT_MAX_MARKED
    mark_header: Callable[[bytes, bytes], bool] | None = None
    wants_body: Callable[[], bool] | None = None  # None: every body is kept
    max_body_kept: int | None = None  # None: no bound but max_message_bytes


@dataclass(slots=True)
class MessageBuilder:
    """The message being received; see the module docstring."""

    bounds: Bounds
    sender: str | None = None
    esmtp_args: tuple[str, ...] = ()
    recipients: list[str] = field(default_factory=list)
    recipient_count: int = 0
    headers: list[Header] = field(default_factory=list)
    name_counts: dict[bytes, int] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    body_kept: int = 0  # bytes in body
    body_size: int = 0  # body bytes received
    keep_body: bool | None = None  # decided at the first body byte
    size: int = 0
    macros: dict[str, str] = field(default_factory=dict)
    too_large: bool = False
    marked: list | None = field(default_factory=list)

    def add_recipient(self, recipient: str) -> None:
        self.recipient_count += 1
        if len(self.recipients) < self.bounds.max_recipients:
            self.recipients.append(recipient)

    def add_header(self, name: bytes, value: bytes) -> None:
        bounds = self.bounds
        key = name.lower()  # Postfix matches header names with strncasecmp()
        self.name_counts[key] = index = self.name_counts.get(key, 0) + 1
        if (bounds.mark_header is not None and self.marked is not None
                and bounds.mark_header(name, value)):
            if len(self.marked) < bounds.max_marked:
                self.marked.append(HeaderRef(name, index))
            else:
                self.marked = None
        self.size += len(name) + len(value)
        if len(self.headers) >= bounds.max_headers or self.size > bounds.max_message_bytes:
            self.too_large, self.body = True, []  # free the memory now
        if not self.too_large:
            self.headers.append(Header(name, value, index))

    def add_body(self, chunk: bytes) -> None:
        bounds = self.bounds
        self.size += len(chunk)
        self.body_size += len(chunk)
        if self.size > bounds.max_message_bytes:
            self.too_large, self.body = True, []
        if not chunk or self.too_large:
            return
        if self.keep_body is None:
            self.keep_body = bounds.wants_body is None or bounds.wants_body()
        if not self.keep_body:
            return
        if bounds.max_body_kept is not None:
            room = bounds.max_body_kept + 1 - self.body_kept
            if room <= 0:
                return
            chunk = chunk[:room]
        self.body.append(chunk)
        self.body_kept += len(chunk)

    def snapshot(self) -> Message:
        """The message as received so far, immutable (the body joined into one bytes,
        which the builder then holds instead of its chunks: one copy, not two)."""
        body = b"".join(self.body)
        self.body = [body] if body else []
        return Message(self.sender, self.esmtp_args, tuple(self.recipients),
                       self.recipient_count, tuple(self.headers), body,
                       dict(self.macros), self.too_large,
                       None if self.marked is None else tuple(self.marked), self.body_size)
