"""One message as a milter session collects it: envelope, headers and body, within bounds.

Contract: ``MessageBuilder(bounds)`` is an empty message. The session (``milter.session``)
sets ``sender`` and ``esmtp_args``, merges each stage's ``macros``, and calls
``add_recipient``, ``add_header`` and ``add_body`` in the order Postfix sends them;
``snapshot()`` returns the immutable ``events.Message`` handed out at end of message.

Bounds (``Bounds``): recipients stored (``max_recipients``; every one is counted in
``recipient_count``), headers kept (``max_headers``) and header plus body bytes
(``max_message_bytes``). Past the header or byte bound collection stops, the body is dropped
at once and ``too_large`` is set, so that a message is never judged on an incomplete copy.
Marking: headers for which ``mark_header(name, value)`` holds are listed in ``marked`` (name
and index among the headers of that name, counted case-insensitively as Postfix does) past
those bounds too, up to ``max_marked``; one more makes ``marked`` None (the list would be
incomplete). Pure: no I/O, no Twisted, and nothing is raised.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from policyd_ipv6.milter.events import Header, HeaderRef, Message

__all__ = ["Bounds", "MessageBuilder", "DEFAULT_MAX_HEADERS", "DEFAULT_MAX_MESSAGE_BYTES",
           "DEFAULT_MAX_RECIPIENTS", "DEFAULT_MAX_MARKED"]

DEFAULT_MAX_HEADERS = 1000
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # Postfix message_size_limit: 10240000
DEFAULT_MAX_RECIPIENTS = 1000  # Postfix smtpd_recipient_limit
# Marked headers kept per message: each costs one SMFIR_CHGHEADER at end of message. More
# means the list is incomplete (Message.marked None) and the caller refuses temporarily.
DEFAULT_MAX_MARKED = 10000


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one message may hold; see the module docstring."""

    max_headers: int = DEFAULT_MAX_HEADERS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    max_marked: int = DEFAULT_MAX_MARKED
    mark_header: Callable[[bytes, bytes], bool] | None = None


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
        self.size += len(chunk)
        if self.size > self.bounds.max_message_bytes:
            self.too_large, self.body = True, []
        if chunk and not self.too_large:
            self.body.append(chunk)

    def snapshot(self) -> Message:
        """The message as received so far, immutable (the body joined into one bytes)."""
        return Message(self.sender, self.esmtp_args, tuple(self.recipients),
                       self.recipient_count, tuple(self.headers), b"".join(self.body),
                       dict(self.macros), self.too_large,
                       None if self.marked is None else tuple(self.marked))
