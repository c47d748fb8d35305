"""The DKIM check (RFC 6376, RFC 8301) with dkimpy: a bounded number of signatures, keys
fetched first, the CPU work in worker processes.

Contract: ``check_dkim(lookups, message, pool=None)`` returns a Deferred that always fires
(never fails) with a ``DkimFact``:

- ``pass``: at least one DKIM-Signature verifies (``domain``/``selector`` name the first that
  does). Which domain signed does not matter (EOP asks for "DKIM validation", not alignment);
- ``temperror``: none verifies, and a key could not be fetched because of a transient DNS
  fault, or the verification could not run (worker pool full, worker hung or died): the
  sender should retry, so a temporary reply (451 4.4.3), never a refusal and never a pass;
- ``none``: not signed, or signed only with keys in testing mode (``t=y``: RFC 6376 §3.6.1,
  verifiers "MUST NOT treat messages from Signers in testing mode differently from unsigned
  email");
- ``fail``: signed, none valid (bad signature, altered body, missing, unusable or too large key,
  malformed or expired signature, or only ``policy`` results).

``signatures`` holds one ``SignatureResult`` per signature listed, for the
Authentication-Results header and the log. ``policy`` (RFC 8601 §2.7.1) marks a signature
that is not acceptable or was not verified, with the reason:

- ``a=rsa-sha1``: RFC 8301 §3.1, verifiers MUST NOT consider it valid (not even verified);
- a key with ``t=y`` (see ``none`` above);
- ``l=`` shorter than the canonical body (``dkim_verify``);
- beyond ``MAX_SIGNATURES`` signatures needing a key: not verified;
- a body over ``MAX_BODY_BYTES``: not verified. Such a message is then treated as unsigned
  with a failed signature: if SPF passed it is accepted (DKIM does not matter), if SPF failed
  it gets the ``auth_failed`` reply, as a message over the milter's collection bound does.
  Not "temperror": retrying would bring the same message and the same answer, and the sender
  would retry for days before bouncing; not a pass: an unverified signature proves nothing.

Why keys first: dkimpy is synchronous and would look the key up itself, blocking. The
signatures are parsed from the header block, each key record (TXT at
``selector._domainkey.domain``) is fetched through the daemon's own ``Lookups``, all at once;
dkimpy then only sees the fetched record, and only if its key is bounded
(``dkim_verify.key_problem``: an RSA key over 4096 bits, or with a public exponent over 2^32,
is a permerror without being used); a key reply over ``MAX_KEY_REPLY_BYTES`` is not read (a
permerror too). dkimpy reports a DNS timeout as an ordinary failure
(DKIM.verify_sig catches DnsTimeoutError); fetching first keeps "temporary" apart.

Where the CPU work runs: with a ``dkim_pool.DkimPool``, a header block over
``INLINE_HEAD_BYTES`` is parsed by a worker, and verification whose body bytes times
signatures exceed ``INLINE_WORK_BYTES`` runs in a worker; the rest runs inline, on the
reactor, for under a few milliseconds. With ``pool=None`` (``policyd-ipv6 check``, tests)
everything runs inline. Every exception dkimpy raises on hostile input is a failed signature.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from policyd_ipv6.checks.dkim_pool import PoolBusy, WorkerLost
from policyd_ipv6.checks.dkim_verify import parse_signatures, split_message, verify_all
from policyd_ipv6.facts import DkimFact, SignatureResult
from policyd_ipv6.text import printable
from policyd_ipv6.vocabulary import Answer, DkimResult, DnsStatus, Lookups

_log = Logger(namespace="policyd-ipv6")

__all__ = ["check_dkim", "DkimFact", "SignatureResult", "MAX_SIGNATURES", "MAX_LISTED",
           "MAX_BODY_BYTES"]

# Fixed here rather than in the configuration. Real mail carries one to three signatures
# (author domain, ESP, mailing list): at most five are verified (five key lookups, five
# body hashes), and at most ten are listed in Authentication-Results.
MAX_SIGNATURES = 5
MAX_LISTED = 10
# Body bytes handed to dkimpy at most: bounds the CPU (five hashes of 4 MiB are well under a
# second) and the memory of one verification (about three times the body).
MAX_BODY_BYTES = 4 * 1024 * 1024
# On the reactor: parsing a 16 KiB header block costs under a millisecond; hashing 64 KiB of
# body (all signatures together) a few milliseconds.
INLINE_HEAD_BYTES = 16 * 1024
INLINE_WORK_BYTES = 64 * 1024
# A key record's TXT reply, in bytes on the wire: a 4096-bit RSA key record is under 1 KB of
# text. A longer reply is not read, and is a permerror (the key cannot be usable).
MAX_KEY_REPLY_BYTES = 8 * 1024
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+")


def _text(raw: bytes, limit: int = 100) -> str:
    return printable(raw.decode("ascii", "replace"), limit)


def _key_name(selector: bytes, domain: bytes) -> bytes:
    # Exactly the name dkimpy asks its dnsfunc for (DomainSigner.verify_sig).
    return selector + b"._domainkey." + domain + b"."


def _record(answer: Answer) -> bytes | None:
    """The key record among the TXT records: the first that looks like one."""
    records = [b"".join(strings) for strings in answer.values]
    for record in records:
        if b"p=" in record:
            return record
    return records[0] if records else None


def _testing(record: bytes) -> bool:
    """Whether a key record's t= flags include y (RFC 6376 §3.6.1)."""
    for tag in record.split(b";"):
        name, _, value = tag.partition(b"=")
        if name.strip() == b"t":
            return b"y" in [flag.strip() for flag in value.split(b":")]
    return False


