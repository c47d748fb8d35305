"""The milter's decision at end of message, and the Authentication-Results header it writes.

Contract: pure functions, no I/O, shared by the milter adapter (``milter_server``) and
``policyd-ipv6 check --message``.

- ``needs_check(record, too_large)`` tells what end of message needs before it can decide:
  ``None`` (decide at once, see ``decide_end``) or ``"dkim"`` (run ``check_dkim`` first).
- ``decide_end(record, too_large, dkim, replies, authserv_id, forged)`` returns an
  ``EndDecision``: the milter response (``Disposition`` or an exact ``ReplyCode``), the header
  edits, the rule that chose it (for the log) and the Authentication-Results text.
  ``forged`` are the deletions of the incoming Authentication-Results that claim our
  authserv-id (``Message.marked_deletions()`` of a session marking with
  ``authres.forged_authres``, or ``forged_deletions(headers, authserv_id)``); ``None`` when
  that list is incomplete.

Forged headers are deleted from every message that is let through, whoever sent it (RFC
8601 §5): the milter stays on IPv4, trusted and authenticated connections for this alone.
Our own header cannot be told from a forgery by its content, only by the order of milters:
an Authentication-Results with our authserv-id that a milter listed *before* ours in
``smtpd_milters`` added reaches us as an ordinary header (Postfix re-reads the queue file for
each milter, following earlier milters' edits) and is deleted too. So policyd-ipv6 must be
the first milter that uses this authserv-id; milters after it add theirs untouched.

The rules, first match wins:

====================  ===============================================================
forged-incomplete     more forged headers than the session keeps: TEMPFAIL (they could
                      not all be removed; one left would be a result forged in our name)
not-concerned         the policy recorded nothing the milter acts on (IPv4, trusted and
                      authenticated clients, Postmaster-only mail, a policy not wired):
                      ACCEPT after deleting the forged headers; no header of ours
too-large-unverified  SPF failed and the message is over the collection bound, so DKIM
                      cannot be checked: the configured ``auth_failed`` reply (4.7.26)
too-large             SPF passed, message over the bound: ACCEPT after deleting the
                      forged headers (marked past the bound too); no header of ours,
                      since DKIM was not checked
no-rdns-unauthenticated
                      a sender of rdns_exempt_sender_domains without PTR that failed
                      SPF: no passing signature whose d= is its domain (or a parent):
                      ``no_reverse_dns`` (450 4.7.25)
dkim-temporary        SPF failed, no signature verifies, a key lookup failed
                      temporarily: ``temporary`` with check="DKIM" (451 4.4.3)
dkim-failed           SPF failed, signed, no valid signature: ``auth_failed``
unsigned              SPF failed, no signature: ``auth_failed``
dkim-pass / spf-pass  CONTINUE, after deleting every incoming Authentication-Results
                      that claims our authserv-id (RFC 8601 §5) and inserting ours just
                      below Postfix's own Received: header
====================  ===============================================================

Report mode: when every recipient the policy let through for DKIM only reports the refusal's
kind (``MessageRecord.reports``: spf-failed for too-large-unverified, dkim-failed and unsigned,
spf-temporary for dkim-temporary), the decision is CONTINUE with the usual header edits
(forged ones deleted, ours inserted when DKIM was checked), the same rule, and ``would`` the
refusal text.

The refusals are the configured texts exactly (``replies``, validated at start-up as one
line, 4xx/5xx with a matching enhanced code), so Postfix passes them to the client verbatim.
Unsigned and badly signed mail are told apart in the log and the rule name, not in the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from policyd_ipv6.facts import DkimFact, RdnsOutcome
from policyd_ipv6.milter import authres
from policyd_ipv6.milter.codec import ChangeHeader, Disposition, HeaderEdit, InsertHeader, ReplyCode
from policyd_ipv6.names import domain_key, helo_domain, host_name, recipient_domain
from policyd_ipv6.policy.replies import Replies
from policyd_ipv6.text import printable
from policyd_ipv6.vocabulary import DkimResult, EndRule, PolicyRule

__all__ = ["EndDecision", "needs_check", "decide_end", "auth_results", "claims_authserv_id",
           "forged_deletions", "AR_HEADER"]

AR_HEADER = authres.AR_NAME
# Below Postfix's own Received: header (index 0 would put it above), as trace headers go.
AR_INDEX = 1
_IPREV = {RdnsOutcome.PASS: "pass", RdnsOutcome.MISSING: "fail",
          RdnsOutcome.UNCONFIRMED: "fail", RdnsOutcome.TEMPFAIL: "temperror"}
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_SELECTOR = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


@dataclass(frozen=True)
class EndDecision:
    response: Disposition | ReplyCode
    edits: tuple[HeaderEdit, ...] = ()
    rule: EndRule = EndRule.NOT_CONCERNED
    auth_results: str = ""  # the header value inserted, "" if none
    would: str = ""  # a refusal only reported (report mode): the message is let through


# The policy rule (report_only_rules name) each end-of-message refusal counts as.
_KIND = {EndRule.NO_RDNS_UNAUTHENTICATED: PolicyRule.NO_RDNS,
         EndRule.TOO_LARGE_UNVERIFIED: PolicyRule.SPF_FAILED,
         EndRule.DKIM_FAILED: PolicyRule.SPF_FAILED, EndRule.UNSIGNED: PolicyRule.SPF_FAILED,
         EndRule.DKIM_TEMPORARY: PolicyRule.SPF_TEMPORARY}


def needs_check(record, too_large: bool) -> str | None:
    """"dkim" when end of message must verify signatures first, else None."""
    if record is None or not record.concerned or too_large:
        return None
    return "dkim"


def decide_end(record, too_large: bool, dkim: DkimFact | None, replies: Replies,
               authserv_id: str, forged: tuple[ChangeHeader, ...] | None = ()) -> EndDecision:
    """See the module docstring. ``forged``: deletions, highest index first, or None."""
    if forged is None:
        return EndDecision(Disposition.TEMPFAIL, rule=EndRule.FORGED_INCOMPLETE)
    if record is None or not record.concerned:
        return EndDecision(Disposition.ACCEPT, forged, rule=EndRule.NOT_CONCERNED)
    subject, facts = record.evidence()
    address = str(subject.ip) if subject.ip is not None else printable(subject.client_address, 64)
    if too_large:
        if record.needs_dkim:
            text = (replies.no_reverse_dns if record.needs_aligned_dkim
                    else replies.auth_failed).format(address=address)
            kind = PolicyRule.NO_RDNS if record.needs_aligned_dkim else PolicyRule.SPF_FAILED
            if record.reports(kind):
                return EndDecision(Disposition.ACCEPT, forged, EndRule.TOO_LARGE_UNVERIFIED,
                                   would=text)
            return EndDecision(ReplyCode(text), rule=EndRule.TOO_LARGE_UNVERIFIED)
        return EndDecision(Disposition.ACCEPT, forged, rule=EndRule.TOO_LARGE)
    if dkim is None:
        raise ValueError("decide_end needs the DKIM fact of a concerned message")
    value = auth_results(authserv_id, subject, facts, dkim)
    edits: tuple[HeaderEdit, ...] = (*forged, InsertHeader(AR_INDEX, AR_HEADER, " " + value))
    if record.needs_aligned_dkim and dkim.result != DkimResult.TEMPERROR and not _aligned(
            dkim, subject.sender):
        # rdns_exempt_sender_domains: only the sender domain's own signature stands in for
        # the missing PTR (another domain's pass proves nothing about this sender).
        text = replies.no_reverse_dns.format(address=address)
        rule = EndRule.NO_RDNS_UNAUTHENTICATED
        if record.reports(_KIND[rule]):
            return EndDecision(Disposition.CONTINUE, edits, rule, value, would=text)
        return EndDecision(ReplyCode(text), rule=rule)
    if record.needs_dkim and dkim.result != DkimResult.PASS:
        if dkim.result == DkimResult.TEMPERROR:
            text = replies.temporary.format(address=address, check="DKIM")
            rule = EndRule.DKIM_TEMPORARY
        else:
            text = replies.auth_failed.format(address=address)
            rule = EndRule.UNSIGNED if dkim.result == DkimResult.NONE else EndRule.DKIM_FAILED
        if record.reports(_KIND[rule]):
            return EndDecision(Disposition.CONTINUE, edits, rule, value, would=text)
        return EndDecision(ReplyCode(text), rule=rule)
    rule = EndRule.DKIM_PASS if record.needs_dkim else EndRule.SPF_PASS
    return EndDecision(Disposition.CONTINUE, edits, rule, value)


def _aligned(dkim: DkimFact, sender: str) -> bool:
    """Whether a passing signature's d= is the sender's domain or a parent of it."""
    domain = domain_key(recipient_domain(sender.strip().strip("<>")) or "")
    if domain is None:
        return False
    for sig in dkim.signatures:
        d = domain_key(sig.domain) if sig.result == DkimResult.PASS else None
        if d is not None and (domain == d or domain.endswith("." + d)):
            return True
    return False


def forged_deletions(headers, authserv_id: str) -> tuple[ChangeHeader, ...]:
    """Deletions (highest index first: Postfix unlinks a deleted header) of the
    ``events.Header``s that are Authentication-Results claiming ``authserv_id``."""
    forged = [h for h in headers if authres.is_authres(h.name)
              and authres.claims(h.value, authserv_id)]
    return tuple(ChangeHeader(h.index, h.name.decode("ascii", "replace"), "")
                 for h in sorted(forged, key=lambda h: h.index, reverse=True))


def claims_authserv_id(value: bytes, authserv_id: str) -> bool:
    """Whether an Authentication-Results value claims ``authserv_id`` (``authres.claims``:
    an RFC 8601 parse, or our id as a token of a value that does not parse)."""
    return authres.claims(value, authserv_id)


def _pvalue_address(address: str) -> str | None:
    """An envelope address as an RFC 8601 pvalue: local@domain, or the domain alone when the
    local part is not a dot-atom; None when there is no usable domain."""
    address = address.strip().strip("<>")
    domain = domain_key(recipient_domain(address) or "")
    if domain is None:
        return None
    local = address.rpartition("@")[0]
    return f"{local}@{domain}" if _DOT_ATOM.fullmatch(local) else domain


def _reason(text: str) -> str:
    # A quoted-string: printable() escapes '"' and '\' as quoted-pairs.
    return f' reason="{printable(text, 80)}"' if text else ""


def auth_results(authserv_id: str, subject, facts, dkim: DkimFact) -> str:
    """The Authentication-Results value (RFC 8601), folded with "\\n\\t" between results."""
    parts = [authserv_id]
    rdns = facts.rdns
    if rdns is not None and subject.ip is not None:
        name = rdns.confirmed or (rdns.names[0] if rdns.names else "")
        # The name may come from Postfix's reverse_client_name / client_name attributes:
        # only a valid host name goes into the comment (no ")", ";" or line break).
        name = (host_name(name) or "") if name else ""
        comment = f" ({name})" if name else ""
        parts.append(f"iprev={_IPREV[rdns.outcome]} policy.iprev={subject.ip}{comment}")
    spf = facts.spf
    if spf is not None:
        if subject.sender:
            identity = _pvalue_address(subject.sender)
            prop = f" smtp.mailfrom={identity}" if identity else ""
        else:
            helo = helo_domain(subject.helo_name)
            prop = f" smtp.helo={helo}" if helo else ""
        parts.append(f"spf={spf.result}{prop}")
    if not dkim.signatures:
        parts.append("dkim=none")
    for sig in dkim.signatures:
        props = ""
        d, s = domain_key(sig.domain), sig.selector
        if d:
            props += f" header.d={d}"
        if s and _SELECTOR.fullmatch(s):
            props += f" header.s={s}"
        if sig.b_prefix:
            props += f" header.b={sig.b_prefix}"
        reason = _reason(sig.reason) if sig.result != DkimResult.PASS else ""
        parts.append(f"dkim={sig.result}{reason}{props}")
    return ";\n\t".join(parts)
