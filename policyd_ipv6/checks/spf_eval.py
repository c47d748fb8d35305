"""SPF evaluation (RFC 7208 §4, check_host) as a generator: the DNS is the caller's business.

Contract: ``check_host(ip, sender, helo, limits, now)`` (``ip`` as text or an ``ipaddress``
object) returns a generator that yields each DNS question as a ``(name, rrtype)`` pair
(lower-case name without the trailing dot; rrtype one of TXT, A, AAAA, MX, PTR) and must be
sent back an answer with ``status`` (a ``DnsStatus``) and ``values`` (as
``resolver.lookups.Answer`` has them). It ends (``StopIteration.value``) with a ``Verdict``.
Nothing here does I/O or imports Twisted, so the evaluation resumes where it stopped when an
answer arrives: the work is linear in the lookups, never a replay from the top.

Semantics: pyspf 2.0.14 in strict mode, which the RFC 7208 and RFC 4408 test suites accept
in full, with its limits made exact and configurable: at most ``limits.dns_terms`` (10)
terms that query DNS (RFC 7208 §4.6.4: include, a, mx, ptr, exists, redirect), at most
``limits.void_lookups`` (2) answers that are empty or NXDOMAIN, at most 10 MX names per mx
(more is permerror) and 10 PTR names (the rest ignored); past ``limits.txt_bytes`` of TXT
data in one evaluation, permerror (a record worth evaluating needs no 64 KB answer). Where
pyspf departs from RFC 7208, the RFC holds: ``redirect=`` counts as a DNS term only when it is
followed (§4.6.4, §6.1), a DNS error in ``ptr``'s PTR lookup is no match and one in a name's
address lookup skips that name (§5.5), and ``%{p}`` is "unknown" after a DNS error (§7.3).
The explanation (``exp=``, §6.2) is fetched only for a fail of the record at the top (or its
redirect), and an explanation that cannot be had leaves the default text. Its expansion stops
past ``MAX_EXPLANATION`` characters (one more is kept, to tell that it is longer): what an SPF
fact keeps of it, and a macro can make megabytes of it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Generator
from dataclasses import dataclass
from itertools import chain
from typing import Any

from policyd_ipv6.checks.spf_macros import check_domain_spec, expand, needs_p
from policyd_ipv6.checks.spf_terms import (
    Mechanism,
    SpfError,
    SpfPermError,
    SpfTempError,
    cidr_match,
    modifier,
    parse_term,
    split_sender,
)
from policyd_ipv6.vocabulary import DnsStatus, filled

__all__ = ["Limits", "Verdict", "check_host", "DEFAULT_EXPLANATIONS", "MAX_EXPLANATION"]

Question = tuple[str, str]
Steps = Generator[Question, Any, Any]

DEFAULT_EXPLANATIONS = {  # pyspf's texts, which the daemon has always shown
    "pass": "sender SPF authorized",
    "fail": "SPF fail - not authorized",
    "permerror": "permanent error in processing",
    "temperror": "temporary DNS error in processing",
    "softfail": "domain owner discourages use of this host",
    "neutral": "access neither permitted nor denied",
    "none": "",
}
# What an SPF fact keeps of its explanation (exp= text, or an error naming a record's term):
# enough for an SMTP reply line or a log line.
MAX_EXPLANATION = 512
_SPF_RECORD = re.compile(rb"^v=spf1$|^v=spf1 ", re.IGNORECASE)
_MAX_RECURSION = 20  # never reached within the term limit; a guard all the same
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NO_VALUES: dict[str, str] = {}


@dataclass(frozen=True)
class Limits:
    dns_terms: int = 10
    void_lookups: int = 2
    txt_bytes: int = 32_768
    mx_names: int = 10
    ptr_names: int = 10


@dataclass(frozen=True)
class Verdict:
    result: str  # an RFC 7208 §2.6 result
    explanation: str
    macros: bool  # a record or explanation consulted holds a macro (%{...})
    explained: bool = False  # the explanation came from exp=


class _Evaluation:
    """The state of one check_host run: counters, the client's macro values, %{p}."""

    def __init__(self, ip: str | IPAddress, sender: str, helo: str, limits: Limits, now: int,
                 receiver: str) -> None:
        address = ip if isinstance(ip, _ADDRESS_TYPES) else ipaddress.ip_address(ip)
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        self.client = address
        self.v6 = address.version == 6
        self.address_type = "AAAA" if self.v6 else "A"
        self.sender, self.helo, self.receiver, self.now = sender, helo, receiver, now
        self.local, self.domain = split_sender(sender, helo)
        # The macro values and the reverse name: built when a macro or ptr first needs them
        # (most records have neither, and the address's text forms cost more than the rest).
        self._values: dict[str, str] | None = None
        self.limits = limits
        self.terms = self.voids = self.txt_bytes = 0
        self.p: str | None = None
        self.macros = False

    @property
    def values(self) -> dict[str, str]:
        """The client's macro letters (RFC 7208 §7.3) but d and p."""
        if self._values is None:
            self._values = {"s": self.sender or "postmaster@" + self.helo, "l": self.local,
                            "o": self.domain, "i": self._dotted(),
                            "v": "ip6" if self.v6 else "in-addr", "h": self.helo,
                            "c": str(self.client), "r": self.receiver, "t": str(self.now)}
        return self._values

    def _dotted(self) -> str:
        """The i macro: dotted quad, or the 32 nibbles of an IPv6 address dot-separated."""
        if self.v6:
            return ".".join(self.client.exploded.replace(":", "").upper())
        return self.client.exploded

    @property
    def reverse_name(self) -> str:
        return ".".join(reversed(self._dotted().split("."))) + (
            ".ip6.arpa" if self.v6 else ".in-addr.arpa")

    # DNS, with pyspf's accounting of void lookups

    def dns(self, name: str, rrtype: str, count_void: bool = True) -> Steps:
        name = name[:-1] if name.endswith(".") else name
        if not name:
            raise SpfPermError("Invalid query")
        if not _carriable(name):
            return []  # a name DNS cannot carry has no records (RFC 7208 §4.3)
        name = name.lower()
        answer = yield name, rrtype
        if answer.status == DnsStatus.TEMPFAIL:
            raise SpfTempError(f"DNS {rrtype} {name}: {answer.detail}")
        values = list(answer.values) if answer.status == DnsStatus.OK else []
        if rrtype == "TXT":
            self.txt_bytes += sum(map(len, chain.from_iterable(values)))
            if self.txt_bytes > self.limits.txt_bytes:
                raise SpfPermError(f"TXT records over {self.limits.txt_bytes} bytes", name)
        if not values and count_void:
            self.voids += 1
            if self.voids > self.limits.void_lookups:
                raise SpfPermError(f"Void lookup limit of {self.limits.void_lookups} exceeded")
        return values

    def txt(self, name: str, count_void: bool = True) -> Steps:
        records = yield from self.dns(name, "TXT", count_void)
        return [b"".join(record) for record in records]

    def spf_record(self, domain: str) -> Steps:
        """The domain's SPF record (RFC 7208 §4.5), None without one."""
        if not _carriable(domain):
            return None
        found = [t for t in (yield from self.txt(domain)) if _SPF_RECORD.match(t)]
        if len(found) > 1:
            raise SpfPermError("Two or more type TXT spf records found.")
        if not found:
            return None
        record = _ascii(found[0])
        self.macros = self.macros or "%{" in record  # on the joined strings
        return record

    def addresses(self, name: str) -> Steps:
        if not name.rstrip("."):  # a null MX (RFC 7505) names the root: no address
            return []
        return (yield from self.dns(name, self.address_type))

    def mx_addresses(self, name: str) -> Steps:
        exchanges = yield from self.dns(name, "MX")
        if len(exchanges) > self.limits.mx_names:
            raise SpfPermError(f"More than {self.limits.mx_names} MX records returned")
        found: list[str] = []
        for _preference, exchange in sorted(exchanges):
            found += yield from self.addresses(exchange)
        return found

    def validated_ptrs(self) -> Steps:
        """The client's validated names (RFC 7208 §5.5). A DNS error in the PTR lookup leaves
        none (ptr does not match, %{p} is "unknown": §7.3); one in a name's address lookup
        skips that name."""
        try:
            names = yield from self.dns(self.reverse_name, "PTR")
        except SpfTempError:
            return []
        valid = []
        for name in names[:self.limits.ptr_names]:
            try:
                addresses = yield from self.addresses(name)
            except SpfTempError:
                continue
            if cidr_match(self.client, addresses, 128 if self.v6 else 32):
                valid.append(name)
        return valid

    def expand(self, text: str, domain: str, in_exp: bool = False,
               limit: int | None = None) -> Steps:
        if "%" not in text:  # no macro (most domain-specs): no letter values needed
            return expand(text, _NO_VALUES, in_exp, limit)
        if self.p is None and needs_p(text):
            valid = yield from self.validated_ptrs()
            suffix = "." + domain
            self.p = (domain if domain in valid else
                      next((n for n in valid if n.endswith(suffix)), valid[0] if valid
                           else "unknown"))
        values = dict(self.values, d=domain)
        if self.p is not None:
            values["p"] = self.p
        return expand(text, values, in_exp, limit)

    def domain_spec(self, spec: str, domain: str) -> Steps:
        check_domain_spec(spec)
        return (yield from self.expand(spec, domain))

    def count_term(self) -> None:
        self.terms += 1
        if self.terms > self.limits.dns_terms:
            raise SpfPermError("Too many DNS lookups")

    # The record

    def record(self, record: str | None, domain: str, depth: int) -> Steps:
        """(result, exp= domain and the domain it was found in, or None)."""
        if depth > _MAX_RECURSION:
            raise SpfPermError("Too many levels of recursion")
        if not record:
            return "none", None
        terms = record.split(" ")
        if terms[0].lower() != "v=spf1":
            return "none", None
        mechanisms, seen = [], []
        redirect = explanation = None
        for term in (t for t in terms[1:] if t):
            pair = modifier(term)
            if pair is None:
                mechanism = parse_term(term, domain, self.v6)
                if mechanism.name in ("a", "mx", "ptr", "exists", "include"):
                    target = yield from self.domain_spec(mechanism.target, domain)
                    if not target:
                        raise SpfPermError("empty domain:", term)
                    if mechanism.name == "include" and target == domain:
                        raise SpfPermError("include has trivial recursion", term)
                    mechanism = _with_target(mechanism, target)
                mechanisms.append(mechanism)
                continue
            name, value = pair
            if name in seen:
                raise SpfPermError(f"{name}= MUST appear at most once", term)
            seen.append(name)
            if name == "exp":
                if not value:
                    raise SpfPermError("exp has empty domain-spec:", value)
                target = yield from self.domain_spec(value, domain)
                explanation = (target, domain) if target else None
            elif name == "redirect":
                redirect = yield from self.domain_spec(value, domain)
                if not redirect:
                    raise SpfPermError("redirect has empty domain:", value)
            elif name not in ("default", "op"):
                yield from self.expand(value, domain)  # RFC 7208 §6: unknown, but well formed
        for mechanism in mechanisms:
            if (yield from self.matches(mechanism, depth)):
                return mechanism.qualifier, explanation
        if redirect:
            # Counted when followed, as a mechanism is when evaluated (RFC 7208 §4.6.4): a
            # redirect after a match, or beside "all" (§6.1: then ignored), costs nothing.
            self.count_term()
            target_record = yield from self.spf_record(redirect)
            if not target_record:
                raise SpfPermError("redirect domain has no SPF record", redirect)
            return (yield from self.record(target_record, redirect, depth))
        return "neutral", explanation

    def matches(self, mechanism: Mechanism, depth: int) -> Steps:
        name, target = mechanism.name, mechanism.target
        if name == "all":
            return True
        if name == "ip4":
            return not self.v6 and cidr_match(self.client, [target], mechanism.cidr)
        if name == "ip6":
            return self.v6 and cidr_match(self.client, [target], mechanism.cidr)
        self.count_term()
        if name == "include":
            result, _ = yield from self.record((yield from self.spf_record(target)), target,
                                               depth + 1)
            if result == "none":
                raise SpfPermError(f"No valid SPF record for included domain: {target}",
                                   mechanism.term)
            return result == "pass"
        if name == "exists":
            return bool((yield from self.dns(target, "A")))
        if name == "a":
            return cidr_match(self.client, (yield from self.addresses(target)), mechanism.cidr)
        if name == "mx":
            return cidr_match(self.client, (yield from self.mx_addresses(target)),
                              mechanism.cidr)
        suffix = target.lower()  # ptr
        return any(n == suffix or n.endswith("." + suffix)
                   for n in (n.lower() for n in (yield from self.validated_ptrs())))

    def explain(self, spec: str, domain: str) -> Steps:
        """The expanded explanation text, or None (RFC 7208 §6.2: any error ignores it)."""
        try:
            texts = yield from self.txt(spec, count_void=False)
            if len(texts) != 1:
                return None
            text = _ascii(texts[0])
            self.macros = self.macros or "%{" in text
            return (yield from self.expand(text, domain, True, MAX_EXPLANATION + 1))
        except SpfError:
            return None


