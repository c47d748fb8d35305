"""The shared vocabulary: the words checks produce and decisions compare, and the shapes of
the collaborators that are injected everywhere (the clock, the DNS client, the lookups).

Contract: definitions only (enums, the ``Answer`` value a DNS lookup gives, protocols), no
behaviour beyond packing an answer for a cache (``filled`` builds a frozen value from its
fields, as unpacking one does), no I/O and no Twisted at run time (``Deferred`` and
the DNS types in the collaborators' signatures are imported for the type checker alone). Each
enum is a ``StrEnum``: a member equals, formats and logs as exactly its value, so log lines,
replies and headers read byte for byte as the plain strings they replace, and a plain string
from a test or a fake compares equal to the member.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


__all__ = ["DnsStatus", "Answer", "filled", "SpfResult", "DkimResult", "PolicyRule",
           "REPORTABLE_RULES", "EndRule", "DelayedCall",
           "Clock", "DnsClient", "Lookups"]


class DnsStatus(enum.StrEnum):
    """What a lookup found (``resolver.lookups.Answer.status``)."""

    OK = "ok"  # records of the type asked for, in ``values``
    NXDOMAIN = "nxdomain"  # RFC 8020: the name does not exist
    NODATA = "nodata"  # the name exists without records of that type, or cannot exist
    TEMPFAIL = "tempfail"  # timeout, SERVFAIL, a broken answer: a transient fault


@dataclass(frozen=True)
class Answer:
    """What a DNS lookup gave (``resolver.lookups.Lookups``): ``values`` as plain Python (PTR
    and CNAME targets as lower-case names, A/AAAA as address text, MX as (preference, name),
    TXT as a tuple of ``bytes`` strings per record), the TTL it may be kept for."""

    status: DnsStatus
    values: tuple = ()
    detail: str = ""
    ttl: float = 0.0
    too_large: bool = False  # tempfail: the reply was over the lookup's max_size, not read

    @property
    def ok(self) -> bool:
        return self.status == DnsStatus.OK

    def packed(self) -> tuple:
        """The answer as a plain tuple (how the cache keeps it: see ``cache``)."""
        return (self.status._value_, self.values, self.detail, self.ttl, self.too_large)

    @classmethod
    def unpacked(cls, packed: tuple) -> Answer:
        status, values, detail, ttl, too_large = packed
        return filled(cls, status=_STATUS[status], values=values, detail=detail, ttl=ttl,
                      too_large=too_large)


def filled(cls: Any, **fields: Any) -> Any:
    """An instance of the frozen dataclass ``cls`` with every field given, without its
    generated ``__init__`` (one ``object.__setattr__`` per field): every request builds a
    ``Subject``, and the caches hand out an answer or a fact for nearly every warm decision."""
    made = object.__new__(cls)
    made.__dict__.update(fields)
    return made


_STATUS = {status.value: status for status in DnsStatus}


class SpfResult(enum.StrEnum):
    """RFC 7208 §2.6 results, as pyspf's ``check()`` names them."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    PERMERROR = "permerror"
    TEMPERROR = "temperror"


