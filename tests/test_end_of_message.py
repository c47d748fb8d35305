"""Tests of the end-of-message rules and the Authentication-Results text
(policyd_ipv6.end_of_message), with literal records, facts and DKIM results."""

import pytest

from policyd_ipv6.facts import DkimFact, Facts, RdnsFact, RdnsOutcome, SignatureResult, SpfFact
from policyd_ipv6.milter.codec import ChangeHeader, Disposition, InsertHeader, ReplyCode
from policyd_ipv6.milter.end_of_message import (
    auth_results,
    claims_authserv_id,
    decide_end,
    forged_deletions,
    needs_check,
)
from policyd_ipv6.milter.events import Header
from policyd_ipv6.milter.registry import MessageRecord
from policyd_ipv6.policy.decision import Subject
from policyd_ipv6.policy.decision import Verdict as PolicyVerdict
from policyd_ipv6.policy.replies import Replies

ADDR = "2001:db8:1::10"
FACTS = Facts(RdnsFact(RdnsOutcome.PASS, ("mail.sender.test",)), SpfFact("fail"))
PASSED = DkimFact("pass", "sender.test", "lab",
                  signatures=(SignatureResult("pass", "sender.test", "lab", "AbCdEfGh"),))
UNSIGNED = DkimFact("none")
BAD = DkimFact("fail", signatures=(SignatureResult("fail", "sender.test", "lab", "",
                                                   'body hash mismatch "x"'),))
TEMP = DkimFact("temperror", signatures=(SignatureResult("temperror", "sender.test", "lab"),))
REPLIES = Replies(auth_failed="450 4.7.26 custom [{address}] 100% sure",
                  temporary="451 4.4.3 try later ({check}) [{address}]")


def subject(sender="alice@sender.test", helo="mail.sender.test"):
    return Subject.from_request({"protocol_state": "RCPT", "client_address": ADDR,
                                 "sender": sender, "helo_name": helo,
                                 "recipient": "bob@contoso.com"})


def record(rule, sender="alice@sender.test", facts=FACTS):
    r = MessageRecord("<%s>" % sender)
    r.record(subject(sender), PolicyVerdict("DUNNO", rule), facts)
    return r


@pytest.mark.parametrize("rule, dkim, response, name", [
    ("spf-failed-dkim-pending", UNSIGNED, ReplyCode(f"450 4.7.26 custom [{ADDR}] 100% sure"),
     "unsigned"),
    ("spf-failed-dkim-pending", BAD, ReplyCode(f"450 4.7.26 custom [{ADDR}] 100% sure"),
     "dkim-failed"),
    ("spf-failed-dkim-pending", TEMP, ReplyCode(f"451 4.4.3 try later (DKIM) [{ADDR}]"),
     "dkim-temporary"),
    ("spf-failed-dkim-pending", PASSED, Disposition.CONTINUE, "dkim-pass"),
    ("pass", UNSIGNED, Disposition.CONTINUE, "spf-pass"),
    ("pass", TEMP, Disposition.CONTINUE, "spf-pass"),
])
def test_each_rule_gives_its_response(rule, dkim, response, name):
    """Every end-of-message rule, with the configured reply texts used exactly."""
    decision = decide_end(record(rule), False, dkim, REPLIES, "mx.example.com")
    assert (decision.response, decision.rule) == (response, name)


def test_not_concerned_and_too_large():
    """Nothing recorded (or only refusals): ACCEPT untouched; too large: 4.7.26 if DKIM was
    needed, else ACCEPT untouched; neither needs a DKIM check."""
    refused = record("not-opted-in")
    for r in (None, MessageRecord("<a@b>"), refused):
        assert needs_check(r, False) is None
        assert decide_end(r, False, None, REPLIES, "mx").response is Disposition.ACCEPT
    assert needs_check(record("pass"), True) is None
    assert decide_end(record("pass"), True, None, REPLIES, "mx").rule == "too-large"
    big = decide_end(record("spf-failed-dkim-pending"), True, None, REPLIES, "mx")
    assert big.rule == "too-large-unverified" and big.response.text.startswith("450 4.7.26")


def test_accepted_message_gets_our_header_below_received_and_forgeries_go():
    """Edits: deletions of our forged A-R (highest index first), then ours at index 1."""
    headers = [Header(b"Authentication-Results", b" mx.example.com; spf=pass", 1),
               Header(b"authentication-results", b" other; dkim=pass", 2),
               Header(b"Authentication-Results", b' "MX.example.com"; dkim=pass', 3)]
    forged = forged_deletions(headers, "mx.example.com")
    decision = decide_end(record("pass"), False, PASSED, REPLIES, "mx.example.com", forged)
    deletions, insert = decision.edits[:-1], decision.edits[-1]
    assert deletions == (ChangeHeader(3, "Authentication-Results", ""),
                         ChangeHeader(1, "Authentication-Results", ""))
    assert isinstance(insert, InsertHeader) and insert.index == 1
    assert insert.value == " " + decision.auth_results


FORGED = (ChangeHeader(2, "Authentication-Results", ""),
          ChangeHeader(1, "Authentication-Results", ""))


