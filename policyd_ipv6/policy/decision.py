"""The decision: which reply a policy request gets, as one ordered table of pure rules.

Contract: ``decide(subject, facts, policy, optin)`` is a pure function. It walks ``RULES`` in
order; the first rule that applies gives the ``Verdict`` (an ``action=`` value and the rule's
name for the log). A rule that needs a fact that has not been gathered yet (``facts.rdns`` or
``facts.spf`` is None) stops the walk and ``decide`` returns that ``Need`` instead, so the caller
looks up only what the decision really needs, and can decide as soon as the first fact that
settles it arrives (a missing PTR decides without waiting for SPF).

The order is the project's contract (README, "Decisions"): not applicable -> DUNNO; not opted
in -> 550 5.2.1; rDNS temporary failure -> 451 4.4.3; no (or unconfirmed) PTR -> 450 4.7.25;
SPF temporary failure -> 451 4.4.3; SPF not pass -> 450 4.7.26 unless the built-in milter will
decide on DKIM at end of message; otherwise DUNNO. A transient fault never yields a 5xx: the
temporary reply is validated to be 4xx when the configuration is loaded.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.names import IPAddress, client_ip, domain_key, recipient_domain
from policyd_ipv6.policy.replies import Replies
from policyd_ipv6.text import printable
from policyd_ipv6.vocabulary import PolicyRule, SpfResult

__all__ = ["Subject", "Policy", "Verdict", "Need", "decide", "RULES", "FACT_RULES", "DUNNO"]

DUNNO = "DUNNO"


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

    @classmethod
    def from_request(cls, attrs: dict[str, str]) -> Subject:
        """Build a Subject from decoded request attributes; missing ones are empty."""
        get = attrs.get
        recipient = get("recipient", "")
        return cls(
            protocol_state=get("protocol_state", "").upper(),
            client_address=get("client_address", ""),
            ip=client_ip(get("client_address", "")),
            helo_name=get("helo_name", ""),
            sender=get("sender", ""),
            recipient=recipient,
            recipient_domain=recipient_domain(recipient),
            sasl_username=get("sasl_username", ""),
            instance=get("instance", ""),
            reverse_client_name=get("reverse_client_name", "unknown") or "unknown",
            client_name=get("client_name", "unknown") or "unknown",
        )


@dataclass(frozen=True)
class Policy:
    """The configuration the decision depends on."""

    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    replies: Replies = field(default_factory=Replies)
    _nets: dict[int, tuple[tuple[int, int], ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (network, netmask) as integers per IP version: one AND and compare per network.
        nets: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for n in self.trusted_networks:
            nets[n.version].append((int(n.network_address), int(n.netmask)))
        object.__setattr__(self, "_nets", {v: tuple(pairs) for v, pairs in nets.items()})

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

    def matches(self, domain: str | None) -> bool: ...


class Need(enum.Enum):
    """A fact the decision needs before it can go on."""

    RDNS = "rdns"
    SPF = "spf"


@dataclass(frozen=True)
class Verdict:
    """The reply (the value of ``action=``) and the name of the rule that chose it."""

    action: str
    rule: PolicyRule


@dataclass(frozen=True)
class Rule:
    """One line of the decision table."""

    name: PolicyRule
    needs: tuple[Need, ...]
    applies: Callable[[Subject, Facts, Policy, Optin], bool]
    reply: Callable[[Subject, Facts, Policy], str]


def _dunno(s: Subject, f: Facts, p: Policy) -> str:
    return DUNNO


def _address(s: Subject) -> str:
    return str(s.ip) if s.ip is not None else printable(s.client_address, 64)


def _reply_domain(domain: str) -> str:
    # "as the client wrote it, lower-cased"; a non-ASCII domain is shown as its A-labels so the
    # reply stays ASCII (Postfix treats malformed UTF-8 in a reply as a failed request).
    if domain.isascii() and domain.isprintable():
        return printable(domain, 255)
    return domain_key(domain) or printable(domain, 255)


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


# The table. Each line: name, facts needed, when it applies, the reply. First match wins.
RULES: tuple[Rule, ...] = (
    # Policy requests outside RCPT mean a wiring mistake; never refuse mail because of it.
    Rule(PolicyRule.WRONG_STAGE, (), lambda s, f, p, o: s.protocol_state != "RCPT", _dunno),
    Rule(PolicyRule.NOT_AN_ADDRESS, (), lambda s, f, p, o: s.ip is None, _dunno),
    Rule(PolicyRule.IPV4, (), lambda s, f, p, o: _ip(s).version == 4, _dunno),
    Rule(PolicyRule.AUTHENTICATED, (), lambda s, f, p, o: s.sasl_username != "", _dunno),
    Rule(PolicyRule.TRUSTED_NETWORK, (), lambda s, f, p, o: p.trusts(_ip(s)), _dunno),
    # RFC 5321 §4.5.1: a bare "Postmaster" (no domain) must be accepted. Other recipients
    # without a domain cannot be in the opt-in table: the next rule refuses them.
    Rule(PolicyRule.POSTMASTER, (), lambda s, f, p, o: s.recipient_domain is None
         and s.recipient.strip().strip("<>").lower() == "postmaster", _dunno),
    Rule(PolicyRule.NOT_OPTED_IN, (), lambda s, f, p, o: not o.matches(s.recipient_domain),
         _not_opted_in),
    Rule(PolicyRule.RDNS_TEMPORARY, (Need.RDNS,),
         lambda s, f, p, o: _rdns(f).outcome is RdnsOutcome.TEMPFAIL, _rdns_temporary),
    Rule(PolicyRule.NO_RDNS, (Need.RDNS,),
         lambda s, f, p, o: _rdns(f).outcome is not RdnsOutcome.PASS, _no_rdns),
    Rule(PolicyRule.SPF_TEMPORARY, (Need.SPF,),
         lambda s, f, p, o: _spf(f).result == SpfResult.TEMPERROR, _spf_temporary),
    # Issue: SPF or DKIM. When the built-in milter is in this connection's path it verifies
    # DKIM at end of message and gives 4.7.26 itself if that fails too.
    Rule(PolicyRule.SPF_FAILED_DKIM_PENDING, (Need.SPF,),
         lambda s, f, p, o: _spf(f).result != SpfResult.PASS and f.dkim_pending, _dunno),
    Rule(PolicyRule.SPF_FAILED, (Need.SPF,),
         lambda s, f, p, o: _spf(f).result != SpfResult.PASS, _auth_failed),
    Rule(PolicyRule.PASS, (), lambda s, f, p, o: True, _dunno),
)

_FACT_OF = {Need.RDNS: "rdns", Need.SPF: "spf"}
# The table with each rule's needs as (fact attribute, Need) pairs, computed once.
_STEPS = tuple((rule, tuple((_FACT_OF[n], n) for n in rule.needs)) for rule in RULES)


# Rules before this index need no fact: once a walk has passed them (and returned a Need), a
# later walk for the same request may start here.
FACT_RULES = next(i for i, rule in enumerate(RULES) if rule.needs)


def decide(subject: Subject, facts: Facts, policy: Policy, optin: Optin,
           start: int = 0) -> Verdict | Need:
    """Return the verdict of the first rule that applies, or the first fact still needed.

    ``optin`` is anything with ``matches(domain) -> bool`` (an ``OptinTable``). ``start``
    skips the first rules; ``FACT_RULES`` is valid for a request whose walk from 0 returned
    a ``Need``, since the rules before it do not depend on facts.
    """
    for rule, needs in _STEPS[start:]:
        for attribute, need in needs:
            if getattr(facts, attribute) is None:
                return need
        if rule.applies(subject, facts, policy, optin):
            return Verdict(rule.reply(subject, facts, policy), rule.name)
    raise AssertionError("the last rule always applies")  # pragma: no cover
