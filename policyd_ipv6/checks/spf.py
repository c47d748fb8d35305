"""The SPF check (RFC 7208), driven without blocking the reactor.

Contract: ``check_spf(lookups, ip, sender, helo, limits)`` returns a Deferred that always fires
with an ``SpfFact``; it never fails. ``run_spf(lookups, ip, sender, helo, limits, deliver)`` is
the same without a Deferred (the fact finder's way in, once per cold message): the
``SpfFact`` at once when the evaluation needs nothing it has to wait for (``deliver`` is then
never called), otherwise the evaluation under way, which calls ``deliver(fact)`` once unless
its ``cancel()`` came first. The identity is the MAIL FROM; for the null sender it is
``postmaster@<HELO>`` (RFC 7208 §2.4), and a HELO that is not a domain name gives ``none``.
Both domains are evaluated in their ``names.domain_key`` form (A-labels, lower case, no
trailing dot: RFC 7208 §4.3), which the macros see too; the fact keeps the sender as written.

How: ``spf_eval.check_host`` is a generator that yields each DNS question and resumes with
its answer; this driver answers from the evaluation's own answers or the lookups' cache at
once, and otherwise asks ``lookups`` and resumes the generator when the answer arrives. Each
answer is consumed once: the work is linear in the lookups (a record with 10 ``mx`` of 10
exchanges costs 111 steps, not 111 evaluations). RFC 7208's limits are the evaluator's
(``spf_eval.Limits``: 10 DNS terms, ``spf_void_limit`` void lookups, a cap on TXT bytes);
``MAX_QUESTIONS`` guards the driver all the same. When a record arrives, the names its
mechanisms need (include, a, mx, exists, redirect) are fetched at once, in parallel, before
the evaluation asks for them one by one; so are the addresses of MX exchanges.

Memory: a TXT reply longer than ``limits.txt_bytes`` plus ``TXT_REPLY_OVERHEAD`` could only
push the evaluation past its TXT cap, so it is refused on its length, before it is read, and
the evaluation goes on exactly as if its text had been counted: ``permerror`` ("TXT records
over ... bytes", logged), or the default explanation for ``exp=``. A reply that large with
less text than the cap would need more than 4 KiB of record overhead (thousands of tiny
records, or stuffed sections): no record worth evaluating looks like that. When the
evaluation ends (or is cancelled), the lookups it started and no longer needs are cancelled.
The fact keeps at most ``MAX_EXPLANATION`` characters of the explanation (``spf_eval``
expands ``exp=`` text no further): an ``exp=`` text with macros can expand to megabytes, and
the SPF results are cached (a bound in entries alone would bound nothing).

An exception inside the evaluator (a bug, not a DNS fault) gives ``temperror``, logged with its
traceback: hostile input never escapes as anything else.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

from twisted.internet import defer
from twisted.logger import Logger

from policyd_ipv6.cache import MEMO, ExpiringCache
from policyd_ipv6.checks.spf_eval import MAX_EXPLANATION, Limits, Verdict, check_host
from policyd_ipv6.checks.spf_terms import SpfPermError
from policyd_ipv6.facts import SPF_RESULT_NAMED, SpfFact
from policyd_ipv6.names import IPAddress, domain_key, helo_domain, recipient_domain
from policyd_ipv6.vocabulary import Answer, Clock, DnsStatus, Lookups, SpfResult, Waiter

__all__ = ["check_spf", "run_spf", "SpfResults", "MAX_QUESTIONS", "Limits", "TXT_REPLY_OVERHEAD"]

_log = Logger(namespace="policyd-ipv6")

# More DNS questions than RFC 7208's limits allow (10 terms of at most 11 lookups each, the
# record, a redirect, %{p} and exp=): past this, the evaluator has a bug; permerror.
MAX_QUESTIONS = 150
# What a DNS message adds to the TXT text it carries (header, question, each record's name,
# type, class, TTL and length, a length byte per string, EDNS), with room to spare: a TXT
# set of ``txt_bytes`` of text fits in ``txt_bytes`` + this.
TXT_REPLY_OVERHEAD = 4096
DEFAULT_LIMITS = Limits()
# What a cancelled evaluation holds as its fact: it never reaches anyone.
_CANCELLED = SpfFact(SpfResult.TEMPERROR, "cancelled")


def run_spf(lookups: Lookups, ip: IPAddress, sender: str, helo: str, limits: Limits,
            deliver: Callable[[SpfFact], object]) -> SpfFact | _Evaluation:
    """See the module docstring."""
    helo_name = helo_domain(helo)
    if not sender:
        if helo_name is None:
            return SpfFact(SpfResult.NONE, "null sender and the HELO is not a domain name",
                           "postmaster@" + helo[:100])
        identity = "postmaster@" + helo_name
    else:
        identity = sender
        domain = recipient_domain(sender)
        key = None if domain is None else domain_key(domain)
        if key is None:
            return SpfFact(SpfResult.NONE, "the sender's domain is not a domain name", sender)
        # Evaluated at the domain's A-labels without the trailing dot, as its own macros
        # (%{s} %{o} %{d}) see it: RFC 7208 §4.3 (an IDN MUST be encoded as A-labels; a
        # trailing dot is a fully qualified name). Postfix passes a SMTPUTF8 sender's U-labels
        # and the dot unchanged; the fact names the sender as the client wrote it.
        sender = sender.rpartition("@")[0] + "@" + key
    return _Evaluation(lookups, ip, sender, helo_name or "unknown", identity, limits).start(
        deliver)


def check_spf(lookups: Lookups, ip: IPAddress, sender: str, helo: str,
              limits: Limits = DEFAULT_LIMITS) -> defer.Deferred[SpfFact]:
    """See the module docstring: ``run_spf`` as a Deferred; cancelling it stops the
    evaluation."""
    running: _Evaluation | None = None
    result: defer.Deferred[SpfFact] = defer.Deferred(
        lambda _d: None if running is None else running.cancel())
    got = run_spf(lookups, ip, sender, helo, limits, result.callback)
    if isinstance(got, SpfFact):
        return defer.succeed(got)
    running = got
    return result


_PREFETCH_TYPES = {"include": "TXT", "redirect": "TXT", "a": None, "mx": "MX", "exists": "A"}
# A term that may name a lookup (_PREFETCH_TYPES), with its qualifier: every one that
# _named_lookups can yield matches (and some it then skips: macros, a redirect beside "all").
_NAMED_TERM = re.compile(r"(?:^|\s)[-+~?]?(?:include|redirect|a|mx|exists)(?=[:=/\s]|$)",
                         re.IGNORECASE)


def _named_lookups(record: str, domain: str, address_type: str):
    """(name, type) of the lookups an SPF record's terms will need, macro-free ones only."""
    terms = [term.lstrip("+-~?") for term in record.split()[1:]]
    # A redirect beside "all" is never followed (RFC 7208 §6.1): nothing to fetch for it.
    follows_redirect = not any(term.lower() == "all" for term in terms)
    for term in terms:
        name, sep, target = term.replace("=", ":", 1).partition(":")
        name = name.split("/", 1)[0].lower()
        if name not in _PREFETCH_TYPES or (name == "redirect" and not follows_redirect):
            continue
        target = (target.split("/", 1)[0] if sep else "") or (domain if name in ("a", "mx")
                                                             else "")
        if not target or "%" in target:
            continue
        yield target.lower().rstrip("."), _PREFETCH_TYPES[name] or address_type