def check_dkim(lookups: Lookups, message: bytes, pool=None) -> defer.Deferred[DkimFact]:
    """See the module docstring."""
    d = defer.maybeDeferred(_check, lookups, message, pool)
    d.addErrback(_internal_error)
    return d


def _internal_error(failure) -> DkimFact:
    # A bug, not hostile input (dkim_verify turns that into results): logged with its
    # traceback at error level, and temporary, so a message DKIM decides is deferred.
    _log.failure("internal error in the DKIM check", failure)
    return DkimFact(DkimResult.TEMPERROR, reason=f"internal error: {failure.value!r}"[:200])


def _parse(message: bytes, head_end: int, pool) -> defer.Deferred[list]:
    head = message[:head_end]
    if pool is None or head_end <= INLINE_HEAD_BYTES:
        return defer.succeed(parse_signatures(head, MAX_LISTED))
    d = pool.submit({"job": "parse", "limit": MAX_LISTED, "body_start": len(head)}, head)
    d.addCallback(lambda found: [
        (int(idx), tags if isinstance(tags, str)
         else {key.encode("latin-1"): value.encode("latin-1") for key, value in tags.items()})
        for idx, tags in found])
    return d


def _verify(message: bytes, head_end: int, body_start: int, jobs, pool) -> defer.Deferred:
    work = (len(message) - body_start) * len(jobs)
    if pool is None or work <= INLINE_WORK_BYTES:
        return defer.succeed(verify_all(message[:head_end], message[body_start:], jobs))
    request = {"job": "verify", "head_end": head_end, "body_start": body_start,
               "jobs": [[idx, name.decode("latin-1"), record.decode("latin-1")]
                        for idx, name, record in jobs]}
    d = pool.submit(request, message)
    d.addCallback(lambda found: {int(idx): (DkimResult(result), str(reason))
                                 for idx, result, reason in found})
    return d


def _unavailable(failure, jobs) -> dict[int, tuple[DkimResult, str]]:
    """The pool could not verify: each signature is a temperror (the sender retries)."""
    failure.trap(PoolBusy, WorkerLost)
    what = ("DKIM verification queue full" if failure.check(PoolBusy)
            else f"DKIM verification failed: {failure.value}")
    return {idx: (DkimResult.TEMPERROR, what) for idx, _, _ in jobs}


