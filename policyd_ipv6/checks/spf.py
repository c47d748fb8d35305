"""The SPF check (RFC 7208) with pyspf, driven without blocking the reactor.

Contract: ``check_spf(lookups, ip, sender, helo)`` returns a Deferred that always fires with an
``SpfFact``; it never fails. The identity is the MAIL FROM; for the null sender it is
``postmaster@<HELO>`` (RFC 7208 §2.4), and a HELO that is not a domain name gives ``none``.

Why re-running: pyspf is synchronous and asks for DNS answers one at a time through its module
hook ``spf.DNSLookup``. Rather than parking a thread per evaluation (a thread pool would be the
bottleneck once many evaluations wait on slow DNS), the evaluation runs on the reactor against
the answers already known; when pyspf asks for one that is not, the hook raises ``_Missing``,
the evaluation stops, the answer is fetched asynchronously (``lookups``) and the evaluation
starts again from the top. SPF evaluation is a pure function of its DNS answers, so the last
run gives exactly the result a blocking run would, with pyspf's own limits (10 DNS mechanisms,
2 void lookups, MX/PTR bounds) intact. A run costs tens of microseconds; a record needing k
lookups costs k+1 runs, and ``MAX_RUNS`` caps hostile records. When a record arrives, the
names its mechanisms need (include, a, mx, exists, redirect) are fetched at once, in parallel,
before pyspf asks for them one by one; so are the addresses of MX exchanges.

Every exception pyspf raises on hostile input (over-long names, bad records, its internal
assertions) becomes ``permerror``; the hook maps a transient DNS fault to ``spf.TempError``.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import spf
from twisted.internet import defer

from policyd_ipv6.cache import ExpiringCache
from policyd_ipv6.facts import SpfFact
from policyd_ipv6.names import IPAddress, domain_key, helo_domain, recipient_domain

__all__ = ["check_spf", "SpfResults", "MAX_RUNS"]

MAX_RUNS = 150

# pyspf 2.0.14 calls dns.resolver.query() in its own DNS driver, deprecated in dnspython 2.x;
# the driver is replaced below, but keep stray warnings off stderr all the same.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="spf")


class _Missing(BaseException):
    """Raised through pyspf when an answer is not known yet (BaseException: pyspf catches
    Exception in places, and this must reach the driver)."""

    def __init__(self, name: str, qtype: str) -> None:
        super().__init__(name, qtype)
        self.key = (name, qtype)


# The answers of the evaluation running right now. The reactor thread runs one pyspf call at a
# time, synchronously, so a module variable is enough.
_current: dict | None = None
_lookups = None


def _hook(name, qtype, strict=True, timeout=None):
    """pyspf's DNSLookup contract: a list of ((name, qtype), value); [] for no data."""
    name = str(name).lower().rstrip(".")
    rrtype = "TXT" if qtype == "SPF" else qtype
    if qtype == "SPF":
        return []  # RFC 7208 §3.1: type SPF records are obsolete; pyspf asks only in harsh mode
    key = (name, rrtype)
    answer = _current.get(key) if _current is not None else None
    if answer is None and _lookups is not None:
        answer = _lookups.cached(name, rrtype)
        if answer is not None:
            _current[key] = answer
    if answer is None:
        raise _Missing(name, rrtype)
    if answer.status == "tempfail":
        raise spf.TempError(f"DNS {rrtype} {name}: {answer.detail}")
    return [((name, qtype), value) for value in answer.values]


spf.DNSLookup = _hook


