"""check for scripts and for a running daemon, and configtest: real processes, real Knot.

``check`` exits by reply (0 DUNNO, 4 temporary, 5 permanent refusal, the most severe of
several), prints JSON with ``--json``, reads Postfix-format requests with ``--requests``, and
with ``--via`` asks a real ``serve`` process over TCP or a Unix socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import dnslab
import pytest
from test_cli import ROOT, Daemon, cli, write_config

pytestmark = pytest.mark.process


PASS = {"client_address": dnslab.WITH_PTR, "sender": "a@pass.sender.test",
        "recipient": "bob@sender.test"}
NO_PTR = dict(PASS, client_address=dnslab.NO_PTR)
NOT_OPTED = dict(PASS, recipient="bob@contoso.com")


def requests_text(*requests) -> str:
    return "".join(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
        "helo_name=helo.sender.test\n" + "".join(f"{k}={v}\n" for k, v in r.items()) + "\n"
        for r in requests)


def options(request) -> list[str]:
    return ["--client-address", request["client_address"], "--sender", request["sender"],
            "--recipient", request["recipient"]]


@pytest.mark.parametrize("request_, status, outcome, rule", [
    (PASS, 0, "accept", "pass"), (NO_PTR, 4, "defer", "no-rdns"),
    (NOT_OPTED, 5, "reject", "not-opted-in"),
])
def test_check_json_and_exit_status_by_reply(tmp_path, knot, request_, status, outcome, rule):
    """--json prints one object whose reply has no action=, and the exit status is 0, 4 or 5."""
    path = write_config(tmp_path, knot, ["tcp:0:interface=127.0.0.1"])
    result = cli("check", "--config", path, "--json", *options(request_))
    assert result.returncode == status, result.stderr
    found = json.loads(result.stdout)
    assert (found["outcome"], found["rule"], found["would"]) == (outcome, rule, None)
    assert not found["reply"].startswith("action=") and found["trace"]


def test_check_requests_file_replies_in_order_with_the_most_severe_status(tmp_path, knot):
    """--requests decides each Postfix-format request in order; the exit status is the most
    severe reply's; "-" reads standard input."""
    path = write_config(tmp_path, knot, ["tcp:0:interface=127.0.0.1"])
    text = requests_text(PASS, NO_PTR, PASS)
    (tmp_path / "requests").write_text(text)
    result = cli("check", "--config", path, "--requests", str(tmp_path / "requests"))
    actions = [line for line in result.stdout.splitlines() if line.startswith("action=")]
    assert actions[0] == "action=DUNNO" and actions[1].startswith("action=450 4.7.25 ")
    assert actions[2] == "action=DUNNO" and len(actions) == 3
    assert result.returncode == 4
    piped = subprocess.run([sys.executable, "-m", "policyd_ipv6", "check", "--config", path,
                            "--requests", "-", "--json"], input=requests_text(NOT_OPTED, NO_PTR),
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert [json.loads(line)["outcome"] for line in piped.stdout.splitlines()] == [
        "reject", "defer"]
    assert piped.returncode == 5


def test_check_assume_opted_in_decides_as_if_listed(tmp_path, knot):
    """--assume-opted-in applies the rules to a recipient domain the table does not list."""
    path = write_config(tmp_path, knot, ["tcp:0:interface=127.0.0.1"])
    result = cli("check", "--config", path, "--assume-opted-in", "--json", *options(NOT_OPTED))
    found = json.loads(result.stdout)
    assert (found["rule"], found["reply"], result.returncode) == ("pass", "DUNNO", 0)
    assert any("opted in" in line for line in found["trace"])


@pytest.mark.parametrize("arguments, words", [
    (["--via", "tcp:127.0.0.1:1", "--config", "x.toml", *options(PASS)], "no --config"),
    (["--sender", "a@b.test", "--recipient", "c@d.test"], "--client-address"),
    (["--requests", "-", *options(PASS)], "replaces"),
    (["--via", "nonsense", *options(PASS)], "not unix:PATH or tcp:HOST:PORT"),
    (["--bogus"], "unrecognized"),
])
def test_check_usage_errors_exit_2(arguments, words):
    """Options that do not go together, a missing one or a bad endpoint: exit status 2."""
    result = cli("check", *arguments)
    assert result.returncode == 2 and words in result.stderr, result.stderr


def test_check_requests_that_are_not_policy_requests_exit_2(tmp_path, knot):
    """A --requests file that is not in Postfix's format is a usage error naming the file."""
    (tmp_path / "bad").write_text("GET / HTTP/1.0\n\n")
    result = cli("check", "--config", write_config(tmp_path, knot, ["tcp:0"]),
                 "--requests", str(tmp_path / "bad"))
    assert result.returncode == 2 and "--requests" in result.stderr, result.stderr


@pytest.mark.parametrize("endpoint", ["tcp", "unix"])
def test_check_via_asks_the_running_daemon(tmp_path, knot, endpoint):
    """--via sends the requests to a real serve process and exits by its replies; a daemon
    that is not there is exit status 1."""
    socket_path = tmp_path / "policy.sock"
    listen = (f"unix:{socket_path}" if endpoint == "unix" else "tcp:0:interface=127.0.0.1")
    daemon = Daemon(write_config(tmp_path, knot, [listen]))
    try:
        if endpoint == "unix":
            via = f"unix:{socket_path}"
        else:
            via = _bound_tcp(daemon.process.pid)
        (tmp_path / "requests").write_text(requests_text(PASS, NOT_OPTED))
        result = cli("check", "--via", via, "--requests", str(tmp_path / "requests"), "--json")
        replies = [json.loads(line) for line in result.stdout.splitlines()]
        assert [r["reply"][:9] for r in replies] == ["DUNNO", "550 5.2.1"], result.stderr
        assert result.returncode == 5
        # The daemon decided, not the command (its line is flushed at the end of the turn
        # that wrote the reply: wait for it, bounded).
        end = time.monotonic() + 5
        while "decision client=" not in daemon.text() and time.monotonic() < end:
            time.sleep(0.02)
        assert "decision client=" in daemon.text()
    finally:
        daemon.stop()
    gone = cli("check", "--via", via, *options(PASS))
    assert gone.returncode == 1 and "cannot connect" in gone.stderr


def _bound_tcp(pid: int) -> str:
    """tcp:127.0.0.1:PORT of the daemon's listening TCP socket (it was asked for port 0)."""
    from test_cli import listening_sockets

    for address in listening_sockets(pid):
        if address.startswith("127.0.0.1:"):
            return "tcp:" + address
    raise AssertionError(f"no TCP listener: {listening_sockets(pid)}")


@pytest.mark.parametrize("content, status, words", [
    (None, 0, "configuration OK"),
    ('listen = ["tcp:notaport"]\noptin_file = "optin"\n', 1, 'listen = "tcp:notaport"'),
    ('optin_file = "missing"\n', 1, 'missing": cannot read it'),
    ('log_decisions = "some"\noptin_file = "optin"\n', 1, 'log_decisions = "some"'),
    ('optin_file = "optin"\nreplies = {no_reverse_dns = "450 4.7.25 [{address:d}] no PTR."}\n',
     1, "replies.no_reverse_dns = '450 4.7.25 [{address:d}] no PTR.'"),
])
def test_configtest(tmp_path, knot, content, status, words):
    """configtest exits 0 for a configuration serve would start with, else 1 naming the key
    and value; it binds nothing and asks no DNS (an unreachable nameserver is fine)."""
    path = write_config(tmp_path, knot, ["tcp:1:interface=127.0.0.1"])  # port 1: not bound
    if content is not None:
        (tmp_path / "optin").write_text("example.com\n")
        (tmp_path / "p.toml").write_text(content + 'nameservers = ["192.0.2.1"]\n')
    result = cli("configtest", "--config", path)
    assert result.returncode == status, result.stdout + result.stderr
    assert words in result.stdout + result.stderr
