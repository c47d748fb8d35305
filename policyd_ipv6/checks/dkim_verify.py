"""The CPU part of DKIM (RFC 6376) with dkimpy, bounded, and the worker that runs it.

Contract: pure functions over bytes; no Twisted, no DNS, no I/O except ``main()``.

- ``split_message(message)`` returns ``(head_end, body_start)``: where the header block ends
  and the body begins (the first empty line; CRLF or LF).
- ``parse_signatures(head, limit)`` returns, for the first ``limit`` DKIM-Signature fields
  of a header block, ``(index, tags)`` with ``tags`` a dict of ``s d b a l c`` (bytes,
  absent tags missing) or ``(index, text)`` for a signature dkimpy refuses (malformed,
  expired, unknown algorithm). Never raises.
- ``verify_all(head, body, jobs)`` returns ``{index: (result, reason)}`` for each job
  ``(index, key name, key record)``: ``pass``, ``fail``, ``permerror``, or ``policy`` for a
  signature that verifies but whose ``l=`` covers less than the canonical body (RFC 6376
  §8.2: the unsigned rest could say anything). Never raises: hostile input is a permerror.
- ``key_problem(record)`` says why a key record's RSA key must not be used (see the bounds
  below), or None; ``verify_all`` gives such a signature a permerror with that reason.
- ``main()`` is a verification worker: length-prefixed requests on standard input
  (``encode_request``), one JSON answer each on standard output (``decode_answer``), until
  standard input closes. ``dkim_pool`` runs it in separate processes.

Bounds, so that one message costs time and memory proportional to its size, whatever it holds:

- dkimpy's relaxed body canonicalisation strips trailing whitespace with the regular
  expression ``[\\t ]+\\r\\n``, which is quadratic on long runs of spaces (2.7 s per MB per
  signature on lines of 990 spaces). For ``c=.../relaxed`` signatures the body is first
  reduced as RFC 6376 §3.4.4 says (every run of WSP becomes one SP, linear), which leaves
  dkimpy's own reduction nothing quadratic to do and its result unchanged: dkimpy strips
  runs before CRLF then compresses runs, and compressing first yields the same bytes.
- The body is handed to dkimpy as its ``body`` attribute (what ``DKIM.set_message`` sets in
  dkimpy 1.1.4 to 1.1.8) with line ends made CRLF exactly as dkimpy's ``rfc822_parse`` would,
  instead of dkimpy splitting the whole message into lines (a second and third copy). Peak
  memory of one verification is then about three times the body.
- The key record is checked before dkimpy sees it (``key_problem``): dkimpy's RSA is Python's
  ``pow(signature, exponent, modulus)`` with no bound on either, so a key with an 8192-bit
  exponent costs over a second per signature. An RSA key over ``MAX_KEY_BITS`` (RFC 8301
  §3.2 asks verifiers to handle 1024 to 4096 bits), or whose public exponent is over 2^32,
  even or under 3, is a permerror without being used. dkimpy's own parser reads the key (so
  both see the same numbers), only once ``p=`` is at most ``MAX_KEY_P_BYTES``: it builds
  integers byte by byte, quadratic in their length (0.3 s for 60 KB).
- The size caps and the number of signatures are the caller's (``dkim``): it never sends more
  than it allows.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys

import dkim
from dkim.canonicalization import (
    CanonicalizationPolicy,
    Relaxed,
    correct_empty_body,
    strip_trailing_lines,
)
from dkim.util import parse_tag_value

__all__ = ["become", "split_message", "parse_signatures", "verify_all", "key_problem",
           "collapse_wsp", "relaxed_body", "install_linear_relaxed",
           "encode_request", "read_request", "encode_answer", "decode_answer", "main"]

# RFC 8301 §3.2: verifiers MUST handle RSA keys of 1024 to 4096 bits; larger ones cost more
# CPU per signature than a message may take. A 4096-bit key's p= is 736 bytes of base64; at
# this bound dkimpy's parse costs at most 2 ms, and a 16384-bit key (e=65537, 2.8 KB) is still
# refused with its size in bits.
MAX_KEY_BITS = 4096
MAX_KEY_P_BYTES = 4 * 1024
# RFC 8017 §3.1: e is odd and at least 3; real keys use 65537. Over 2^32, pow() is slow.
MAX_KEY_EXPONENT = 1 << 32

_WSP_RUN = re.compile(rb"[\t ]+")
_LINE_END = re.compile(rb"\r?\n")
_NOT_WSP_CR = re.compile(rb"[^ \t\r]")
_CHUNK = 64 * 1024
# A frame header: lengths of the JSON part, of the header block and of the body.
_FRAME = struct.Struct(">III")
MAX_JSON_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 64 << 20


class _Notes:
    """A logger for dkimpy that keeps its error messages as the failure reason."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, message, *args) -> None:
        self.errors.append(str(message))

    warning = info = error

    def debug(self, *args, **kwargs) -> None:
        pass


