"""``check --via ENDPOINT``: ask a running daemon over the policy protocol, as Postfix does.

Contract: ``parse_endpoint(text)`` turns ``unix:PATH`` or ``tcp:HOST:PORT`` (HOST a name, an
IPv4 address, or an IPv6 address with or without brackets) into ``("unix", PATH)`` or
``("tcp", (HOST, PORT))``, raising ``ValueError`` with the endpoint in its message otherwise.
``ask(endpoint, requests, timeout)`` sends each request (``name=value`` lines and an empty
line, SMTPD_POLICY_README) on one connection, one at a time, and returns the ``action=``
values in order; it raises ``ViaError`` naming the endpoint when it cannot connect, the
daemon closes without a reply (its failure contract: a malformed request, or an internal
fault), the reply has no ``action=``, or ``timeout`` seconds pass. Blocking sockets: this is a
command-line client, never part of the daemon. No Twisted.
"""

from __future__ import annotations

import socket

__all__ = ["ViaError", "parse_endpoint", "ask", "encode_request"]

MAX_REPLY = 8192  # Postfix reads at most 4 * line_length_limit for the action


class ViaError(Exception):
    """The running daemon did not answer; the message names the endpoint and why."""


def parse_endpoint(text: str):
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", (host, int(port))
    raise ValueError(f"--via {text}: not unix:PATH or tcp:HOST:PORT")


def encode_request(request: dict[str, str]) -> bytes:
    """The request as Postfix writes it: ``name=value`` lines, then an empty line."""
    return "".join(f"{name}={value}\n" for name, value in request.items()).encode() + b"\n"


def _connect(endpoint, timeout: float) -> socket.socket:
    kind, where = endpoint
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(where)
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection(where, timeout=timeout)


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while b"\n\n" not in data:
        if len(data) > MAX_REPLY:
            raise ViaError("a reply longer than %d bytes" % MAX_REPLY)
        chunk = sock.recv(4096)
        if not chunk:
            raise ViaError("the daemon closed the connection without a reply (it does so "
                           "for a malformed request or an internal fault: see its log)")
        data += chunk
    return data.split(b"\n\n", 1)[0]


def ask(text: str, requests: list[dict[str, str]], timeout: float = 100.0) -> list[str]:
    endpoint = parse_endpoint(text)
    try:
        sock = _connect(endpoint, timeout)
    except OSError as error:
        raise ViaError(f"--via {text}: cannot connect ({error.strerror or error})") from None
    replies = []
    with sock:
        for request in requests:
            try:
                sock.sendall(encode_request(request))
                block = _reply(sock)
            except ViaError as error:
                raise ViaError(f"--via {text}: {error}") from None
            except OSError as error:
                raise ViaError(f"--via {text}: {error.strerror or error}") from None
            for line in block.decode("utf-8", "backslashreplace").split("\n"):
                if line.startswith("action="):
                    replies.append(line[len("action="):])
                    break
            else:
                raise ViaError(f"--via {text}: a reply without action=: {block[:200]!r}")
    return replies
