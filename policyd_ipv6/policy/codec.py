"""Sans-IO codec for the Postfix SMTPD access policy delegation protocol.

Contract (Postfix SMTPD_POLICY_README, "Protocol description"; attr_scan_plain.c):
a request is a sequence of ``name=value`` lines, each ending in a bare ``\\n``, terminated by an
empty line; the reply is ``action=...`` followed by an empty line. A line may also end in
``\\r\\n`` (a person testing with telnet or nc -C): the CR is dropped. Each line is checked as
soon as it is complete, so a line that is not ``name=value`` closes the connection at once,
not at the end of a request that may never come.

``PolicyDecoder.feed(data)`` takes any slice of the byte stream and returns the complete
requests it finished, as ``dict[str, str]``; bytes of an unfinished request are kept for the
next call. It raises ``PolicyProtocolError`` (and nothing else) for a stream that breaks the
protocol; after that the decoder is dead and the connection must be closed without a reply
(Postfix's failure contract: "log a warning and disconnect"). ``encode_reply(action)`` gives the
bytes of one reply.

This module does no I/O, knows no Twisted and makes no decision.
"""

from __future__ import annotations

from itertools import repeat

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_ATTRIBUTES",
    "MAX_REQUEST_BYTES",
    "PolicyDecoder",
    "PolicyProtocolError",
    "encode_reply",
]

# Postfix bounds each attribute string by 4 * line_length_limit (default 2048, so 8192 bytes,
# attr_scan_plain.c); a line holds a name, "=" and a value, so twice that is generous.
MAX_LINE_BYTES = 16384
# Postfix 3.x sends about 30 attributes; room for future ones, not for a flood.
MAX_ATTRIBUTES = 100
# A whole request, bounded so that one connection cannot hold much memory.
MAX_REQUEST_BYTES = 65536

REQUEST_TYPE = "smtpd_access_policy"


class PolicyProtocolError(Exception):
    """The peer broke the policy protocol; close the connection without a reply."""


