"""The impact report over a real lab's log: Postfix, swaks and the main daemon's own lines.

A sender with no PTR is deferred (450 4.7.25), then sends again from an address with a PTR and
gets through; ``policyd-ipv6 report --json`` over the daemon's log file must say so, and count
the refusal under the recipient's domain.
"""

import json
import subprocess
import sys
import uuid

import pytest

from . import topology as T

pytestmark = pytest.mark.e2e


def test_report_follows_a_deferred_sender_that_later_reaches_the_recipient(lab):
    """report --json over the daemon's real log: the deferred pair is reached on the retry."""
    tag = uuid.uuid4().hex[:8]
    sender = "retry-%s@%s" % (tag, T.SENDER_DOMAIN)
    recipient = "bob-%s@%s" % (tag, T.OPTED_IN)
    first = lab.send(T.NOPTR, [recipient], sender=sender)
    assert any(reply.startswith("450 4.7.25") for reply in first.replies_to("RCPT")), \
        first.transcript
    retry = lab.send(T.GOOD, [recipient], sender=sender)
    lab.delivered(retry.subject, 1)
    daemon = lab.daemons["main"]
    result = subprocess.run(
        [sys.executable, "-m", "policyd_ipv6", "report", "--json", str(daemon.log_path)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    pairs = {(d["sender"], d["recipient"]): d for d in found["deferred"]}
    assert pairs[(sender, recipient)]["reached"] is True, daemon.log_tail()
    assert pairs[(sender, recipient)]["via"] == "retry"
    assert pairs[(sender, recipient)]["rules"] == {"no-rdns": 1}
    assert found["refusals_by_recipient_domain"][T.OPTED_IN]["refused"] >= 1
    assert found["rules"]["no-rdns"] >= 1 and found["outcomes"]["defer"] >= 1
    assert any(entry["client"] == T.NOPTR for entry in found["ptr_less_clients"])
    # Start-up lines ("ready", "listening ...") are not decisions: counted, never fatal.
    assert found["unparsed_lines"] >= 1