class DkimResult(enum.StrEnum):
    """RFC 8601 §2.7.1 DKIM results, of one signature or of a whole message (``none``:
    the message is unsigned)."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"
    PERMERROR = "permerror"
    TEMPERROR = "temperror"
    # Signed, but not acceptable here (RFC 8301 rsa-sha1, a key in testing mode, l= shorter
    # than the body) or not verified (over the signature or body-size bound).
    POLICY = "policy"


class PolicyRule(enum.StrEnum):
    """The names of ``policy.decision.RULES``, in table order (the log's ``rule=``)."""

    WRONG_STAGE = "wrong-stage"
    NOT_AN_ADDRESS = "not-an-address"
    IPV4 = "ipv4"
    AUTHENTICATED = "authenticated"
    TRUSTED_NETWORK = "trusted-network"
    POSTMASTER = "postmaster"
    TLS_CONNECTOR = "tls-connector"  # a pinned client certificate: a connector partner
    NOT_OPTED_IN = "not-opted-in"
    UNLISTED_IGNORED = "unlisted-ignored"  # unlisted_domains = "ignore"
    EXEMPT_RECIPIENT = "exempt-recipient"  # exempt_recipients (postmaster@, abuse@)
    RDNS_TEMPORARY = "rdns-temporary"
    NO_RDNS = "no-rdns"
    SPF_TEMPORARY = "spf-temporary"
    # rdns_exempt_sender_domains: a listed sender without PTR that did not authenticate.
    NO_RDNS_UNAUTHENTICATED = "no-rdns-unauthenticated"
    # ... unless the built-in milter will find a DKIM signature of the sender's domain.
    NO_RDNS_DKIM_PENDING = "no-rdns-dkim-pending"
    SPF_FAILED_DKIM_PENDING = "spf-failed-dkim-pending"
    SPF_FAILED = "spf-failed"
    PASS = "pass"


# The refusals report_only_rules may name: a refusal of one of these kinds that applies is
# only logged (would=) and the walk goes on. Every other rule answers DUNNO.
REPORTABLE_RULES = (PolicyRule.NOT_OPTED_IN, PolicyRule.NO_RDNS, PolicyRule.SPF_FAILED,
                    PolicyRule.RDNS_TEMPORARY, PolicyRule.SPF_TEMPORARY)


class EndRule(enum.StrEnum):
    """The names of the milter's end-of-message rules (``milter.end_of_message``)."""

    FORGED_INCOMPLETE = "forged-incomplete"  # too many forged A-R to delete them all
    NOT_CONCERNED = "not-concerned"
    TOO_LARGE_UNVERIFIED = "too-large-unverified"
    TOO_LARGE = "too-large"
    DKIM_TEMPORARY = "dkim-temporary"
    DKIM_FAILED = "dkim-failed"
    UNSIGNED = "unsigned"
    DKIM_PASS = "dkim-pass"
    SPF_PASS = "spf-pass"
    # A PTR-exempt sender without PTR and SPF: no passing DKIM signature of its domain.
    NO_RDNS_UNAUTHENTICATED = "no-rdns-unauthenticated"
    EOM_DEADLINE = "eom-deadline"  # the adapter's: DKIM not settled in time, 451


class DelayedCall(Protocol):
    """A call scheduled by ``Clock.callLater`` (Twisted's ``IDelayedCall``, in part)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def getTime(self) -> float: ...

    def reset(self, secondsFromNow: float) -> None: ...


class Clock(Protocol):
    """The time source everything that expires or times out takes (the reactor, or
    ``twisted.internet.task.Clock`` in tests)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kwargs: Any) -> DelayedCall: ...


class DnsClient(Protocol):
    """Sends one DNS query (``resolver.client.DnsClient``, or a test's fake) and calls
    ``deliver`` once with the response (a fake may give a ``dns.message.Message``, which
    ``lookups.interpret`` reads too) or with the exception of a transient fault, unless the
    query it returns was cancelled first."""

    def ask(self, wire_name: bytes, rdtype: int, deliver: Callable[[Any], object],
            max_size: int = 65_535) -> Any: ...


class Waiter(Protocol):
    """A caller waiting on a lookup (``Lookups.ask``): ``cancel()`` withdraws it."""

    def cancel(self) -> None: ...


class Lookups(Protocol):
    """The typed, cached lookups the checks use (``resolver.lookups.Lookups``, or a fake)."""

    def lookup(self, name: str, rrtype: str,
               max_size: int | None = None) -> Deferred[Answer]: ...

    def ask(self, name: str, rrtype: str, deliver: Callable[[Answer], object],
            max_size: int | None = None) -> Answer | Waiter: ...

    def cached(self, name: str, rrtype: str) -> Answer | None: ...
