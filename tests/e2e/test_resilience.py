"""The lab under trouble: the daemon stopped, the opt-in file edited live, DNS not answering.

Nothing may be lost or let in unchecked: a stopped daemon means 451 4.3.5 from Postfix (the
sender retries), a DNS fault means the daemon's own 451 4.4.3, and a change to the opt-in file
takes effect in the running daemon (same PID) without a restart.
"""

import re
import time

import pytest

from . import topology as T
from .test_mail import NOT_OPTED, OK, assert_nothing_accepted, decisions, rcpt, rejected

pytestmark = pytest.mark.e2e


def test_daemon_stopped_gives_451_4_3_5_and_restarted_lets_mail_flow(lab):
    """With the daemon stopped Postfix answers 451 4.3.5 and takes nothing; started again
    (the same command), the same message is accepted and delivered."""
    daemon = lab.daemons["main"]
    bob = rcpt("bob")
    daemon.stop()
    try:
        refused = lab.send(T.GOOD, [bob])
        assert re.fullmatch(rejected("451 4.3.5", bob, r"Server configuration problem"),
                            refused.rcpt_reply(bob)), refused.transcript
        assert_nothing_accepted(lab, refused)
    finally:
        daemon.start()
    accepted = lab.send(T.GOOD, [bob])
    assert re.fullmatch(OK, accepted.rcpt_reply(bob)), accepted.transcript
    assert lab.delivered(accepted.subject, 1) == [bob]


def _send_until(lab, recipient: str, pattern: str, timeout: float = 10.0):
    """Send until the RCPT reply matches `pattern` (the daemon polls the file); last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = lab.send(T.GOOD, [recipient])
        if re.fullmatch(pattern, result.rcpt_reply(recipient)) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_optin_file_edited_while_running_takes_effect_without_restart(lab):
    """Adding a domain to the opt-in file lets its mail in, removing it refuses it again,
    while the daemon keeps running (same PID)."""
    daemon = lab.daemons["main"]
    pid = daemon.process.pid
    original = lab.optin_path.read_text()
    erin = rcpt("erin", T.ADDED_LATER)
    refused = lab.send(T.GOOD, [erin])
    not_opted = rejected("550 5.2.1", erin, NOT_OPTED % re.escape(T.ADDED_LATER))
    assert re.fullmatch(not_opted, refused.rcpt_reply(erin)), refused.transcript
    try:
        lab.optin_path.write_text(original + "\n%s   # added while running\n" % T.ADDED_LATER)
        accepted = _send_until(lab, erin, OK)
        assert re.fullmatch(OK, accepted.rcpt_reply(erin)), accepted.transcript
        assert lab.delivered(accepted.subject, 1) == [erin]
    finally:
        lab.optin_path.write_text(original)
    refused_again = _send_until(lab, erin, not_opted)
    assert re.fullmatch(not_opted, refused_again.rcpt_reply(erin)), refused_again.transcript
    assert daemon.process.pid == pid and daemon.running


@pytest.mark.parametrize("source", [T.GOOD, T.NOPTR], ids=["spf-unreachable", "ptr-unreachable"])
def test_dns_not_answering_gives_a_temporary_4xx(lab, source):
    """A daemon whose nameserver never answers replies 451 4.4.3 within its deadline (3 s),
    never a 5xx nor the 4.7.25/4.7.26 refusals, and nothing is taken: for a sender whose PTR
    Postfix already found (the SPF lookups time out) and for one without (the daemon's own
    PTR lookup times out, which must not pass for a missing PTR)."""
    bob = rcpt("bob")
    started = time.monotonic()
    result = lab.send(source, [bob], port=T.SMTP_PORT_DNS_DOWN)
    elapsed = time.monotonic() - started
    reply = result.rcpt_reply(bob)
    assert re.fullmatch(rejected("451 4.4.3", bob, r".+"), reply), result.transcript
    assert "4.7.25" not in reply and "4.7.26" not in reply
    assert_nothing_accepted(lab, result)
    # The deadline is 3 s; swaks, Postfix and the namespaces add well under the rest.
    assert elapsed < 8, "took %.1f s" % elapsed
    assert [d["reply"][:9] for d in decisions(lab, bob, "dns_down")] == ["451 4.4.3"]
