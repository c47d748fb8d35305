"""Real mail through the lab: what the SMTP client is told, and where the mail ends up.

Each test sends with swaks from one of the sender namespace's addresses (topology.py) to the
Postfix instance wired with postfix-examples/main.cf.fragment, and asserts the reply to each
RCPT (Postfix inserts "<rcpt>: Recipient address rejected:" before the daemon's text), whether
the message was accepted, and what arrived in the Maildir or stayed in the queue. Recipients
carry a fresh tag so the daemon's decision lines of one test are told apart from the others'.
"""

import os
import re
import stat
import uuid

import pytest

from . import topology as T

pytestmark = pytest.mark.e2e

OK = r"250 2\.1\.5 Ok"


def rcpt(local: str, domain: str = T.OPTED_IN) -> str:
    """A recipient address no other test uses."""
    return "%s-%s@%s" % (local, uuid.uuid4().hex[:8], domain)


def rejected(code: str, recipient: str, text: str) -> str:
    """The regex of Postfix's RCPT reply carrying the policy service's reply `code text`."""
    return r"%s <%s>: Recipient address rejected: %s" % (
        re.escape(code), re.escape(recipient), text)


NO_PTR = r"Service unavailable, sending IPv6 address \[%s\] must have reverse DNS record\."
NO_AUTH = (r"Service unavailable, message sent over IPv6 \[%s\] must pass either SPF or DKIM "
           r"validation\.")
NOT_OPTED = r"Service unavailable, \[%s\] does not accept email over IPv6\."


def decisions(lab, recipient: str, daemon: str = "main") -> list[dict]:
    """The daemon's decision lines for `recipient`."""
    return [d for d in lab.daemons[daemon].decisions() if d.get("recipient") == recipient]


def assert_nothing_accepted(lab, result) -> None:
    assert result.final_reply() is None, result.transcript
    assert lab.postfix.messages_with_subject(result.subject) == []
    assert lab.postfix.queued_files() == []


def test_ptr_and_spf_pass_is_delivered(lab):
    """An IPv6 sender with a PTR and an SPF pass is accepted and the mail lands in the Maildir."""
    bob = rcpt("bob")
    result = lab.send(T.GOOD, [bob])
    assert re.fullmatch(OK, result.rcpt_reply(bob)), result.transcript
    assert result.accepted, result.transcript
    assert lab.delivered(result.subject, 1) == [bob]
    (line,) = decisions(lab, bob)
    assert (line["reply"], line["rdns"], line["spf"]) == ("DUNNO", "pass(mail.sender.test)", "pass")


def test_no_ptr_is_refused_with_4_7_25_and_nothing_queued(lab):
    """An IPv6 sender without PTR gets 450 4.7.25 at RCPT, and no mail is taken."""
    bob = rcpt("bob")
    result = lab.send(T.NOPTR, [bob])
    assert re.fullmatch(rejected("450 4.7.25", bob, NO_PTR % re.escape(T.NOPTR)),
                        result.rcpt_reply(bob)), result.transcript
    assert_nothing_accepted(lab, result)


def test_ptr_not_resolving_back_is_accepted_in_ptr_mode(lab):
    """With rdns = "ptr", a PTR whose name does not resolve back to the sender is enough."""
    bob = rcpt("bob")
    result = lab.send(T.GHOST, [bob])
    assert re.fullmatch(OK, result.rcpt_reply(bob)), result.transcript
    assert lab.delivered(result.subject, 1) == [bob]


def test_ptr_not_resolving_back_is_refused_in_fcrdns_mode(lab):
    """With rdns = "fcrdns" (second daemon, on TCP), the same sender gets 450 4.7.25."""
    bob = rcpt("bob")
    result = lab.send(T.GHOST, [bob], port=T.SMTP_PORT_FCRDNS)
    assert re.fullmatch(rejected("450 4.7.25", bob, NO_PTR % re.escape(T.GHOST)),
                        result.rcpt_reply(bob)), result.transcript
    assert_nothing_accepted(lab, result)
    assert [d["reply"][:10] for d in decisions(lab, bob, "fcrdns")] == ["450 4.7.25"]


def test_unix_socket_listener_serves_postfix(lab):
    """The fragment's unix:policyd-ipv6/policy reaches the example's Unix socket: group
    postfix (from the set-group-ID directory), mode 660, and mail flows through it."""
    directory = lab.postfix.queue_dir / T.UNIX_SOCKET_DIR
    postfix_gid = __import__("grp").getgrnam("postfix").gr_gid
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o2750
    for name in (T.UNIX_SOCKET_NAME, "milter"):
        info = os.stat(directory / name)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660, name
        assert info.st_gid == postfix_gid, name
    bob = rcpt("bob")
    result = lab.send(T.GOOD, [bob])
    assert re.fullmatch(OK, result.rcpt_reply(bob)), result.transcript
    assert lab.delivered(result.subject, 1) == [bob]
    assert [d["reply"] for d in decisions(lab, bob, "main")] == ["DUNNO"]


def test_tcp_listener_serves_postfix(lab):
    """Postfix reaches a daemon listening on TCP (inet:127.0.0.1:10045, the fcrdns daemon): a
    forward-confirmed sender is accepted through it."""
    bob = rcpt("bob")
    result = lab.send(T.GOOD, [bob], port=T.SMTP_PORT_FCRDNS)
    assert re.fullmatch(OK, result.rcpt_reply(bob)), result.transcript
    assert lab.delivered(result.subject, 1) == [bob]
    assert [d["reply"] for d in decisions(lab, bob, "fcrdns")] == ["DUNNO"]


