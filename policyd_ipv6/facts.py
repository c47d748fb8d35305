"""The facts a decision is made from: the outcome of the reverse DNS and SPF checks.

Contract: plain immutable values, produced by ``rdns`` and ``spf_check`` and consumed by
``decision``; ``None`` in ``Facts`` means "not gathered yet". No behaviour, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from policyd_ipv6.vocabulary import DkimResult, SpfResult, filled

__all__ = ["RdnsOutcome", "RdnsFact", "SpfFact", "Facts", "SPF_RESULTS", "SPF_RESULT_NAMED",
           "DkimFact", "SignatureResult"]

# RFC 7208 §2.6 results, as pyspf's check() names them.
SPF_RESULTS = tuple(result.value for result in SpfResult)


class RdnsOutcome(enum.Enum):
    PASS = "pass"  # a PTR exists (ptr mode) or a PTR name resolves back (fcrdns mode)
    MISSING = "missing"  # NXDOMAIN or no PTR data
    UNCONFIRMED = "unconfirmed"  # fcrdns: no PTR name resolves back to the client address
    TEMPFAIL = "tempfail"  # timeout, SERVFAIL, deadline: a transient fault


_OUTCOME = {outcome.value: outcome for outcome in RdnsOutcome}
SPF_RESULT_NAMED = {result.value: result for result in SpfResult}  # name -> SpfResult


@dataclass(frozen=True)
class RdnsFact:
    outcome: RdnsOutcome
    names: tuple[str, ...] = ()  # the PTR names found
    confirmed: str | None = None  # the name that resolved back (fcrdns)
    detail: str = ""  # what happened, for the log and the trace

    def describe(self) -> str:
        name = self.confirmed or (self.names[0] if self.names else "")
        # ``_value_``: an Enum member's ``.value`` is a property, and hashing it a Python call.
        text = self.outcome._value_
        return f"{text}({name})" if name else text

    def packed(self) -> tuple:
        """A plain tuple of the fact (for caches: see ``cache``); ``unpacked`` inverts it."""
        return (self.outcome._value_, self.names, self.confirmed, self.detail)

    @classmethod
    def unpacked(cls, packed: tuple) -> RdnsFact:
        outcome, names, confirmed, detail = packed
        return filled(cls, outcome=_OUTCOME[outcome], names=names, confirmed=confirmed,
                       detail=detail)


@dataclass(frozen=True)
class SpfFact:
    result: SpfResult
    explanation: str = ""
    identity: str = ""  # the identity checked: the MAIL FROM, or postmaster@HELO
    lookups: int = 0  # DNS answers the evaluation needed
    ttl: float = 0.0  # how long the result may be reused: the shortest TTL among those answers
    # A record consulted had macros: the result may depend on more than IP and domain.
    macros: bool = False

    def describe(self) -> str:
        return self.result

    def packed(self) -> tuple:
        """A plain tuple of the fact (for caches: see ``cache``); ``unpacked`` inverts it."""
        return (self.result._value_, self.explanation, self.identity, self.lookups, self.ttl,
                self.macros)

    @classmethod
    def unpacked(cls, packed: tuple) -> SpfFact:
        result, explanation, identity, lookups, ttl, macros = packed
        return filled(cls, result=SPF_RESULT_NAMED[result], explanation=explanation,
                       identity=identity, lookups=lookups, ttl=ttl, macros=macros)

    def for_identity(self, identity: str) -> SpfFact:
        """The same fact about another identity of the same domain (``SpfResults``)."""
        return filled(SpfFact, result=self.result, explanation=self.explanation,
                       identity=identity, lookups=self.lookups, ttl=self.ttl,
                       macros=self.macros)


@dataclass(frozen=True)
class Facts:
    rdns: RdnsFact | None = None
    spf: SpfFact | None = None
    # True when the built-in milter is in this SMTP session's path and will check DKIM.
    dkim_pending: bool = False

    def with_(self, **changes: Any) -> Facts:
        return replace(self, **changes)

    def packed(self) -> tuple:
        """A plain tuple of the facts (for caches: see ``cache``); ``unpacked`` inverts it."""
        return (None if self.rdns is None else self.rdns.packed(),
                None if self.spf is None else self.spf.packed(), self.dkim_pending)

    @classmethod
    def unpacked(cls, packed: tuple) -> Facts:
        rdns, spf, dkim_pending = packed
        return filled(cls, rdns=None if rdns is None else RdnsFact.unpacked(rdns),
                       spf=None if spf is None else SpfFact.unpacked(spf),
                       dkim_pending=dkim_pending)


@dataclass(frozen=True)
class SignatureResult:
    result: DkimResult  # pass, fail, permerror or temperror
    domain: str = ""  # d=, printable
    selector: str = ""  # s=, printable
    b_prefix: str = ""  # the first 8 characters of b= (RFC 6008 header.b)
    reason: str = ""


@dataclass(frozen=True)
class DkimFact:
    result: DkimResult  # pass, fail, none (unsigned) or temperror
    domain: str = ""
    selector: str = ""
    reason: str = ""
    signatures: tuple[SignatureResult, ...] = ()

    def describe(self) -> str:
        if self.result == DkimResult.PASS:
            return f"pass(d={self.domain} s={self.selector})"
        return self.result