@defer.inlineCallbacks
def _check(lookups: Lookups, message: bytes, pool) -> Any:
    head_end, body_start = split_message(message)
    signatures = yield _parse(message, head_end, pool)
    if not signatures:
        return DkimFact(DkimResult.NONE, reason="no DKIM-Signature")
    results: dict[int, SignatureResult] = {}
    wanted: dict[int, dict[bytes, bytes]] = {}
    body_bytes = len(message) - body_start
    for idx, tags in signatures:
        if isinstance(tags, str):
            results[idx] = SignatureResult(DkimResult.PERMERROR, reason=tags[:200])
            continue
        about = dict(domain=_text(tags[b"d"]), selector=_text(tags[b"s"]),
                     b_prefix=_b_prefix(tags.get(b"b", b"")))
        if tags.get(b"a", b"").strip().lower() == b"rsa-sha1":
            why = "a=rsa-sha1 is not acceptable (RFC 8301)"
        elif len(wanted) >= MAX_SIGNATURES:
            why = f"not verified: only the first {MAX_SIGNATURES} signatures are"
        elif body_bytes > MAX_BODY_BYTES:
            why = f"not verified: body over {MAX_BODY_BYTES >> 20} MiB"
        else:
            wanted[idx] = tags
            results[idx] = SignatureResult(DkimResult.PERMERROR, **about)  # replaced below
            continue
        results[idx] = SignatureResult(DkimResult.POLICY, reason=why, **about)
    names = {idx: _key_name(tags[b"s"], tags[b"d"]) for idx, tags in wanted.items()}
    answers = yield defer.gatherResults(
        [_fetch(lookups, name) for name in names.values()], consumeErrors=True)
    jobs: list[tuple[int, bytes, bytes]] = []
    testing: set[int] = set()
    for (idx, name), answer in zip(names.items(), answers):
        record = _record(answer)
        if answer.too_large:  # before TEMPFAIL, which it also is: retrying brings the same
            _set(results, idx, DkimResult.PERMERROR, f"key record too large ({answer.detail})")
        elif answer.status == DnsStatus.TEMPFAIL:
            _set(results, idx, DkimResult.TEMPERROR, f"key lookup: {answer.detail}")
        elif not answer.ok or record is None:
            _set(results, idx, DkimResult.PERMERROR, f"no key ({answer.status})")
        elif _testing(record):
            testing.add(idx)
            _set(results, idx, DkimResult.POLICY, "key in testing mode (t=y): as unsigned")
        else:
            jobs.append((idx, name, record))
    if jobs:
        d = _verify(message, head_end, body_start, jobs, pool)
        verified = yield d.addErrback(_unavailable, jobs)
        for idx, (result, reason) in verified.items():
            _set(results, idx, DkimResult(result), reason)
    listed = tuple(results[idx] for idx in sorted(results))
    if testing and len(testing) == len(listed):
        return DkimFact(DkimResult.NONE, reason="signed only with keys in testing mode (t=y)",
                        signatures=listed)
    return _summary(listed)


def _set(results: dict[int, SignatureResult], idx: int, result: DkimResult,
         reason: str) -> None:
    old = results[idx]
    results[idx] = SignatureResult(result, old.domain, old.selector, old.b_prefix,
                                   printable(reason, 200))


def _fetch(lookups: Lookups, name: bytes) -> defer.Deferred[Answer]:
    try:
        return lookups.lookup(name.decode("ascii"), "TXT", max_size=MAX_KEY_REPLY_BYTES)
    except UnicodeDecodeError:
        return defer.succeed(Answer(DnsStatus.NODATA, detail="not a DNS name"))


def _b_prefix(b: bytes) -> str:
    compact = re.sub(rb"\s+", b"", b)[:8]
    return compact.decode("ascii") if _BASE64.fullmatch(compact) else ""


def _summary(signatures: tuple[SignatureResult, ...]) -> DkimFact:
    for sig in signatures:
        if sig.result == DkimResult.PASS:
            return DkimFact(DkimResult.PASS, sig.domain, sig.selector, "", signatures)
    temporary = [s for s in signatures if s.result == DkimResult.TEMPERROR]
    if temporary:
        return DkimFact(DkimResult.TEMPERROR, reason=temporary[0].reason, signatures=signatures)
    first = signatures[0]
    reason = (f"d={first.domain} s={first.selector}: {first.reason}" if first.domain
              else first.reason)
    return DkimFact(DkimResult.FAIL, reason=reason, signatures=signatures)