def test_forged_headers_are_deleted_from_every_message_let_through():
    """Not concerned (IPv4, trusted, authenticated) and too large: ACCEPT with the forged
    headers deleted and none of ours; refusals carry no edits."""
    for r in (None, MessageRecord("<a@b>"), record("not-opted-in")):
        decision = decide_end(r, False, None, REPLIES, "mx", FORGED)
        assert (decision.response, decision.edits) == (Disposition.ACCEPT, FORGED)
    big = decide_end(record("pass"), True, None, REPLIES, "mx", FORGED)
    assert (big.response, big.edits, big.rule) == (Disposition.ACCEPT, FORGED, "too-large")
    refused = decide_end(record("spf-failed-dkim-pending"), False, UNSIGNED, REPLIES, "mx",
                         FORGED)
    assert refused.edits == ()


def test_an_incomplete_list_of_forged_headers_tempfails_whatever_the_message():
    """More forged headers than the session keeps: TEMPFAIL, never accepted with some left."""
    for r in (None, record("pass"), record("spf-failed-dkim-pending")):
        decision = decide_end(r, False, PASSED, REPLIES, "mx", None)
        assert (decision.response, decision.rule) == (Disposition.TEMPFAIL, "forged-incomplete")


def test_a_reverse_name_that_is_not_a_host_name_stays_out_of_our_header():
    """A PTR name from a policy attribute (reverse_client_name) is written only if it is a
    valid host name: no comment breaking out of the header."""
    for bad in ("x) ; dkim=pass (", "a\n\tb.example", "1.2.3.4"):
        facts = Facts(RdnsFact(RdnsOutcome.PASS, (bad,)), SpfFact("pass"))
        text = auth_results("mx", subject(), facts, UNSIGNED)
        assert text.startswith(f"mx;\n\tiprev=pass policy.iprev={ADDR};\n\tspf=pass"), text
    facts = Facts(RdnsFact(RdnsOutcome.PASS, ("Mail.Sender.TEST.",)), SpfFact("pass"))
    assert f"policy.iprev={ADDR} (mail.sender.test);" in auth_results("mx", subject(), facts,
                                                                      UNSIGNED)


def test_authentication_results_text():
    """RFC 8601 text: iprev with the name in a comment, spf with smtp.mailfrom, one dkim
    result per signature with header.d/s/b, a quoted reason for failures."""
    text = auth_results("mx.example.com", subject(), FACTS, BAD)
    assert text == ("mx.example.com;\n\tiprev=pass policy.iprev=2001:db8:1::10 "
                    "(mail.sender.test);\n\tspf=fail smtp.mailfrom=alice@sender.test;\n\t"
                    'dkim=fail reason="body hash mismatch \\"x\\"" header.d=sender.test '
                    "header.s=lab")


def test_authentication_results_with_hostile_or_unusual_values():
    """Null sender: smtp.helo; a local part that is not a dot-atom: the domain alone; a d=
    or s= that is not a name: left out; no signature: dkim=none."""
    null = auth_results("mx", subject(sender=""), FACTS, UNSIGNED)
    assert "spf=fail smtp.helo=mail.sender.test;\n\tdkim=none" in null
    odd = auth_results("mx", subject(sender='"a b;c"@sender.test'), FACTS, UNSIGNED)
    assert "smtp.mailfrom=sender.test;" in odd
    hostile = DkimFact("fail", signatures=(SignatureResult("fail", "x; y=z", "a b"),))
    assert auth_results("mx", subject(), FACTS, hostile).endswith("dkim=fail")


@pytest.mark.parametrize("value, claims", [
    (b" mx.example.com; spf=pass", True),
    (b" MX.Example.COM 1; spf=pass", True),
    (b" (comment (nested)) mx.example.com;\n dkim=pass", True),
    (b' "mx.example.com"; none', True),
    (b" mx.example.com.evil; spf=pass", False),
    (b" other.example; mx.example.com", False),
    (b"", False),
    (rb"(a\) b)mx.example.com; dkim=pass", True),
    (rb"(a \( b)mx.example.com; dkim=pass", True),
    (b"((((((x))))))mx.example.com; dkim=pass", True),
    (b' "mx.example.com."; none', True),
    (b" mx.example.com. 1 ; spf=pass", True),
    (b" (c)\n\t\"MX.example.COM\" (d)\n\t1; none", True),
    (b" (unclosed mx.example.com; dkim=pass", True),
    (b" mx.example.com", True),
    (b' "mx.example.com; dkim=pass', True),
    (b" (mx.example.com) other.example; dkim=pass", False),
    (rb"(x\) mx.example.com) other.example; dkim=pass", False),
    (b" x.mx.example.com; spf=pass", False),
])
def test_which_headers_claim_our_authserv_id(value, claims):
    """The authserv-id is the first token after CFWS (quoted pairs and nesting in comments),
    token or quoted, before ";" or a version, case and a trailing dot aside; a value that
    does not parse claims it if our id is one of its tokens."""
    assert claims_authserv_id(value, "mx.example.com") is claims