class _Evaluation:
    def __init__(self, lookups: Lookups, ip: IPAddress | str, sender: str, helo: str,
                 identity: str, limits: Limits) -> None:
        self.lookups = lookups
        # Parsed once (the client_address's own object, as a rule): check_host takes it as it is.
        address = ip if isinstance(ip, (IPv4Address, IPv6Address)) else ip_address(ip)
        # ::ffff:192.0.2.1 is IPv4, as check_host treats it
        v4 = address.version == 4 or address.ipv4_mapped is not None
        self.address_type = "A" if v4 else "AAAA"
        self.identity = identity
        self.answers: dict[tuple[str, str], Answer] = {}
        self.questions = 0
        self.too_large = ""  # what the last refused TXT reply was, for the log
        self.limits = limits
        self.steps = check_host(address, sender, helo, limits, int(time.time()))
        # The lookups this evaluation asked for (its own and prefetched) and still waits on,
        # and the one the evaluator is stopped on (None while it runs or once it ended).
        self.asked: dict[tuple[str, str], Waiter] = {}
        self.waiting: tuple[str, str] | None = None
        # Where the fact goes; None once it went, or once cancelled (the decision's deadline
        # passed: the evaluation stops at its next step). ``fact`` holds it while ``start``
        # runs, to be returned instead.
        self.deliver: Callable[[SpfFact], object] | None = None
        self.fact: SpfFact | None = None

    def start(self, deliver: Callable[[SpfFact], object]) -> SpfFact | _Evaluation:
        """Run until the first answer to wait for: the fact if it ended first, else self."""
        self._resume(None)
        if self.fact is not None:
            return self.fact
        self.deliver = deliver
        return self

    def cancel(self) -> None:
        """Stop: ``deliver`` is never called, and the lookups still asked are withdrawn."""
        self.deliver = None
        self.fact = self.fact or _CANCELLED
        self._cancel_asked()

    def _ask(self, key: tuple[str, str]) -> Answer | None:
        """Look ``key`` up unless it is asked already (a TXT reply bounded by what the cap can
        use: module docstring); its Answer if known at once, else None: it comes to ``_got``."""
        if key in self.asked:
            return None
        got = self.lookups.ask(*key, functools.partial(self._got, key),
                               self.limits.txt_bytes + TXT_REPLY_OVERHEAD
                               if key[1] == "TXT" else None)
        if isinstance(got, Answer):
            return got
        self.asked[key] = got
        return None

    def _got(self, key: tuple[str, str], answer: Answer) -> None:
        """An answer asked for came; the evaluator goes on if it waits for this one (a
        prefetched answer is in the lookups' cache for when it asks)."""
        self.asked.pop(key, None)
        if key == self.waiting:
            self.waiting = None
            self._arrived(answer, key)

    def _cancel_asked(self) -> None:
        """Withdraw from the lookups still under way: nobody here needs them any more."""
        asked, self.asked = self.asked, {}
        self.waiting = None
        for waiter in asked.values():
            waiter.cancel()

    def _resume(self, answer: Answer | None, error: Exception | None = None) -> None:
        """Run the evaluator until it needs an answer nobody has yet, or ends."""
        while True:
            try:
                if error is not None:  # raised where the evaluator asked, as its own would be
                    key = self.steps.throw(error)
                    error = None
                else:
                    key = self.steps.send(answer)
            except StopIteration as end:
                self._finish(end.value)
                return
            except Exception:  # a bug in the evaluator: fail closed, and say so
                # temperror, not permerror: the fault is ours, not the sender's record, so the
                # reply is the temporary one (451 4.4.3) and the sender retries.
                _log.failure("internal error in the SPF evaluation for {identity}",
                             identity=self.identity)
                self._finish(Verdict("temperror", "internal error", False))
                return
            self.questions += 1
            if self.questions > MAX_QUESTIONS:
                self.steps.close()
                self._finish(Verdict("permerror", f"more than {MAX_QUESTIONS} DNS questions",
                                     False))
                return
            answer = self.answers.get(key) or self.lookups.cached(*key)
            if answer is None:
                answer = self._ask(key)  # or join the prefetch of it under way
                if answer is None:
                    self.waiting = key
                    return
                self._arrived(answer, key)  # known at once, not cached (a name DNS cannot carry)
                return
            self.answers[key] = answer

    def _finish(self, verdict: Verdict) -> None:
        self._cancel_asked()
        # A result built on a temporary failure must not be reused; else it lasts as long as
        # the shortest TTL of its answers (one loop: this runs once per cold message).
        ttl = 0.0
        if verdict.result != SpfResult.TEMPERROR:
            shortest = None
            for answer in self.answers.values():
                if answer.status == DnsStatus.TEMPFAIL:
                    break
                if shortest is None or answer.ttl < shortest:
                    shortest = answer.ttl
            else:
                ttl = 0.0 if shortest is None else shortest
        if verdict.result == SpfResult.PERMERROR and "TXT records over" in verdict.explanation:
            _log.warn("SPF for {identity}: {why}{size}", identity=self.identity,
                      why=verdict.explanation, size=self.too_large)
        if self.fact is None:
            explanation = verdict.explanation
            if len(explanation) > MAX_EXPLANATION:
                explanation = explanation[:MAX_EXPLANATION - 3] + "..."
            # By the map, not SpfResult(...): EnumType.__call__ is a Python call per evaluation.
            result = SPF_RESULT_NAMED.get(verdict.result) or SpfResult(verdict.result)
            self.fact = SpfFact(result, explanation, self.identity,
                                len(self.answers), ttl, verdict.macros)
            deliver, self.deliver = self.deliver, None
            if deliver is not None:  # None while start() runs: it returns the fact itself
                deliver(self.fact)

    def _arrived(self, answer: Answer, key: tuple[str, str]) -> None:
        if self.fact is not None:  # cancelled: nobody waits for this evaluation any more
            self.steps.close()
            return
        if answer.too_large:  # only TXT replies are bounded: over the cap, unread
            self.too_large = f" ({answer.detail})"
            self._resume(None, SpfPermError(f"TXT records over {self.limits.txt_bytes} bytes",
                                            key[0]))
            return
        self.answers[key] = answer
        if answer.ok:
            self._prefetch(key, answer)
        self._resume(answer)

    def _prefetch(self, key: tuple[str, str], answer: Answer) -> None:
        """Ask now for what the evaluation will ask next, so that its lookups overlap instead of
        queuing one round trip after another: the addresses of MX exchanges, and the names a
        record's mechanisms name (macro-free ones only; at most 10, as RFC 7208 §4.6.4).
        Only two or more: the evaluator asks for a single one itself when it gets there, no
        later, and not at all when an earlier term (an ip6:, say) already matched."""
        address_type = self.address_type
        wanted: list[tuple[str, str]] = []
        if key[1] == "MX":
            wanted = [(exchange, address_type) for _pref, exchange in answer.values[:10]]
        elif key[1] == "TXT":
            for record in answer.values:
                text = b"".join(record).decode("ascii", "replace")
                if text.lower().startswith("v=spf1 "):
                    if len(_NAMED_TERM.findall(text)) > 1:  # at C speed: most records have none
                        wanted = list(_named_lookups(text, key[0], address_type))[:10]
                    break
        if len(wanted) < 2:
            return
        for question in wanted:
            if question not in self.answers:
                self._ask(question)