def test_spf_fail_is_refused_with_4_7_26(lab):
    """A sender outside the domain's SPF range (PTR fine) gets 450 4.7.26; nothing is taken."""
    bob = rcpt("bob")
    result = lab.send(T.OUTSIDE, [bob], helo="out.sender.test")
    assert re.fullmatch(rejected("450 4.7.26", bob, NO_AUTH % re.escape(T.OUTSIDE)),
                        result.rcpt_reply(bob)), result.transcript
    assert_nothing_accepted(lab, result)
    assert [d["spf"] for d in decisions(lab, bob)] == ["fail"]


def test_recipient_domain_not_opted_in_is_refused_with_5_2_1(lab):
    """A recipient whose domain is not in the opt-in file gets 550 5.2.1 naming the domain."""
    carol = rcpt("carol", T.NOT_OPTED_IN)
    result = lab.send(T.GOOD, [carol])
    assert re.fullmatch(rejected("550 5.2.1", carol, NOT_OPTED % re.escape(T.NOT_OPTED_IN)),
                        result.rcpt_reply(carol)), result.transcript
    assert_nothing_accepted(lab, result)


def test_ipv4_sender_is_untouched(lab):
    """An IPv4 sender is accepted for every domain, opted in or not: the rules are IPv6-only."""
    bob, carol = rcpt("bob"), rcpt("carol", T.NOT_OPTED_IN)
    result = lab.send(T.IPV4, [bob, carol], helo="mail.sender.test")
    assert re.fullmatch(OK, result.rcpt_reply(bob)), result.transcript
    assert re.fullmatch(OK, result.rcpt_reply(carol)), result.transcript
    assert lab.delivered(result.subject, 2) == sorted([bob, carol])
    assert [d["reply"] for d in decisions(lab, carol)] == ["DUNNO"]


def test_three_recipients_get_their_own_replies_and_one_spf_evaluation(lab):
    """Two opted-in recipients are accepted and one is refused in one message, with the rDNS
    and SPF facts computed once and shared (the daemon logs facts=new once, then shared)."""
    bob, dave, carol = rcpt("bob"), rcpt("dave"), rcpt("carol", T.NOT_OPTED_IN)
    result = lab.send(T.GOOD, [bob, dave, carol])
    assert re.fullmatch(OK, result.rcpt_reply(bob)), result.transcript
    assert re.fullmatch(OK, result.rcpt_reply(dave)), result.transcript
    assert re.fullmatch(rejected("550 5.2.1", carol, NOT_OPTED % re.escape(T.NOT_OPTED_IN)),
                        result.rcpt_reply(carol)), result.transcript
    assert result.accepted, result.transcript
    assert lab.delivered(result.subject, 2) == sorted([bob, dave])

    lines = [decisions(lab, r) for r in (bob, dave, carol)]
    assert [len(found) for found in lines] == [1, 1, 1], lab.daemons["main"].log_tail()
    bob_line, dave_line, carol_line = (found[0] for found in lines)
    assert bob_line["instance"] == dave_line["instance"] == carol_line["instance"] != "-"
    # The facts came into being once (for bob) and were reused for dave; carol's domain
    # decided before any fact was needed.
    assert [bob_line["facts"], dave_line["facts"], carol_line["facts"]] == ["new", "shared", "none"]
    assert bob_line["spf"] == dave_line["spf"] == "pass"


def test_null_sender_whose_helo_passes_spf_is_accepted(lab):
    """A bounce (MAIL FROM:<>) is checked as postmaster@HELO; a HELO that passes SPF is accepted."""
    bob = rcpt("bob")
    result = lab.send(T.GOOD, [bob], sender="", helo=T.HELO)
    assert "MAIL FROM:<>" in result.transcript
    assert re.fullmatch(OK, result.rcpt_reply(bob)), result.transcript
    assert lab.delivered(result.subject, 1) == [bob]
    (line,) = decisions(lab, bob)
    assert (line["sender"], line["spf"], line["reply"]) == ("", "pass", "DUNNO")


def test_null_sender_whose_helo_has_no_spf_is_refused(lab):
    """A bounce whose HELO name publishes no SPF record (SPF none) gets 450 4.7.26."""
    bob = rcpt("bob")
    result = lab.send(T.OUTSIDE, [bob], sender="", helo="out.sender.test")
    assert re.fullmatch(rejected("450 4.7.26", bob, NO_AUTH % re.escape(T.OUTSIDE)),
                        result.rcpt_reply(bob)), result.transcript
    assert_nothing_accepted(lab, result)


def test_quoted_local_part_is_judged_by_its_domain(lab):
    r"""RCPT TO:<"\"x\\"@example.com> reaches the daemon in Postfix's unquoted internal form
    ("x\@example.com): its opted-in domain is used, so a client without PTR gets 450 4.7.25."""
    tag = uuid.uuid4().hex[:8]
    quoted = '"\\"x-%s\\\\"@%s' % (tag, T.OPTED_IN)
    result = lab.send(T.NOPTR, [quoted])
    assert 'RCPT TO:<"\\"x-%s\\\\"@%s>' % (tag, T.OPTED_IN) in result.transcript
    assert re.fullmatch(r"450 4\.7\.25 <.*>: Recipient address rejected: "
                        + NO_PTR % re.escape(T.NOPTR), result.rcpt_reply(quoted)), result.transcript
    assert_nothing_accepted(lab, result)
    lines = [d for d in lab.daemons["main"].decisions() if tag in d.get("recipient", "")]
    assert [(d["rule"], d["reply"][:10]) for d in lines] == [("no-rdns", "450 4.7.25")], lines