class PolicyDecoder:
    """Incremental parser: bytes in, complete requests out."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scan = 0  # where to look for the end of the request next
        self._line_length = 0  # length of the unfinished last line
        self._checked = 0  # the unfinished request's complete lines before this were checked
        self._cr = False  # the last slice ended in a CR, held back in case an LF follows
        self._dead: PolicyProtocolError | None = None

    @property
    def pending(self) -> bool:
        """True while part of a request has been received but not its end."""
        return bool(self._buffer) or self._cr

    def feed(self, data: bytes) -> list[dict[str, str]]:
        """Consume ``data``; return the requests it completed, in order.

        Raises PolicyProtocolError for a malformed stream (and again on every later call).
        """
        if self._dead is not None:
            raise self._dead
        try:
            return self._feed(data)
        except PolicyProtocolError as error:
            self._dead = error
            raise

    def _feed(self, data: bytes) -> list[dict[str, str]]:
        # Whole requests are cut out with one search for the empty line and parsed in one go:
        # a request is ~30 short lines, and a Python step per byte or per line would cost
        # more than the decision itself.
        if (not self._buffer and not self._cr and data[-2:] == b"\n\n" and data[:1] != b"\n"
                and data.find(b"\n\n") == len(data) - 2 and b"\r" not in data):
            # One whole request in one read, as Postfix sends it: parse it in place.
            self._line_length = 0
            return [_parse(data[:-2])]
        if self._cr:
            data, self._cr = b"\r" + data, False
        if b"\r" in data:  # CR LF line ends (telnet): one search, not a step per byte
            if data.endswith(b"\r"):
                data, self._cr = data[:-1], True
            data = data.replace(b"\r\n", b"\n")
        buffer = self._buffer
        buffer += data
        newline = data.rfind(b"\n")
        self._line_length = (self._line_length + len(data) if newline < 0
                             else len(data) - newline - 1)
        requests: list[dict[str, str]] = []
        while buffer:
            if buffer[0] == 10:  # an empty line at the start: an empty request
                block, consumed = b"", 1
            else:
                end = buffer.find(b"\n\n", self._scan)
                if end < 0:
                    self._scan = max(0, len(buffer) - 1)
                    break
                block, consumed = bytes(buffer[:end]), end + 2
            del buffer[:consumed]
            self._scan = 0
            self._checked = 0
            requests.append(_parse(block))
        if buffer:
            # Another protocol (an HTTP probe, a port scanner) or a typing person shows itself
            # on a line: close at once instead of waiting for an empty line that may never
            # come. Only the lines of an unfinished request get here, each once.
            last = buffer.rfind(b"\n")
            if last >= self._checked:
                for line in bytes(buffer[self._checked:last]).split(b"\n"):
                    _check_line(line)
                self._checked = last + 1
        if self._line_length > MAX_LINE_BYTES:
            raise PolicyProtocolError(f"line longer than {MAX_LINE_BYTES} bytes")
        if len(buffer) > MAX_REQUEST_BYTES:
            raise PolicyProtocolError(f"request longer than {MAX_REQUEST_BYTES} bytes")
        return requests


def _check_line(line: bytes) -> None:
    """Raise PolicyProtocolError unless ``line`` can be a ``name=value`` attribute."""
    if b"=" not in line:
        raise PolicyProtocolError("line without '=': " + _show(line))
    if line.startswith(b"="):
        raise PolicyProtocolError("attribute without a name")
    if b"\0" in line:
        raise PolicyProtocolError("NUL byte in attribute " + _show(line.partition(b"=")[0]))


def _parse(block: bytes) -> dict[str, str]:
    """One request's lines (without the empty line) to attributes; PolicyProtocolError if bad."""
    if len(block) + 2 > MAX_REQUEST_BYTES:
        raise PolicyProtocolError(f"request longer than {MAX_REQUEST_BYTES} bytes")
    if not block:
        raise PolicyProtocolError("empty request (no request attribute)")
    # Postfix sends UTF-8 (SMTPUTF8) or ASCII; anything else is replaced, not trusted.
    lines = block.decode("utf-8", "replace").split("\n")
    count = len(lines)
    if count > MAX_ATTRIBUTES:
        raise PolicyProtocolError(f"more than {MAX_ATTRIBUTES} attributes")
    if len(block) > MAX_LINE_BYTES and max(map(len, block.split(b"\n"))) > MAX_LINE_BYTES:
        raise PolicyProtocolError(f"line longer than {MAX_LINE_BYTES} bytes")
    if b"\0" in block:
        raise PolicyProtocolError("NUL byte in attribute " + _show(
            next(line for line in block.split(b"\n") if b"\0" in line).partition(b"=")[0]))
    try:
        # line.split("=", 1) for every line, looped in C (map), not in a comprehension.
        attributes = dict(map(str.split, lines, repeat("=", count), repeat(1, count)))
    except ValueError:  # a line without "=" gives a one-element pair
        bad = next(raw for raw in block.split(b"\n") if b"=" not in raw)
        raise PolicyProtocolError("line without '=': " + _show(bad)) from None
    if "" in attributes:
        raise PolicyProtocolError("attribute without a name")
    if len(attributes) != count:
        seen: set[str] = set()
        for name in (line.partition("=")[0] for line in lines):  # the first name sent twice
            if name in seen:
                raise PolicyProtocolError("attribute sent twice: " + _show(name.encode()))
            seen.add(name)
    kind = attributes.get("request")
    if kind != REQUEST_TYPE:
        raise PolicyProtocolError(
            f"request attribute is {_show((kind or '').encode())!s}, not {REQUEST_TYPE}")
    return attributes


def encode_reply(action: str) -> bytes:
    """Encode ``action=<action>`` and the terminating empty line.

    Raises ValueError for an empty action (Postfix would treat it as OK, a permit:
    smtpd_check.c "has empty value") or one containing a line break or NUL.
    """
    if action == "DUNNO":  # nine replies in ten
        return _DUNNO
    if not action or action.strip() != action:
        raise ValueError(f"invalid policy action {action!r}")
    if any(ch in action for ch in "\r\n\0"):
        raise ValueError(f"policy action contains a line break or NUL: {action!r}")
    return b"action=" + action.encode("utf-8") + b"\n\n"


_DUNNO = b"action=DUNNO\n\n"


def _show(raw: bytes, limit: int = 64) -> str:
    """A printable, bounded rendering of untrusted bytes for error messages."""
    text = raw[:limit].decode("ascii", "backslashreplace")
    text = "".join(ch if 32 <= ord(ch) < 127 else f"\\x{ord(ch):02x}" for ch in text)
    return repr(text + ("..." if len(raw) > limit else ""))