def _carriable(name: str) -> bool:
    """Whether DNS can carry ``name``: no empty label, none over 63 characters."""
    labels = name.split(".")
    return "" not in labels and max(map(len, labels)) < 64


def _with_target(mechanism: Mechanism, target: str) -> Mechanism:
    # Not dataclasses.replace, which reads every field by name first (five times the cost).
    return filled(Mechanism, term=mechanism.term, name=mechanism.name,
                  qualifier=mechanism.qualifier, target=target, cidr=mechanism.cidr)


def _ascii(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise SpfPermError("Non-ascii characters found", repr(raw)[:100]) from None


def check_host(ip: str | IPAddress, sender: str, helo: str, limits: Limits | None = None,
               now: int = 0, receiver: str = "unknown") -> Steps:
    """See the module docstring (``ip`` as text or parsed): yields questions, returns a
    Verdict."""
    state = _Evaluation(ip, sender, helo, limits or Limits(), now, receiver)
    try:
        record = yield from state.spf_record(state.domain)
        result, explanation = yield from state.record(record, state.domain, 0)
    except SpfTempError as error:
        return Verdict("temperror", f"SPF Temporary Error: {error}", state.macros)
    except SpfPermError as error:
        return Verdict("permerror", f"SPF Permanent Error: {error}", state.macros)
    if explanation is not None and result == "fail":  # RFC 7208 §6.2: for a fail only
        text = yield from state.explain(*explanation)
        if text is not None:
            return Verdict(result, text, state.macros, explained=True)
    return Verdict(result, DEFAULT_EXPLANATIONS[result], state.macros)
