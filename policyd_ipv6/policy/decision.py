"""The decision: which reply a policy request gets, as one ordered table of pure rules.

Contract: ``decide(subject, facts, policy, optin)`` is a pure function. It walks ``RULES`` in
order (leaving out, once per configuration, the rules whose option is off under ``policy``:
``Rule.relevant``, ``walk``); the first rule that applies gives the ``Verdict`` (an
``action=`` value and the rule's name for the log), unless its refusal is only reported
(below). A rule that needs a fact
that has not been gathered yet (``facts.rdns`` or ``facts.spf`` is None) stops the walk and
``decide`` returns that ``Need`` instead, so the caller
looks up only what the decision really needs, and can decide as soon as the first fact that
settles it arrives (a missing PTR decides without waiting for SPF).

The order is the project's contract (README, "Decisions"): not applicable -> DUNNO; not opted
in -> 550 5.2.1; rDNS temporary failure -> 451 4.4.3; no (or unconfirmed) PTR -> 450 4.7.25;
SPF temporary failure -> 451 4.4.3; SPF not pass -> 450 4.7.26 unless the built-in milter will
decide on DKIM at end of message; otherwise DUNNO. A transient fault never yields a 5xx: the
temporary reply is validated to be 4xx when the configuration is loaded.

Exemptions before the opt-in rule: a TLS client certificate pinned in
``exempt_client_certificates`` (rule tls-connector, at any domain). After it: unlisted domains
under ``unlisted_domains = "ignore"`` (unlisted-ignored) and the local parts of
``exempt_recipients`` (exempt-recipient). ``rdns_exempt_sender_domains`` turns the PTR rule
into one that needs SPF too: a listed sender that passes SPF goes on without a PTR
(no-rdns-unauthenticated refuses one that does not).

Reporting, as data: each refusal rule has a ``kind`` (the name ``report_only_rules`` uses).
In report mode (``mode``, or the opt-in entry's ``mode=`` option, which overrides it) the
first refusal that applies gives ``DUNNO`` with ``rule`` the refusing rule and ``would`` its
reply; so does the opt-in rule under ``unlisted_domains = "report"``. In enforce mode a
refusal whose kind is in ``report_only_rules`` is noted in ``would`` (the first one) and the
walk goes on: the reply is the first enforced refusal, or the DUNNO at the end, carrying the
note. ``Verdict.reported`` says which kinds were only reported for this recipient: the
milter reads it at end of message.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Protocol

from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.names import IPAddress, client_ip, domain_key, recipient_domain
from policyd_ipv6.optin.table import OptinEntry, OptinTable, parse_optin
from policyd_ipv6.policy.replies import LONGEST, Replies
from policyd_ipv6.text import printable
from policyd_ipv6.vocabulary import REPORTABLE_RULES, PolicyRule, SpfResult

__all__ = ["Subject", "Policy", "Verdict", "Need", "decide", "RULES", "FACT_RULES", "DUNNO",
           "rdns_mode", "entry_rdns"]

DUNNO = "DUNNO"
_EVERY_KIND = frozenset(REPORTABLE_RULES)
_NO_PTR = (RdnsOutcome.MISSING, RdnsOutcome.UNCONFIRMED)
_NOT_FAILED = (SpfResult.PASS, SpfResult.TEMPERROR)


@dataclass(frozen=True)
class Subject:
    """The parts of a policy request the decision reads (SMTPD_POLICY_README attribute names)."""

    protocol_state: str
    client_address: str
    ip: IPAddress | None
    helo_name: str
    sender: str
    recipient: str
    recipient_domain: str | None
    sasl_username: str
    instance: str
    reverse_client_name: str = "unknown"
    client_name: str = "unknown"
    ccert_fingerprint: str = ""  # Postfix 2.2+, "AB:CD:..." in smtpd_tls_fingerprint_digest
    ccert_pubkey_fingerprint: str = ""  # Postfix 2.9+
    encryption_protocol: str = ""  # "TLSv1.3"; empty for a plaintext session
    queue_id: str = ""  # empty until Postfix opens the queue file (smtpd_delay_open)

    @classmethod
    def from_request(cls, attrs: dict[str, str]) -> Subject:
        """Build a Subject from decoded request attributes; missing ones are empty."""
        # The attributes copied as they are, read in C (one merge with the defaults, one
        # itemgetter): sixteen dict.get calls were a tenth of a warm decision. The instance
        # dict is set once (no generated __init__: an object.__setattr__ per field).
        fields = dict(zip(_COPIED, _read_copied({**_COPIED_DEFAULTS, **attrs})))
        fields["protocol_state"] = fields["protocol_state"].upper()
        fields["ip"] = client_ip(fields["client_address"])
        fields["recipient_domain"] = recipient_domain(fields["recipient"])
        fields["reverse_client_name"] = fields["reverse_client_name"] or "unknown"
        fields["client_name"] = fields["client_name"] or "unknown"
        subject: Subject = object.__new__(cls)
        subject.__dict__.update(fields)
        return subject

    def local_part(self) -> str:
        """The recipient's local part, case-folded ("" when it has no domain)."""
        if self.recipient_domain is None:
            return ""
        return self.recipient.strip().strip("<>").rpartition("@")[0].casefold()


