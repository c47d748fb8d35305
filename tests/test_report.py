"""The impact report and the decision log it reads: lines the engine really writes, parsed back.

The engine decides with a fake resolver (``fakes.FakeDnsClient``) and a ``task.Clock``; its log
events go through the daemon's own line observer (``daemon.logs``) into a string, exactly as
``serve`` writes them, then into ``report.lines`` and ``report.impact``.
"""

from __future__ import annotations

import io
import ipaddress
import json
from types import SimpleNamespace

import pytest
from fakes import FakeDnsClient
from twisted.internet import task
from twisted.logger import globalLogPublisher

from policyd_ipv6.checks.gather import FactFinder
from policyd_ipv6.daemon.logs import _LineObserver
from policyd_ipv6.daemon.report_command import report
from policyd_ipv6.milter.registry import MessageRecord
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import Policy
from policyd_ipv6.policy.engine import PolicyEngine
from policyd_ipv6.report.impact import Impact, render_text
from policyd_ipv6.report.lines import outcome, parse_line
from policyd_ipv6.resolver.lookups import Lookups

GOOD, NO_PTR, OTHER_NO_PTR = "2001:db8::25", "2001:db8:0:0:1::30", "2001:db8:7::30"
RECORDS = {
    (ipaddress.ip_address(GOOD).reverse_pointer, "PTR"): ["mx.example.net."],
    ("mx.example.net", "AAAA"): [GOOD],
    ("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/32 ip4:192.0.2.0/24 -all"'],
    ("fail.example", "TXT"): ['"v=spf1 -all"'],
}


def request(client, sender, recipient, queue_id="", instance="1.2.3"):
    return {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
            "client_address": client, "helo_name": "mx.example.net", "sender": sender,
            "recipient": recipient, "instance": instance, "queue_id": queue_id,
            "encryption_protocol": "TLSv1.3" if queue_id else ""}


def engine_log(requests, policy=None, optin="contoso.com\nfabrikam.com\n",
               log_decisions="all", journal=False, milter=None) -> str:
    """The log text the engine writes while it decides ``requests`` in order (``milter``: the
    message record the built-in milter holds for every request's connection)."""
    clock = task.Clock()
    finder = FactFinder(Lookups(FakeDnsClient(RECORDS), clock), clock, "ptr", 15.0)
    table = parse_optin(optin)
    sessions = SimpleNamespace(message_for=lambda attributes: milter) if milter else None
    engine = PolicyEngine(policy or Policy(), lambda: table, finder, clock, sessions)
    engine.log_decisions = log_decisions
    stream = io.StringIO()
    observer = _LineObserver(stream, "info", None, journal)
    globalLogPublisher.addObserver(observer)
    try:
        for attributes in requests:
            engine.answer(attributes)
            clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(observer)
    return stream.getvalue()


STORY = [
    request(NO_PTR, "alice@example.net", "bob@contoso.com"),      # 450 4.7.25: deferred
    request(GOOD, "alice@example.net", "bob@contoso.com", "4Xq1"),  # the retry gets through
    request(NO_PTR, "carol@example.net", "dan@fabrikam.com"),     # deferred, never again
    request(OTHER_NO_PTR, "erin@example.net", "bob@contoso.com"),  # deferred ...
    request("192.0.2.7", "erin@example.net", "bob@contoso.com"),   # ... then in over IPv4
    request(GOOD, "x@fail.example", "bob@contoso.com"),           # 450 4.7.26
    request(GOOD, "alice@example.net", "eve@elsewhere.test"),     # 550 5.2.1
]


def summary(text: str) -> dict:
    impact = Impact()
    for line in text.splitlines():
        entry = parse_line(line)
        impact.add(entry) if entry else impact.skip()
    return impact.result()


def test_engine_lines_carry_queue_id_tls_and_parse_back():
    """A decision line carries queue_id= and tls= when Postfix sent them, and parses back."""
    text = engine_log(STORY[:2])
    first, second = (parse_line(line) for line in text.splitlines())
    assert first.rule == "no-rdns" and first.outcome == "defer" and "queue_id" not in first.fields
    assert second.get("queue_id") == "4Xq1" and second.get("tls") == "TLSv1.3"
    assert second.rule == "pass" and second.outcome == "accept"


def test_report_counts_rules_outcomes_and_follows_deferred_senders():
    """The report counts by rule and outcome and tells which deferred pair got through later,
    by a retry or over IPv4."""
    result = summary(engine_log(STORY) + "info policyd-ipv6 ready\nnot a log line\n")
    assert result["rules"] == {"no-rdns": 3, "pass": 1, "ipv4": 1, "spf-failed": 1,
                               "not-opted-in": 1}
    assert result["outcomes"] == {"accept": 2, "defer": 4, "reject": 1, "report": 0}
    assert result["unparsed_lines"] == 2
    later = {(d["sender"], d["recipient"]): (d["reached"], d["via"]) for d in result["deferred"]}
    assert later == {("alice@example.net", "bob@contoso.com"): (True, "retry"),
                     ("carol@example.net", "dan@fabrikam.com"): (False, None),
                     ("erin@example.net", "bob@contoso.com"): (True, "ipv4"),
                     ("x@fail.example", "bob@contoso.com"): (False, None)}
    assert result["refusals_by_recipient_domain"]["contoso.com"] == {"refused": 3, "would": 0}
    assert result["refusals_by_recipient_domain"]["elsewhere.test"]["refused"] == 1
    assert {e["client"] for e in result["ptr_less_clients"]} == {NO_PTR, OTHER_NO_PTR}
    assert {"prefix": "2001:db8::/64", "count": 4} in result["client_prefixes"]
    assert result["sender_domains"][0] == {"domain": "example.net", "count": 4}


def test_report_mode_lines_count_as_report_outcome():
    """A refusal only reported (would=) is the outcome "report" and a would-be refusal."""
    result = summary(engine_log(STORY[:1], Policy(mode="report")))
    assert result["outcomes"]["report"] == 1
    assert result["refusals_by_recipient_domain"] == {"contoso.com": {"refused": 0, "would": 1}}


def test_journal_and_short_iso_prefixes_are_accepted():
    """Lines with an sd-daemon priority and a journalctl short-iso prefix parse like bare ones."""
    text = engine_log(STORY[:1], journal=True)
    assert text.startswith("<6>info decision ")
    stamped = "2026-05-01T10:00:00+0000 mx policyd-ipv6[812]: " + text.splitlines()[0][3:]
    entry = parse_line(stamped)
    assert entry is not None and entry.time == "2026-05-01T10:00:00+0000"
    assert entry.fields == parse_line(text).fields


@pytest.mark.parametrize("line", [
    "", "info decision", 'info decision client=1 rule=pass reply="DUNNO" junk here',
    'info decision client=1 rule=pass reply="DUNNO', "x" * 10000, "\x00\udcff decision rule=",
    'milter client=1 rule= reply="x"',
])
def test_lines_it_cannot_parse_are_none(line):
    """A line that is not a whole decision or milter line parses to None, never an error."""
    assert parse_line(line) is None


def test_milter_lines_complete_the_messages_of_their_decisions():
    """A milter verdict counts for the recipients its client and sender got at RCPT."""
    text = engine_log([request(GOOD, "x@fail.example", "bob@contoso.com")],
                      Policy(mode="report"))
    text += ('info milter client=2001:db8::25 sender="<x@fail.example>" queue_id=4Y size=10 '
             'dkim=none rule=unsigned reply="451 4.7.26 no" ms=1.0\n')
    result = summary(text)
    assert result["rules"] == {"spf-failed": 1, "unsigned": 1}
    assert result["deferred"][0]["recipient"] == "bob@contoso.com"


MILTER_HEAD = 'info milter client=2001:db8::25 sender="<x@fail.example>" queue_id=4Y size=10 '


@pytest.mark.parametrize("selector", [
    "lab", "x y", "x rule=dkim-failed reply=450", "x) rule=dkim-failed reply=450 (",
    r'a\"b) rule=dkim-failed reply=\"450\" c',  # a selector with quotes, as printable escapes it
])
@pytest.mark.parametrize("quoted", [True, False])
def test_milter_dkim_field_old_and_quoted_forms_read_alike(selector, quoted):
    """A milter line's dkim=pass(d=... s=...) reads as one field, quoted as the daemon writes it
    now or unquoted as it wrote it before: a selector spelling rule= and reply= forges neither."""
    dkim = f"pass(d=fail.example s={selector})"
    for tail, would in (('rule=dkim-pass reply="CONTINUE" ms=1.0', ""),
                        ('rule=dkim-failed would="450 4.7.26 no" reply="CONTINUE" ms=1.0',
                         "450 4.7.26 no")):
        entry = parse_line(MILTER_HEAD + (f'dkim="{dkim}" ' if quoted else f"dkim={dkim} ")
                           + tail)
        assert entry is not None and entry.get("dkim") == dkim
        assert (entry.rule, entry.get("would"), entry.get("reply")) == (
            tail[5:tail.index(" ")], would, "CONTINUE")


def test_no_rdns_dkim_pending_waits_for_the_milter_verdict():
    """A PTR-exempt sender's DUNNO at RCPT (no-rdns-dkim-pending) is not a delivery: the
    milter's refusal that follows counts for its recipient, and the pair is never reached."""
    exempt = Policy(rdns_exempt_sender_domains=("fail.example",))
    text = engine_log([request(NO_PTR, "x@fail.example", "bob@contoso.com")], exempt)
    text += engine_log([request(NO_PTR, "x@fail.example", "bob@contoso.com")], exempt,
                       milter=MessageRecord("x@fail.example"))
    text += (f'info milter client={NO_PTR} sender="<x@fail.example>" queue_id=4Y size=10 '
             'dkim=none rule=no-rdns-unauthenticated reply="450 4.7.25 no" ms=1.0\n')
    result = summary(text)
    assert result["rules"] == {"no-rdns-unauthenticated": 2, "no-rdns-dkim-pending": 1}
    assert result["deferred"] == [{"sender": "x@fail.example", "recipient": "bob@contoso.com",
                                   "deferrals": 2, "rules": {"no-rdns-unauthenticated": 2},
                                   "reached": False, "via": None}]
    assert result["refusals_by_recipient_domain"] == {"contoso.com": {"refused": 2, "would": 0}}


def milter_line(queue_id, reply, client=GOOD, sender="x@fail.example"):
    return (f'info milter client={client} sender="<{sender}>" queue_id={queue_id} size=10 '
            f'dkim=none rule=unsigned reply="{reply}" ms=1.0\n')


def test_interleaved_messages_of_one_client_and_sender_pair_by_queue_id():
    """Two messages of the same client and sender whose decisions interleave get each its own
    milter verdict: the one whose decisions carried the milter line's queue_id."""
    first, second = ("bob@contoso.com", "carol@contoso.com"), ("dan@fabrikam.com",
                                                                "erin@fabrikam.com")
    sender = "x@fail.example"
    text = engine_log([  # Postfix sends the queue id from the second recipient on
        request(GOOD, sender, first[0], instance="a.1"),
        request(GOOD, sender, second[0], instance="b.1"),
        request(GOOD, sender, first[1], "4QA", instance="a.1"),
        request(GOOD, sender, second[1], "4QB", instance="b.1"),
    ], Policy(mode="report"))
    text += milter_line("4QA", "451 4.7.26 no") + milter_line("4QB", "CONTINUE")
    result = summary(text)
    assert result["rules"] == {"spf-failed": 4, "unsigned": 2}
    assert result["refusals_by_recipient_domain"] == {"contoso.com": {"refused": 2, "would": 2},
                                                      "fabrikam.com": {"refused": 0, "would": 2}}
    assert {d["recipient"] for d in result["deferred"]} == set(first)


def test_a_milter_line_without_a_known_queue_id_pairs_with_its_client_and_senders_message():
    """A milter line whose queue_id no decision carried (or with none: older logs, "-") pairs
    with the last open message of its client and sender whose queue id is not another one."""
    sender = "x@fail.example"
    text = engine_log([
        request(GOOD, sender, "bob@contoso.com", instance="a.1"),  # one recipient: no queue id
        request(GOOD, sender, "dan@fabrikam.com", instance="b.1"),
        request(GOOD, sender, "erin@fabrikam.com", "4QB", instance="b.1"),
    ], Policy(mode="report"))
    text += milter_line("4QA", "451 4.7.26 no") + milter_line("-", "451 4.7.26 no")
    result = summary(text)
    assert [d["recipient"] for d in result["deferred"]] == [
        "bob@contoso.com", "dan@fabrikam.com", "erin@fabrikam.com"]
    assert "(unknown)" not in result["refusals_by_recipient_domain"]
    text += milter_line("4QC", "451 4.7.26 no")  # nothing of its client and sender is open
    assert summary(text)["refusals_by_recipient_domain"]["(unknown)"] == {"refused": 1,
                                                                         "would": 0}


@pytest.mark.parametrize("bound", ["MAX_OPEN", "MAX_OPEN_PER_SENDER"])
def test_open_messages_are_bounded_oldest_forgotten_first(bound, monkeypatch):
    """Past the bound on open messages (in all, or of one client and sender) the oldest is
    forgotten, its queue id with it: its milter line counts for no recipient, the others' do."""
    monkeypatch.setattr(f"policyd_ipv6.report.impact.{bound}", 2)
    sender = "x@fail.example"
    text = engine_log([request(GOOD, sender, f"r{n}@contoso.com", f"4Q{n}", instance=f"m.{n}")
                       for n in range(3)], Policy(mode="report"))
    text += "".join(milter_line(f"4Q{n}", "451 4.7.26 no") for n in range(3))
    result = summary(text)
    assert [d["recipient"] for d in result["deferred"]] == ["r1@contoso.com", "r2@contoso.com"]
    assert result["refusals_by_recipient_domain"]["(unknown)"] == {"refused": 1, "would": 0}


@pytest.mark.parametrize("reply, would, expected", [
    ("DUNNO", "", "accept"), ("DUNNO", "450 4.7.25 x", "report"), ("450 4.7.25 x", "", "defer"),
    ("550 5.2.1 x", "", "reject"), ("TEMPFAIL", "", "defer"), ("REJECT", "", "reject"),
    ("CONTINUE", "", "accept"),
])
def test_outcome_names(reply, would, expected):
    """Replies map to the metrics' outcome names."""
    assert outcome(reply, would) == expected


@pytest.mark.parametrize("which, rules", [
    ("all", {"no-rdns", "pass", "ipv4", "spf-failed", "not-opted-in"}),
    ("ipv6", {"no-rdns", "pass", "spf-failed", "not-opted-in"}),
    ("refusals", {"no-rdns", "spf-failed", "not-opted-in"}),
])
def test_log_decisions_chooses_the_lines(which, rules):
    """log_decisions "ipv6" drops IPv4 decisions, "refusals" keeps only refusals."""
    assert set(summary(engine_log(STORY, log_decisions=which))["rules"]) == rules


def test_report_command_json_and_text(tmp_path):
    """report --json prints one object with rules, outcomes and unparsed_lines; the default is
    text tables; a missing file is exit status 1."""
    log = tmp_path / "log"
    log.write_text(engine_log(STORY) + "garbage\n")
    out = io.StringIO()
    assert report(SimpleNamespace(files=[str(log)], json=True, top=10), stdout=out) == 0
    result = json.loads(out.getvalue())
    assert result["rules"]["no-rdns"] == 3 and result["unparsed_lines"] == 1
    out = io.StringIO()
    assert report(SimpleNamespace(files=["-"], json=False, top=10),
                  stdin=io.StringIO(log.read_text()), stdout=out) == 0
    assert "by rule and outcome" in out.getvalue() and "reached (ipv4)" in out.getvalue()
    assert render_text(result) == out.getvalue()
    assert report(SimpleNamespace(files=[str(tmp_path / "nope")], json=False, top=10),
                  stdout=io.StringIO()) == 1


def test_report_of_files_leaves_standard_input_alone(tmp_path, monkeypatch):
    """report FILE neither reads nor wraps standard input (a wrapper would close it when
    collected): with files named, a stdin that cannot be wrapped is never touched."""
    log = tmp_path / "log"
    log.write_text(engine_log(STORY))
    monkeypatch.setattr("sys.stdin", SimpleNamespace())  # no .buffer: wrapping it raises
    out = io.StringIO()
    assert report(SimpleNamespace(files=[str(log)], json=True, top=10), stdout=out) == 0
    assert json.loads(out.getvalue())["rules"]["no-rdns"] == 3
