"""The end-to-end lab as a session fixture: namespaces, Knot, Postfix, three policyd-ipv6 daemons.

`lab` builds what topology.py plans, once per test session, and tears all of it down at the
end - also after a failure or an interrupted set-up (every part registers its own finalizer
before it starts): daemons and Postfix stopped by PID, Knot stopped by PID, /etc/netns entries
and namespaces deleted, the temporary directory removed.

Postfix's main.cf is the lab's settings plus postfix-examples/main.cf.fragment verbatim; each
daemon's configuration is postfix-examples/policyd-ipv6.toml with a few keys changed; the
opt-in file starts as a copy of postfix-examples/optin-domains. So the examples are tested.

Outside root (or without Postfix, Knot, swaks) every e2e test is skipped with a loud reason;
under CI=true such a skip is turned into a failure: CI must really run these tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from lab import knot, netns, policyd, postfix, smtp

from . import topology as T

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "postfix-examples"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing_requirement() -> str | None:
    for check in (netns.netns_unavailable, postfix.postfix_unavailable, knot.knot_unavailable,
                  smtp.swaks_unavailable):
        problem = check()
        if problem:
            return problem
    if not os.access(policyd.console_script(), os.X_OK):
        return ("the policyd-ipv6 console script is not installed next to %s "
                "(pip install -e .)" % sys.executable)
    if not shutil.which("opendkim-genkey"):
        return "opendkim-genkey is not installed (Debian package opendkim-tools)"
    return None


# -- CI: a skipped e2e test is a failed one ------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and item.get_closest_marker("e2e") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = "CI=true, but the end-to-end test was skipped: %s" % reason
    elif report.failed and "lab" in getattr(item, "funcargs", {}):
        lab = item.funcargs["lab"]
        report.sections.append(("maillog (tail)", lab.postfix.log_tail(25)))
        for name, daemon in lab.daemons.items():
            report.sections.append(("policyd-ipv6 %s log (tail)" % name, daemon.log_tail(15)))


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if "e2e" in getattr(r, "keywords", {})]
    if skipped:
        reason = skipped[0].longrepr[2] if isinstance(skipped[0].longrepr, tuple) else ""
        terminalreporter.write_sep("!", "%d END-TO-END TESTS NOT RUN: %s" % (len(skipped), reason),
                                   red=True, bold=True)


# -- the lab -----------------------------------------------------------------------------------

class Lab:
    """Handles on the running lab, and `send()` for one SMTP transaction from the sender side."""

    def __init__(self, root: Path):
        self.root = root
        self.mx = netns.Namespace(T.MX_NS)
        self.sender = netns.Namespace(T.SENDER_NS)
        self.knot: knot.KnotServer | None = None
        self.postfix: postfix.PostfixInstance | None = None
        self.daemons: dict[str, policyd.PolicyDaemon] = {}
        self.optin_path = root / "policyd" / "optin-domains"
        self.dkim_private_key = root / "dkim" / ("%s.private" % T.DKIM_SELECTOR)

    def send(self, source: str, recipients: list[str], *, sender: str = T.SENDER,
             helo: str = T.HELO, port: int = T.SMTP_PORT, server: str | None = None,
             subject: str | None = None) -> smtp.SmtpResult:
        """One swaks transaction from `source` in the sender namespace; a unique subject."""
        if server is None:
            server = T.MX4 if ":" not in source else T.MX6
        return smtp.send(server=server, port=port, sender=sender, recipients=recipients,
                         helo=helo, source=source, netns=self.sender,
                         subject=subject or "lab %s" % uuid.uuid4().hex[:12])

    def delivered(self, subject: str, expected: int) -> list[str]:
        """Delivered-To of each copy of `subject` once `expected` copies arrived and the queue
        is empty (so a surplus copy would be counted too); sorted."""
        self.postfix.wait_for_message(subject, count=expected)
        self.postfix.wait_until_queue_empty()
        return sorted(m["Delivered-To"] for m in self.postfix.messages_with_subject(subject))


def _dkim_public_key(directory: Path) -> str:
    """Generate the sender domain's DKIM key pair; return the public key (base64)."""
    directory.mkdir()
    subprocess.run(["opendkim-genkey", "-b", "2048", "-d", T.SENDER_DOMAIN, "-s",
                    T.DKIM_SELECTOR, "-D", str(directory)], check=True, capture_output=True)
    record = (directory / ("%s.txt" % T.DKIM_SELECTOR)).read_text()
    joined = "".join(re.findall(r'"([^"]*)"', record))
    return re.search(r"p=([A-Za-z0-9+/=]+)", joined).group(1)