class SpfResults:
    """SPF results kept for reuse, each for the shortest TTL of the answers it came from.

    RFC 7208 §4.1: the result is a function of the IP address, the identity and the HELO
    name. Without macros in the records consulted it depends on the IP address and the
    identity's domain alone, so one result serves every local part of that domain (the
    common case of a busy sender); with macros it is reused only for the same three inputs.
    ``hits`` and ``misses`` count the calls of ``get`` (one lookup, whichever key matched).
    """

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self.cache: ExpiringCache[tuple[object, ...], SpfFact] = ExpiringCache(
            max_entries, clock, pack=SpfFact.packed, unpack=SpfFact.unpacked,
            memo=MEMO)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _keys(ip: IPAddress, sender: str,
              helo: str) -> tuple[tuple[object, ...], tuple[object, ...]]:
        if sender:
            domain = recipient_domain(sender)
            if domain is not None:  # at the A-label form the evaluation uses: bücher.example
                domain = domain_key(domain) or domain  # and xn--bcher-kva.example are one
        else:
            domain = "postmaster@" + helo.lower()
        # The address as bytes, not the object: a key of strings and bytes only is not tracked
        # by the garbage collector (see ``cache``).
        address = ip.packed
        return (address, domain), (address, sender.lower(), helo.lower())

    def get(self, ip: IPAddress, sender: str, helo: str) -> SpfFact | None:
        general, exact = self._keys(ip, sender, helo)
        fact = self.cache.get(general) or self.cache.get(exact)
        if fact is None:
            self.misses += 1
            return None
        self.hits += 1
        identity = sender or "postmaster@" + (helo_domain(helo) or helo[:100])
        if fact.identity == identity:
            return fact
        return fact.for_identity(identity)  # runs for nearly every warm decision

    def put(self, ip: IPAddress, sender: str, helo: str, fact: SpfFact) -> None:
        general, exact = self._keys(ip, sender, helo)
        self.cache.put(exact if fact.macros else general, fact, fact.ttl)
