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
