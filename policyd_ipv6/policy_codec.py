"""Sans-IO codec for the Postfix SMTPD access policy delegation protocol.

Contract (Postfix SMTPD_POLICY_README, "Protocol description"; attr_scan_plain.c):
a request is a sequence of ``name=value`` lines, each ending in a bare ``\\n``, terminated by an
empty line; the reply is ``action=...`` followed by an empty line.

``PolicyDecoder.feed(data)`` takes any slice of the byte stream and returns the complete
requests it finished, as ``dict[str, str]``; bytes of an unfinished request are kept for the
next call. It raises ``PolicyProtocolError`` (and nothing else) for a stream that breaks the
protocol; after that the decoder is dead and the connection must be closed without a reply
(Postfix's failure contract: "log a warning and disconnect"). ``encode_reply(action)`` gives the
bytes of one reply.

This module does no I/O, knows no Twisted and makes no decision.
"""

from __future__ import annotations

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
        self._attributes: dict[str, str] = {}
        self._request_bytes = 0
        self._dead: PolicyProtocolError | None = None

    @property
    def pending(self) -> bool:
        """True while part of a request has been received but not its end."""
        return bool(self._buffer) or bool(self._attributes)

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
        self._buffer += data
        requests: list[dict[str, str]] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buffer[start:end])
            start = end + 1
            request = self._line(line)
            if request is not None:
                requests.append(request)
        del self._buffer[:start]
        if len(self._buffer) > MAX_LINE_BYTES:
            raise PolicyProtocolError(f"line longer than {MAX_LINE_BYTES} bytes")
        return requests

    def _line(self, line: bytes) -> dict[str, str] | None:
        if len(line) > MAX_LINE_BYTES:
            raise PolicyProtocolError(f"line longer than {MAX_LINE_BYTES} bytes")
        self._request_bytes += len(line) + 1
        if self._request_bytes > MAX_REQUEST_BYTES:
            raise PolicyProtocolError(f"request longer than {MAX_REQUEST_BYTES} bytes")
        if not line:
            return self._finish()
        name, sep, value = line.partition(b"=")
        if not sep:
            raise PolicyProtocolError("line without '=': " + _show(line))
        if not name:
            raise PolicyProtocolError("attribute without a name")
        if b"\0" in line:
            raise PolicyProtocolError("NUL byte in attribute " + _show(name))
        key = name.decode("utf-8", "replace")
        if key in self._attributes:
            raise PolicyProtocolError("attribute sent twice: " + _show(name))
        if len(self._attributes) >= MAX_ATTRIBUTES:
            raise PolicyProtocolError(f"more than {MAX_ATTRIBUTES} attributes")
        # Postfix sends UTF-8 (SMTPUTF8) or ASCII; anything else is replaced, not trusted.
        self._attributes[key] = value.decode("utf-8", "replace")
        return None

    def _finish(self) -> dict[str, str]:
        request, self._attributes, self._request_bytes = self._attributes, {}, 0
        kind = request.get("request")
        if kind != REQUEST_TYPE:
            raise PolicyProtocolError(
                f"request attribute is {_show((kind or '').encode())!s}, not {REQUEST_TYPE}"
            )
        return request


def encode_reply(action: str) -> bytes:
    """Encode ``action=<action>`` and the terminating empty line.

    Raises ValueError for an empty action (Postfix would treat it as OK, a permit:
    smtpd_check.c "has empty value") or one containing a line break or NUL.
    """
    if not action or action.strip() != action:
        raise ValueError(f"invalid policy action {action!r}")
    if any(ch in action for ch in "\r\n\0"):
        raise ValueError(f"policy action contains a line break or NUL: {action!r}")
    return b"action=" + action.encode("utf-8") + b"\n\n"


def _show(raw: bytes, limit: int = 64) -> str:
    """A printable, bounded rendering of untrusted bytes for error messages."""
    text = raw[:limit].decode("ascii", "backslashreplace")
    text = "".join(ch if 32 <= ord(ch) < 127 else f"\\x{ord(ch):02x}" for ch in text)
    return repr(text + ("..." if len(raw) > limit else ""))