def split_message(message: bytes) -> tuple[int, int]:
    """(end of the header block, start of the body); both len(message) without an empty line.
    ``bytes.find`` rather than a regular expression: it runs at memory speed on 16 MB."""
    crlf = message.find(b"\n\r\n")
    # Only up to the CRLF one: a CRLF message would otherwise be scanned to its end.
    lf = message.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(message))
    ends = [(i, 3) for i in (crlf,) if i >= 0] + [(i, 2) for i in (lf,) if i >= 0]
    if not ends:
        return len(message), len(message)
    at, width = min(ends)
    head_end = at - 1 if at > 0 and message[at - 1:at] == b"\r" else at
    return head_end, at + width


def parse_signatures(head: bytes, limit: int) -> list[tuple[int, dict[bytes, bytes] | str]]:
    """See the module docstring. ``head`` is the header block without its empty line."""
    try:
        parsed = dkim.DKIM(head + b"\r\n\r\n", logger=_Notes())
        count = sum(1 for name, _ in parsed.headers if name.lower() == b"dkim-signature")
    except Exception as error:  # hostile header syntax
        return [(0, f"unparsable header ({error.__class__.__name__})")]
    out: list[tuple[int, dict[bytes, bytes] | str]] = []
    for idx in range(min(count, limit)):
        try:
            sig = parsed.verify_headerprep(idx)[0]
            out.append((idx, {tag: sig[tag] for tag in (b"s", b"d", b"b", b"a", b"l", b"c")
                              if tag in sig}))
        except Exception as error:  # malformed, expired or unsupported signature
            out.append((idx, f"{error.__class__.__name__}: {error}"))
    return out


def _chunked(body: bytes, step) -> bytes:
    """``step`` applied to pieces of about ``_CHUNK`` bytes, joined. A piece ends just after
    a byte that is not SP, HTAB or CR, so no run of WSP and no WSP+CRLF sequence is cut.
    One ``re.sub`` over the whole body would hold a list of every piece between matches
    (about ten times the body for ordinary text, a match per space)."""
    pieces = []
    pos = 0
    while pos < len(body):
        found = _NOT_WSP_CR.search(body, pos + _CHUNK) if pos + _CHUNK < len(body) else None
        end = found.start() + 1 if found else len(body)
        pieces.append(step(body[pos:end]))
        pos = end
    return b"".join(pieces)


