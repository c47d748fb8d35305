"""Tests of report mode at the milter's end of message (policyd_ipv6.milter.end_of_message and
the MessageRecord the policy writes): a reported refusal lets the message through with our
Authentication-Results, the forged ones removed, and would= the refusal."""

import pytest

from policyd_ipv6.facts import DkimFact, Facts, RdnsFact, RdnsOutcome, SignatureResult, SpfFact
from policyd_ipv6.milter.codec import ChangeHeader, Disposition, InsertHeader, ReplyCode
from policyd_ipv6.milter.end_of_message import decide_end
from policyd_ipv6.milter.registry import MessageRecord
from policyd_ipv6.policy.decision import Subject, Verdict
from policyd_ipv6.policy.replies import Replies
from policyd_ipv6.vocabulary import REPORTABLE_RULES

ADDR = "2001:db8:1::10"
FACTS = Facts(RdnsFact(RdnsOutcome.PASS, ("mail.sender.test",)), SpfFact("fail"))
UNSIGNED = DkimFact("none")
BAD = DkimFact("fail", signatures=(SignatureResult("fail", "sender.test", "lab", "", "bad"),))
TEMP = DkimFact("temperror", signatures=(SignatureResult("temperror", "sender.test", "lab"),))
NO_AUTH = (f"450 4.7.26 Service unavailable, message sent over IPv6 [{ADDR}] must pass either SPF"
           " or DKIM validation.")
FORGED = (ChangeHeader(2, "Authentication-Results", ""),)
EVERY = frozenset(REPORTABLE_RULES)


def subject(recipient="bob@contoso.com"):
    return Subject.from_request({"protocol_state": "RCPT", "client_address": ADDR,
                                 "sender": "alice@sender.test", "helo_name": "mail.sender.test",
                                 "recipient": recipient})


def record(*reported: frozenset) -> MessageRecord:
    """A message whose recipients were let through for DKIM, each reporting these kinds."""
    r = MessageRecord("<alice@sender.test>")
    for i, kinds in enumerate(reported):
        r.record(subject(f"r{i}@contoso.com"),
                 Verdict("DUNNO", "spf-failed-dkim-pending", reported=kinds), FACTS)
    return r


@pytest.mark.parametrize("dkim, rule", [(UNSIGNED, "unsigned"), (BAD, "dkim-failed"),
                                        (TEMP, "dkim-temporary")])
def test_report_mode_accepts_with_our_header_and_would(dkim, rule):
    """A refusal only reported: CONTINUE, forged headers deleted, ours inserted, would= set."""
    decision = decide_end(record(EVERY), False, dkim, Replies(), "mx.example.com", FORGED)
    assert decision.response is Disposition.CONTINUE and decision.rule == rule
    assert decision.would.startswith("450 4.7.26" if rule != "dkim-temporary" else "451 4.4.3")
    assert decision.edits[0] == FORGED[0] and isinstance(decision.edits[1], InsertHeader)
    assert decision.auth_results.startswith("mx.example.com;")
    assert "spf=fail" in decision.auth_results


def test_report_only_spf_failed_reports_dkim_failure_but_not_dkim_temporary():
    """report_only_rules spf-failed covers unsigned and bad signatures; a DKIM temporary
    failure counts as spf-temporary and is still refused."""
    only = frozenset({"spf-failed"})
    assert decide_end(record(only), False, UNSIGNED, Replies(), "mx").would == NO_AUTH
    temporary = decide_end(record(only), False, TEMP, Replies(), "mx")
    assert isinstance(temporary.response, ReplyCode) and temporary.would == ""


def test_one_enforcing_recipient_makes_the_message_refused():
    """The message is refused when any recipient let through for DKIM enforces the rule."""
    decision = decide_end(record(EVERY, frozenset()), False, UNSIGNED, Replies(), "mx")
    assert decision.response == ReplyCode(NO_AUTH) and decision.would == ""
    assert decide_end(record(frozenset()), False, UNSIGNED, Replies(), "mx").would == ""


def test_too_large_unverified_in_report_mode_is_accepted_without_our_header():
    """A message over the bound cannot be checked: in report mode it is accepted (forged
    headers deleted, no header of ours) and would= names the 4.7.26."""
    decision = decide_end(record(EVERY), True, None, Replies(), "mx", FORGED)
    assert (decision.response, decision.edits, decision.would) == (Disposition.ACCEPT, FORGED,
                                                                    NO_AUTH)
    enforced = decide_end(record(frozenset()), True, None, Replies(), "mx", FORGED)
    assert enforced.response == ReplyCode(NO_AUTH)


NO_PTR = (f"450 4.7.25 Service unavailable, sending IPv6 address [{ADDR}] must have reverse DNS"
          " record.")


def rdns_pending(sender: str = "alice@partner.example", reported=frozenset()) -> MessageRecord:
    """A PTR-exempt sender without PTR and SPF, let through RCPT for its DKIM."""
    r = MessageRecord("<%s>" % sender)
    s = Subject.from_request({"protocol_state": "RCPT", "client_address": ADDR,
                              "sender": sender, "recipient": "bob@contoso.com"})
    r.record(s, Verdict("DUNNO", "no-rdns-dkim-pending", reported=reported),
             Facts(RdnsFact(RdnsOutcome.MISSING), SpfFact("fail")))
    return r


def signed(domain: str, result: str = "pass") -> DkimFact:
    return DkimFact(result, domain, "s1", signatures=(SignatureResult(result, domain, "s1"),))


@pytest.mark.parametrize("dkim, accepted", [
    (signed("partner.example"), True),
    (signed("example"), True),  # a parent of the sender's domain
    (signed("mail.partner.example"), False),  # a subdomain is not the sender's domain
    (signed("other.example"), False),  # another domain's pass proves nothing
    (signed("partner.example", "fail"), False),
    (UNSIGNED, False),
])
def test_rdns_exempt_sender_needs_its_own_domains_dkim(dkim, accepted):
    """Only a passing signature whose d= is the sender's domain (or a parent) stands in for
    the missing PTR; otherwise the 450 4.7.25, not the 4.7.26."""
    decision = decide_end(rdns_pending(), False, dkim, Replies(), "mx")
    if accepted:
        assert (decision.response, decision.rule) == (Disposition.CONTINUE, "dkim-pass")
    else:
        assert decision.response == ReplyCode(NO_PTR)
        assert decision.rule == "no-rdns-unauthenticated"


def test_rdns_exempt_sender_refusal_follows_report_mode():
    """Reported no-rdns lets the message through with would= the 4.7.25; a message too large
    to check gets the 4.7.25 too."""
    reported = decide_end(rdns_pending(reported=frozenset({"no-rdns"})), False, UNSIGNED,
                          Replies(), "mx")
    assert reported.response is Disposition.CONTINUE and reported.would == NO_PTR
    large = decide_end(rdns_pending(), True, None, Replies(), "mx")
    assert large.response == ReplyCode(NO_PTR)