def _assert_no_process_left(*namespaces: netns.Namespace) -> None:
    """Teardown check: stopping Knot, Postfix and the daemons by PID ended everything inside."""
    deadline = time.monotonic() + 5
    left = {}
    while time.monotonic() < deadline:
        left = {ns.name: ns.pids() for ns in namespaces if ns.pids()}
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError("processes still running in the lab's namespaces: %s" % left)


def _build_network(lab: Lab, request) -> None:
    netns.build_link(lab.mx, T.MX_IF, T.MX_ADDRESSES, lab.sender, T.SENDER_IF,
                     T.SENDER_ADDRESSES, "2001:db8::/32", [T.DNS6], request.addfinalizer)
    # Runs after every process of the lab was stopped (finalizers run last-in, first-out).
    request.addfinalizer(lambda: _assert_no_process_left(lab.mx, lab.sender))


def _build_postfix(lab: Lab, request) -> None:
    fragment = (EXAMPLES / "main.cf.fragment").read_text()
    restrictions = postfix.main_cf_value(fragment, "smtpd_recipient_restrictions")
    fcrdns_endpoint = "inet:127.0.0.1:%d" % T.FCRDNS_PORT
    lab.postfix = postfix.PostfixInstance(
        lab.root / "postfix", T.postfix_settings(restrictions, fcrdns_endpoint), [fragment],
        T.postfix_services(), lab.mx)
    request.addfinalizer(lab.postfix.stop)
    lab.postfix.start()
    # As main.cf.fragment tells users: a set-group-ID directory of group postfix, so the
    # socket the daemon (root here) creates there has group postfix and mode 660 suffices.
    socket_dir = lab.postfix.queue_dir / T.UNIX_SOCKET_DIR
    socket_dir.mkdir()
    shutil.chown(socket_dir, "root", "postfix")
    os.chmod(socket_dir, 0o2750)


def _build_daemons(lab: Lab, request) -> None:
    directory = lab.root / "policyd"
    directory.mkdir()
    shutil.copyfile(EXAMPLES / "optin-domains", lab.optin_path)
    # The daemons read these again after dropping to their unprivileged user, whatever umask.
    os.chmod(directory, 0o755)
    os.chmod(lab.optin_path, 0o644)
    example = (EXAMPLES / "policyd-ipv6.toml").read_text()
    plan = T.daemon_overrides(str(lab.optin_path), tomllib.loads(example),
                              str(lab.postfix.queue_dir))
    for name, overrides in plan.items():
        config = directory / ("%s.toml" % name)
        config.write_text(policyd.config_from_example(example, overrides))
        os.chmod(config, 0o644)
        daemon = policyd.PolicyDaemon(config, directory / ("%s.log" % name), lab.mx)
        lab.daemons[name] = daemon
        request.addfinalizer(daemon.stop)
        daemon.launch()
    # Started together: each takes about half a second to import Twisted and bind.
    for daemon in lab.daemons.values():
        daemon.wait_ready()


@pytest.fixture(scope="session")
def lab(request):
    """The running lab (see the module docstring); skipped loudly when it cannot run here."""
    problem = _missing_requirement()
    if problem:
        if IN_CI:
            pytest.fail("CI=true, but the end-to-end lab cannot run: %s" % problem, pytrace=False)
        pytest.skip("END-TO-END LAB NOT RUN: %s" % problem)
    root = Path(tempfile.mkdtemp(prefix="p6e-lab-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    # Postfix's unprivileged processes and virtual(8) (as nobody) walk below this directory.
    os.chmod(root, 0o755)
    lab = Lab(root)
    _build_network(lab, request)
    public_key = _dkim_public_key(root / "dkim")
    lab.knot = knot.KnotServer(T.zones(public_key), [(T.DNS6, 53)], netns=T.MX_NS, workdir=root)
    request.addfinalizer(lab.knot.stop)
    lab.knot.start()
    _build_postfix(lab, request)
    _build_daemons(lab, request)
    return lab