def collapse_wsp(body: bytes) -> bytes:
    """Every run of SP/HTAB as one SP (RFC 6376 §3.4.4 b), in linear time and memory."""
    return _chunked(body, lambda piece: _WSP_RUN.sub(b" ", piece))


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 relaxed body canonicalisation, byte for byte what dkimpy's
    ``Relaxed.canonicalize_body`` returns (runs compressed first, then the single SP before
    each CRLF removed: the same bytes as dkimpy's strip-then-compress), in linear time and
    about three times the body in memory."""
    stripped = _chunked(body, lambda piece: _WSP_RUN.sub(b" ", piece).replace(b" \r\n",
                                                                                b"\r\n"))
    return correct_empty_body(strip_trailing_lines(stripped))


def install_linear_relaxed() -> None:
    """Make dkimpy's relaxed body canonicalisation ``relaxed_body``: for the worker
    processes, which exist only to run dkimpy. dkimpy has no hook for it, and its own keeps
    a piece per space of the body (ten times the body) and is quadratic on long runs."""
    Relaxed.canonicalize_body = staticmethod(relaxed_body)


def _crlf(body: bytes) -> bytes:
    # dkimpy's rfc822_parse splits on \r?\n and joins with \r\n: the same bytes, one copy.
    if body.count(b"\n") == body.count(b"\r\n"):
        return body
    return _LINE_END.sub(b"\r\n", body)


def _relaxed_body(sig_c: bytes | None) -> bool:
    parts = (sig_c or b"simple/simple").split(b"/")
    return len(parts) == 2 and parts[1].strip().lower() == b"relaxed"


def verify_all(head: bytes, body: bytes, jobs) -> dict[int, tuple[str, str]]:
    """See the module docstring. ``jobs``: (index, key name, key record) as bytes."""
    return _verify_owned(head, [body], jobs)


def _verify_owned(head: bytes, holder: list, jobs) -> dict[int, tuple[str, str]]:
    # ``holder`` holds the only reference to the body: it is emptied, so that the body as
    # received is freed once the relaxed copy exists.
    notes = _Notes()
    try:
        verifier = dkim.DKIM(head + b"\r\n\r\n", logger=notes)
        sigs = {idx: verifier.verify_headerprep(idx)[0] for idx, _, _ in jobs}
    except Exception as error:
        holder.clear()
        return {idx: ("permerror", f"unparsable message ({error.__class__.__name__})")
                for idx, _, _ in jobs}
    body = _crlf(holder.pop())
    out: dict[int, tuple[str, str]] = {}
    # Simple-body signatures first, on the body as received; then the body is reduced once
    # for every relaxed one and the original dropped, so at most two copies live at a time.
    simple = [job for job in jobs if not _relaxed_body(sigs[job[0]].get(b"c"))]
    relaxed = [job for job in jobs if _relaxed_body(sigs[job[0]].get(b"c"))]
    for group in (simple, relaxed):
        if not group:
            continue
        if group is relaxed:
            verifier.body = b""
            body = collapse_wsp(body)
        verifier.body = body  # what DKIM.set_message sets (dkimpy 1.1.4-1.1.8)
        for idx, name, record in group:
            out[idx] = _verify_one(verifier, notes, idx, name, record, sigs[idx], body)
    return out


def key_problem(record: bytes) -> str | None:
    """Why the RSA key in ``record`` (a DKIM key record) must not be used, or None: its
    modulus is over ``MAX_KEY_BITS``, its public exponent over ``MAX_KEY_EXPONENT``, even or
    under 3, or its ``p=`` is over ``MAX_KEY_P_BYTES``. None also for a record dkimpy refuses
    by itself before any RSA work (syntax, base64, ASN.1) and for ed25519 keys (32 bytes, a
    fixed cost). Costs a few milliseconds at most, whatever the record holds."""
    try:
        tags = parse_tag_value(record)
    except Exception:  # dkimpy's evaluate_pk raises on the same parse: no RSA follows
        return None
    if tags.get(b"k", b"rsa") == b"rsa" and len(tags.get(b"p", b"")) > MAX_KEY_P_BYTES:
        return (f"key too large: p= of {len(tags[b'p'])} bytes "
                f"(RFC 8301: keys up to {MAX_KEY_BITS} bits)")
    try:
        # What DKIM.verify itself calls on the record (dkimpy 1.1.4 to 1.1.8): same numbers.
        key, bits, algorithm = dkim.evaluate_pk(b"", record)[:3]
    except Exception:  # dkimpy raises the same when verifying: no RSA follows
        return None
    if algorithm != b"rsa":
        return None
    if bits > MAX_KEY_BITS:
        return f"key too large: {bits} bits (RFC 8301: up to {MAX_KEY_BITS})"
    exponent = key["publicExponent"]
    if exponent > MAX_KEY_EXPONENT:
        return f"unusable key: public exponent of {exponent.bit_length()} bits (over 2^32)"
    if exponent < 3 or exponent % 2 == 0:
        return f"unusable key: public exponent {exponent} (RFC 8017: odd, at least 3)"
    return None


def _verify_one(verifier, notes: _Notes, idx: int, name: bytes, record: bytes, sig,
                body: bytes) -> tuple[str, str]:
    notes.errors.clear()
    problem = key_problem(record)
    if problem is not None:  # never handed to dkimpy: its RSA is unbounded
        return ("permerror", problem)
    try:
        valid = verifier.verify(idx, dnsfunc=lambda n, timeout=5: record if n == name else None)
    except dkim.ValidationError as error:  # "body hash mismatch" and the like
        return ("fail", str(error))
    except Exception as error:  # key or message format; hostile input
        return ("permerror", f"{error.__class__.__name__}: {error}")
    if not valid:
        if notes.errors:  # dkimpy logs key problems and returns False
            return ("permerror", notes.errors[-1])
        return ("fail", "signature does not verify")
    if b"l" in sig:
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
            length = len(policy.canonicalize_body(body))
        except Exception as error:
            return ("permerror", f"{error.__class__.__name__}: {error}")
        if int(sig[b"l"]) < length:
            return ("policy", f"l={int(sig[b'l'])} signs {int(sig[b'l'])} of {length} body "
                              "bytes (RFC 6376 8.2)")
    return ("pass", "")


# -- the worker's framing ------------------------------------------------------------------

def encode_request(request: dict, message_length: int) -> bytes:
    """The frame header and JSON for ``request``; the message's bytes follow it, in two
    parts: ``request["body_start"]`` bytes of header block, then the body."""
    data = json.dumps(request).encode("utf-8")
    head_length = request.get("body_start", 0)
    return _FRAME.pack(len(data), head_length, message_length - head_length) + data


def read_request(stream):
    """[request, head, body] from a binary stream, or None at end of input; raises
    ValueError on a frame the parent would never send."""
    prefix = stream.read(_FRAME.size)
    if len(prefix) < _FRAME.size:
        return None
    json_length, head_length, body_length = _FRAME.unpack(prefix)
    if json_length > MAX_JSON_BYTES or head_length + body_length > MAX_PAYLOAD_BYTES:
        raise ValueError("frame too large")
    request = json.loads(stream.read(json_length))
    head = stream.read(head_length)
    body = stream.read(body_length)
    if len(head) + len(body) != head_length + body_length:
        return None
    return [request, head, body]


def encode_answer(answer) -> bytes:
    data = json.dumps(answer).encode("utf-8")
    return _FRAME.pack(len(data), 0, 0) + data


def decode_answer(buffer: bytearray):
    """The first complete answer in ``buffer`` (removed from it), or None; raises ValueError
    when the worker sends something over ``MAX_JSON_BYTES``."""
    if len(buffer) < _FRAME.size:
        return None
    json_length, _, _ = _FRAME.unpack_from(buffer)
    if json_length > MAX_JSON_BYTES:
        raise ValueError("answer too large")
    end = _FRAME.size + json_length
    if len(buffer) < end:
        return None
    answer = json.loads(bytes(buffer[_FRAME.size:end]))
    del buffer[:end]
    return answer


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _handle(received: list):
    # ``received`` is [request, head, body]; the body is taken out of it (see _verify_owned).
    request, head = received[0], received[1]
    if request["job"] == "parse":
        return [[idx, found if isinstance(found, str)
                 else {_text(k): _text(v) for k, v in found.items()}]
                for idx, found in parse_signatures(head, int(request["limit"]))]
    jobs = [(int(idx), name.encode("latin-1"), record.encode("latin-1"))
            for idx, name, record in request["jobs"]]
    head = head[:int(request["head_end"])]
    verified = _verify_owned(head, [received.pop()], jobs)
    return [[idx, result, reason] for idx, (result, reason) in verified.items()]


def become(args: list[str]) -> None:
    """In a worker started as root: drop to ``[uid, gid, name]`` now that everything is
    imported, before any job is read; exit (status 3) if that fails. Not root: nothing to do
    (the worker already runs as the daemon's user)."""
    if not args or os.geteuid() != 0:
        return
    uid, gid, name = int(args[0]), int(args[1]), args[2]
    try:
        os.initgroups(name, gid)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as error:
        print(f"dkim worker: cannot drop privileges to {name}: {error}", file=sys.stderr)
        sys.exit(3)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        print(f"dkim worker: still privileged after dropping to {name}", file=sys.stderr)
        sys.exit(3)


def main() -> int:
    """The worker loop (see the module docstring); returns the exit status."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    install_linear_relaxed()
    sys.stdout = sys.stderr  # nothing but answers may reach the answer stream
    while True:
        try:
            received = read_request(stdin)
        except ValueError as error:
            print(f"dkim worker: bad request: {error}", file=sys.stderr)
            return 2
        if received is None:
            return 0
        try:
            answer = {"ok": _handle(received)}
        except Exception as error:  # a bug, not hostile input: verify_all never raises
            answer = {"error": f"{error.__class__.__name__}: {error}"[:300]}
        del received
        stdout.write(encode_answer(answer))
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