# The request attributes a Subject keeps under their own names (SMTPD_POLICY_README), read at
# once by from_request; ip and recipient_domain are derived.
_COPIED = ("protocol_state", "client_address", "helo_name", "sender", "recipient",
           "sasl_username", "instance", "reverse_client_name", "client_name",
           "ccert_fingerprint", "ccert_pubkey_fingerprint", "encryption_protocol", "queue_id")
_COPIED_DEFAULTS = dict.fromkeys(_COPIED, "")
_read_copied = itemgetter(*_COPIED)


@dataclass(frozen=True)
class Policy:
    """The configuration the decision depends on (the keys of the same names, as
    ``daemon.values`` normalises them: local parts case-folded, fingerprints lower-case hex
    without colons, sender domains as opt-in entries)."""

    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    replies: Replies = field(default_factory=Replies)
    mode: str = "enforce"  # or "report"
    report_only_rules: frozenset[PolicyRule] = frozenset()
    unlisted_domains: str = "refuse"  # "enforce", "report" or "ignore"
    exempt_recipients: tuple[str, ...] = ("postmaster", "abuse")
    exempt_client_certificates: tuple[str, ...] = ()
    rdns_exempt_sender_domains: tuple[str, ...] = ()
    _nets: dict[int, tuple[tuple[int, int], ...]] = field(init=False, repr=False, compare=False)
    _senders: OptinTable = field(init=False, repr=False, compare=False)
    # The walks this policy takes, from the first rule and from FACT_RULES (``walk``).
    _walks: dict[int, tuple] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (network, netmask) as integers per IP version: one AND and compare per network.
        nets: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for n in self.trusted_networks:
            nets[n.version].append((int(n.network_address), int(n.netmask)))
        object.__setattr__(self, "_nets", {v: tuple(pairs) for v, pairs in nets.items()})
        object.__setattr__(self, "_senders",
                           parse_optin("\n".join(self.rdns_exempt_sender_domains)))
        object.__setattr__(self, "_walks", {0: walk(self, 0), FACT_RULES: walk(self, FACT_RULES)})
        object.__setattr__(self, "resume_at",
                           0 if PolicyRule.NOT_OPTED_IN in self.report_only_rules else FACT_RULES)

    # Where a walk may resume after a Need: FACT_RULES, unless a refusal before it can be only
    # reported (its note must be taken again). Set by __post_init__.
    resume_at: int = field(init=False, repr=False, compare=False)

    def pinned(self, s: Subject) -> bool:
        """Whether the client presented a certificate in exempt_client_certificates."""
        return bool(self.exempt_client_certificates) and any(
            value.replace(":", "").lower() in self.exempt_client_certificates
            for value in (s.ccert_fingerprint, s.ccert_pubkey_fingerprint) if value)

    def rdns_exempt(self, s: Subject) -> bool:
        """Whether the sender's domain is in rdns_exempt_sender_domains."""
        return bool(self.rdns_exempt_sender_domains) and self._senders.matches(
            recipient_domain(s.sender) if s.sender else None)

    def trusts(self, ip: IPAddress) -> bool:
        nets = self._nets[ip.version]
        if nets:
            value = int(ip)
            for network, mask in nets:
                if value & mask == network:
                    return True
        return False