def _evaluate(answers: dict, lookups, ip: str, sender: str, helo: str):
    """One synchronous pyspf run. Returns (result, explanation) or raises _Missing."""
    global _current, _lookups
    _current, _lookups = answers, lookups
    try:
        query = spf.query(ip, sender, helo, strict=True, querytime=0)
        result, _code, explanation = query.check()
        return result, explanation
    except (_Missing, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # hostile input must never escape: RFC 7208 §4.6 permerror
        return "permerror", f"{error.__class__.__name__}: {error}"[:300]
    finally:
        _current, _lookups = None, None


def check_spf(lookups, ip: IPAddress, sender: str, helo: str) -> defer.Deferred:
    """See the module docstring."""
    helo_name = helo_domain(helo)
    if not sender:
        if helo_name is None:
            return defer.succeed(SpfFact("none", "null sender and the HELO is not a domain name",
                                         "postmaster@" + helo[:100]))
        identity = "postmaster@" + helo_name
    else:
        identity = sender
        domain = recipient_domain(sender)
        if domain is None or domain_key(domain) is None:
            return defer.succeed(SpfFact("none", "the sender's domain is not a domain name",
                                         sender))
    return _Evaluation(lookups, str(ip), sender, helo_name or "unknown", identity).start()


_PREFETCH_TYPES = {"include": "TXT", "redirect": "TXT", "a": None, "mx": "MX", "exists": "A"}


def _named_lookups(record: str, domain: str, address_type: str):
    """(name, type) of the lookups an SPF record's terms will need, macro-free ones only."""
    for term in record.split()[1:]:
        term = term.lstrip("+-~?")
        name, sep, target = term.replace("=", ":", 1).partition(":")
        name = name.split("/", 1)[0].lower()
        if name not in _PREFETCH_TYPES:
            continue
        target = (target.split("/", 1)[0] if sep else "") or (domain if name in ("a", "mx")
                                                             else "")
        if not target or "%" in target:
            continue
        yield target.lower().rstrip("."), _PREFETCH_TYPES[name] or address_type


class _Evaluation:
    def __init__(self, lookups, ip: str, sender: str, helo: str, identity: str) -> None:
        self.lookups = lookups
        self.args = (ip, sender, helo)
        self.identity = identity
        self.answers: dict = {}
        self.runs = 0
        # Cancelling (the decision's deadline passed) stops the evaluation at its next step.
        self.result = defer.Deferred(lambda _d: None)

    def start(self) -> defer.Deferred:
        self._run()
        return self.result

    def _run(self) -> None:
        while self.runs < MAX_RUNS:
            self.runs += 1
            try:
                result, explanation = _evaluate(self.answers, self.lookups, *self.args)
            except _Missing as missing:
                self._fetch(missing.key)
                return
            ttls = [a.ttl for a in self.answers.values()]
            # A result built on a temporary failure must not be reused.
            reusable = result != "temperror" and all(a.status != "tempfail"
                                                     for a in self.answers.values())
            ttl = min(ttls, default=0.0) if reusable else 0.0
            self.result.callback(SpfFact(result, explanation, self.identity, len(self.answers),
                                         ttl, self._macros()))
            return
        self.result.callback(SpfFact("permerror", f"more than {MAX_RUNS} evaluation steps",
                                     self.identity, len(self.answers)))

    def _macros(self) -> bool:
        """Whether a TXT record consulted holds a macro (RFC 7208 §7): then the result may
        depend on the local part or the HELO, not only on the IP address and the domain."""
        return any(b"%{" in chunk for (_name, rrtype), answer in self.answers.items()
                   if rrtype == "TXT" for record in answer.values for chunk in record)

    def _fetch(self, key) -> None:
        self.lookups.lookup(*key).addCallback(self._arrived, key)

    def _arrived(self, answer, key) -> None:
        if self.result.called:  # cancelled: nobody waits for this evaluation any more
            return
        self.answers[key] = answer
        if answer.ok:
            self._prefetch(key, answer)
        self._run()

    def _prefetch(self, key, answer) -> None:
        """Ask now for what pyspf will ask next, so that its lookups overlap instead of
        queuing one round trip after another: the addresses of MX exchanges, and the names a
        record's mechanisms name (macro-free ones only; at most 10, as RFC 7208 §4.6.4)."""
        address_type = "AAAA" if ":" in self.args[0] else "A"
        wanted: list[tuple[str, str]] = []
        if key[1] == "MX":
            wanted = [(exchange, address_type) for _pref, exchange in answer.values[:10]]
        elif key[1] == "TXT":
            for record in answer.values:
                text = b"".join(record).decode("ascii", "replace")
                if text.lower().startswith("v=spf1 "):
                    wanted = list(_named_lookups(text, key[0], address_type))[:10]
                    break
        for name, rrtype in wanted:
            self.lookups.lookup(name, rrtype)


class SpfResults:
    """SPF results kept for reuse, each for the shortest TTL of the answers it came from.

    RFC 7208 §4.1: the result is a function of the IP address, the identity and the HELO
    name. Without macros in the records consulted it depends on the IP address and the
    identity's domain alone, so one result serves every local part of that domain (the
    common case of a busy sender); with macros it is reused only for the same three inputs.
    """

    def __init__(self, max_entries: int, clock) -> None:
        self.cache = ExpiringCache(max_entries, clock)

    @staticmethod
    def _keys(ip: IPAddress, sender: str, helo: str):
        domain = recipient_domain(sender) if sender else "postmaster@" + helo.lower()
        return (ip, domain), (ip, sender.lower(), helo.lower())

    def get(self, ip: IPAddress, sender: str, helo: str) -> SpfFact | None:
        general, exact = self._keys(ip, sender, helo)
        fact = self.cache.get(general) or self.cache.get(exact)
        if fact is None:
            return None
        identity = sender or "postmaster@" + (helo_domain(helo) or helo[:100])
        return fact if fact.identity == identity else replace(fact, identity=identity)

    def put(self, ip: IPAddress, sender: str, helo: str, fact: SpfFact) -> None:
        general, exact = self._keys(ip, sender, helo)
        self.cache.put(exact if fact.macros else general, fact, fact.ttl)