class Optin(Protocol):
    """What the decision asks of the opt-in table (``optin.table.OptinTable``)."""

    def entry(self, domain: str | None) -> OptinEntry | None: ...


class Need(enum.Enum):
    """A fact the decision needs before it can go on."""

    RDNS = "rdns"
    SPF = "spf"


@dataclass(frozen=True)
class Verdict:
    """The reply (the value of ``action=``) and the name of the rule that chose it; ``would``:
    a refusal only reported (logged as would=); ``reported``: the refusal kinds only reported
    for this recipient (report mode: all of them)."""

    action: str
    rule: PolicyRule
    would: str = ""
    reported: frozenset[PolicyRule] = frozenset()


@dataclass(frozen=True)
class Rule:
    """One line of the decision table. ``applies`` gets the opt-in entry of the recipient
    domain (None: not listed); ``kind`` is set for a refusal (report_only_rules' name)."""

    name: PolicyRule
    needs: tuple[Need, ...]
    applies: Callable[[Subject, Facts, Policy, OptinEntry | None], bool]
    reply: Callable[[Subject, Facts, Policy], str]
    kind: PolicyRule | None = None
    # False for a policy under which ``applies`` is false for every request and facts (the
    # option it reads is off): ``walk`` leaves the rule out of that policy's walks.
    relevant: Callable[[Policy], bool] = lambda p: True


def _dunno(s: Subject, f: Facts, p: Policy) -> str:
    return DUNNO


def _fit(text: str, longest: str) -> str:
    """``text`` cut to the length of ``LONGEST``'s value (escapes can make a clipped value up
    to ten times longer), so every reply stays within what validate_reply checked."""
    return text if len(text) <= len(longest) else text[:len(longest) - 3] + "..."


def _address(s: Subject) -> str:
    if s.ip is not None:
        return str(s.ip)
    return _fit(printable(s.client_address, 64), LONGEST["address"])


def _reply_domain(domain: str) -> str:
    # "as the client wrote it, lower-cased"; a non-ASCII domain is shown as its A-labels so the
    # reply stays ASCII (Postfix treats malformed UTF-8 in a reply as a failed request).
    if domain.isascii() and domain.isprintable():
        shown = printable(domain, 255)
    else:
        shown = domain_key(domain) or printable(domain, 255)
    return _fit(shown, LONGEST["domain"])


def _not_opted_in(s: Subject, f: Facts, p: Policy) -> str:
    # A recipient without a domain is named whole (printable, bounded).
    shown = s.recipient_domain if s.recipient_domain is not None else s.recipient.strip("<> ")
    return p.replies.not_opted_in.format(domain=_reply_domain(shown))


def _no_rdns(s: Subject, f: Facts, p: Policy) -> str:
    return p.replies.no_reverse_dns.format(address=_address(s))


def _auth_failed(s: Subject, f: Facts, p: Policy) -> str:
    return p.replies.auth_failed.format(address=_address(s))


def _rdns_temporary(s: Subject, f: Facts, p: Policy) -> str:
    return p.replies.temporary.format(address=_address(s), check="reverse DNS")


def _spf_temporary(s: Subject, f: Facts, p: Policy) -> str:
    return p.replies.temporary.format(address=_address(s), check="SPF")


def _ip(s: Subject) -> IPAddress:
    assert s.ip is not None  # the not-an-address rule comes first
    return s.ip


def _rdns(f: Facts) -> RdnsFact:
    assert f.rdns is not None  # the rule needs it: decide() returned Need.RDNS until it came
    return f.rdns


def _spf(f: Facts) -> SpfFact:
    assert f.spf is not None
    return f.spf


# The table. Each line: name, facts needed, when it applies, the reply (and for a refusal,
# its kind). First match wins; a refusal only reported lets the walk go on (module docstring).
_R, _K = Rule, PolicyRule
RULES: tuple[Rule, ...] = (
    # Policy requests outside RCPT mean a wiring mistake; never refuse mail because of it.
    _R(_K.WRONG_STAGE, (), lambda s, f, p, e: s.protocol_state != "RCPT", _dunno),
    _R(_K.NOT_AN_ADDRESS, (), lambda s, f, p, e: s.ip is None, _dunno),
    _R(_K.IPV4, (), lambda s, f, p, e: _ip(s).version == 4, _dunno),
    _R(_K.AUTHENTICATED, (), lambda s, f, p, e: s.sasl_username != "", _dunno),
    _R(_K.TRUSTED_NETWORK, (), lambda s, f, p, e: p.trusts(_ip(s)), _dunno,
       relevant=lambda p: bool(p.trusted_networks)),
    # RFC 5321 §4.5.1: a bare "Postmaster" (no domain) must be accepted. Other recipients
    # without a domain cannot be in the opt-in table: the opt-in rule refuses them.
    _R(_K.POSTMASTER, (), lambda s, f, p, e: s.recipient_domain is None
       and s.recipient.strip().strip("<>").lower() == "postmaster", _dunno),
    # A pinned client certificate is a connector partner, not anonymous mail (EOP's meaning):
    # exempt at any recipient domain, so before the opt-in rule.
    _R(_K.TLS_CONNECTOR, (), lambda s, f, p, e: p.pinned(s), _dunno,
       relevant=lambda p: bool(p.exempt_client_certificates)),
    _R(_K.NOT_OPTED_IN, (), lambda s, f, p, e: e is None
       and p.unlisted_domains in ("refuse", "report"), _not_opted_in, _K.NOT_OPTED_IN,
       relevant=lambda p: p.unlisted_domains in ("refuse", "report")),
    _R(_K.UNLISTED_IGNORED, (), lambda s, f, p, e: e is None
       and p.unlisted_domains == "ignore", _dunno,
       relevant=lambda p: p.unlisted_domains == "ignore"),
    _R(_K.EXEMPT_RECIPIENT, (), lambda s, f, p, e: s.local_part() in p.exempt_recipients,
       _dunno, relevant=lambda p: bool(p.exempt_recipients)),
    _R(_K.RDNS_TEMPORARY, (Need.RDNS,),
       lambda s, f, p, e: _rdns(f).outcome is RdnsOutcome.TEMPFAIL, _rdns_temporary,
       _K.RDNS_TEMPORARY),
    # The PTR and SPF refusals never cover a temporary failure: when rdns-temporary or
    # spf-temporary is only reported, a DNS fault must not become "no PTR" or "no SPF".
    _R(_K.NO_RDNS, (Need.RDNS,), lambda s, f, p, e: _rdns(f).outcome in _NO_PTR
       and not p.rdns_exempt(s), _no_rdns, _K.NO_RDNS),
    _R(_K.SPF_TEMPORARY, (Need.SPF,),
       lambda s, f, p, e: _spf(f).result == SpfResult.TEMPERROR, _spf_temporary,
       _K.SPF_TEMPORARY),
    # rdns_exempt_sender_domains: without a PTR, only a sender that passes SPF goes on, or,
    # with the milter on the connection, one whose domain's DKIM signature verifies there.
    _R(_K.NO_RDNS_DKIM_PENDING, (Need.RDNS, Need.SPF),
       lambda s, f, p, e: _rdns(f).outcome in _NO_PTR and p.rdns_exempt(s)
       and _spf(f).result != SpfResult.PASS and f.dkim_pending, _dunno,
       relevant=lambda p: bool(p.rdns_exempt_sender_domains)),
    _R(_K.NO_RDNS_UNAUTHENTICATED, (Need.RDNS, Need.SPF),
       lambda s, f, p, e: _rdns(f).outcome in _NO_PTR and p.rdns_exempt(s)
       and _spf(f).result != SpfResult.PASS, _no_rdns, _K.NO_RDNS,
       relevant=lambda p: bool(p.rdns_exempt_sender_domains)),
    # Issue: SPF or DKIM. When the built-in milter is in this connection's path it verifies
    # DKIM at end of message and gives 4.7.26 itself if that fails too.
    _R(_K.SPF_FAILED_DKIM_PENDING, (Need.SPF,),
       lambda s, f, p, e: _spf(f).result not in _NOT_FAILED and f.dkim_pending, _dunno),
    _R(_K.SPF_FAILED, (Need.SPF,),
       lambda s, f, p, e: _spf(f).result not in _NOT_FAILED, _auth_failed, _K.SPF_FAILED),
    _R(_K.PASS, (), lambda s, f, p, e: True, _dunno),
)

# A fact's bit in the masks of the walk: set in ``missing`` while the fact is unknown.
_BIT = {Need.RDNS: 1, Need.SPF: 2}


def _first_missing(needs: tuple[Need, ...]) -> tuple[Need | None, ...]:
    """For each ``missing`` mask (0-3), the first of ``needs`` it has: the Need to return."""
    return tuple(next((n for n in needs if _BIT[n] & missing), None) for missing in range(4))


# The table as the walk reads it, computed once: each rule's needs as a mask, the Need to
# return for each mask of missing facts, then its fields as plain tuple items.
_STEPS = tuple((sum(_BIT[n] for n in rule.needs), _first_missing(rule.needs), rule.applies,
                rule.reply, rule.kind, rule.name) for rule in RULES)


# Rules before this index need no fact: once a walk has passed them (and returned a Need), a
# later walk for the same request may start here.
FACT_RULES = next(i for i, rule in enumerate(RULES) if rule.needs)


def walk(policy: Policy, start: int = 0) -> tuple:
    """The steps of RULES[start:] that can apply under ``policy`` (``Rule.relevant``): a rule
    whose option is off is never asked, computed once per configuration."""
    return tuple(step for rule, step in zip(RULES[start:], _STEPS[start:])
                 if rule.relevant(policy))


def rdns_mode(subject: Subject, optin: Optin) -> str | None:
    """The recipient's opt-in entry's rdns= option, or None (the configured rdns)."""
    return entry_rdns(optin.entry(subject.recipient_domain))


def entry_rdns(entry: Any) -> str | None:
    """An opt-in entry's rdns= option (``rdns_mode`` for an entry already looked up)."""
    return entry.rdns if entry is not None else None


_LOOK_UP = object()  # decide's ``entry`` default: look it up in ``optin``


def decide(subject: Subject, facts: Facts, policy: Policy, optin: Optin,
           start: int = 0, entry: Any = _LOOK_UP) -> Verdict | Need:
    """Return the verdict of the walk (module docstring), or the first fact still needed.

    ``optin`` is anything with ``entry(domain)`` (an ``OptinTable``). ``start`` skips the
    first rules; ``policy.resume_at`` is valid for a request whose walk from 0 returned a
    ``Need``, since the rules before it do not depend on facts. ``entry``, when given, is
    ``optin.entry(subject.recipient_domain)`` already looked up (the engine walks a request's
    table up to twice and reads its rdns= option besides).
    """
    if entry is _LOOK_UP:
        entry = optin.entry(subject.recipient_domain)
    report = (entry.mode if entry is not None and entry.mode else policy.mode) == "report"
    reported = _EVERY_KIND if report else policy.report_only_rules
    would = ""
    steps = policy._walks.get(start)
    missing = (facts.rdns is None) | ((facts.spf is None) << 1)
    for needs, first, applies, reply, kind, name in (walk(policy, start) if steps is None
                                                     else steps):
        if needs & missing:
            return first[missing]
        if not applies(subject, facts, policy, entry):
            continue
        action = reply(subject, facts, policy)
        if kind is None:
            return Verdict(action, name, would, reported)
        if report or (kind is PolicyRule.NOT_OPTED_IN and policy.unlisted_domains == "report"):
            return Verdict(DUNNO, name, action, reported)
        if kind in policy.report_only_rules:
            would = would or action
            continue
        return Verdict(action, name, would, reported)
    raise AssertionError("the last rule always applies")  # pragma: no cover
