"""Safe rollout end to end: real Postfix, real Knot, real swaks (issue "Safe rollout").

A lab of its own (namespaces p6r-mx / p6r-snd, so it runs beside the shared lab), built from
the same parts (tests/lab) and the same plan (topology.py). Postfix's main.cf is the lab's
settings, postfix-examples/main.cf.fragment verbatim, then the fragment's own commented lines
uncommented: the milter (with policyd-ipv6-milter.cidr), the TLS client-certificate settings,
and the restriction class (with policyd-ipv6-clients.cidr) on a listener of its own, so the
documented wiring is what is tested. One daemon runs postfix-examples/policyd-ipv6.toml with
its sockets in the lab's queue directory, a client certificate pinned in
exempt_client_certificates, and an opt-in table whose second entry is in report mode.

Scenarios: an SPF-failing unsigned message to the report-mode domain is delivered through the
milter, with our Authentication-Results, and would= logged; a client presenting the pinned
certificate (swaks --tls-cert) is exempt at a domain that has not opted in, and the decision
line says tls=; the restriction class never asks the daemon about IPv4 clients: with the
daemon stopped, IPv4 mail is delivered and IPv6 mail gets 4xx.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from dkimkeys import DkimKey, message
from lab import knot, netns, policyd, postfix, smtp

from . import topology as T
from .conftest import EXAMPLES, IN_CI, _missing_requirement

pytestmark = pytest.mark.e2e

MX_NS, SENDER_NS = "p6r-mx", "p6r-snd"
MX_IF, SENDER_IF = "p6r-mx0", "p6r-snd0"
AUTHSERV = "mx.example.com"
REPORTED = "example.org"  # opted in with mode=report
CLASS_PORT = 2828  # the restriction-class wiring, without the milter
COMMENTED = re.compile(r"^#((?:smtpd_milter_maps|milter_protocol|smtpd_tls_ask_ccert|"
                       r"smtpd_tls_fingerprint_digest|smtpd_restriction_classes|ipv6_policy|"
                       r"smtpd_recipient_restrictions) = .+)$", re.M)
MILTER_MAP = "/etc/postfix/policyd-ipv6-milter.cidr"
CLIENTS_MAP = "/etc/postfix/policyd-ipv6-clients.cidr"


def no_auth(address: str) -> str:
    return ("450 4.7.26 Service unavailable, message sent over IPv6 [%s] must pass either SPF "
            "or DKIM validation." % address)


class RolloutLab:
    def __init__(self, root: Path):
        self.root = root
        self.mx = netns.Namespace(MX_NS)
        self.sender = netns.Namespace(SENDER_NS)
        self.postfix: postfix.PostfixInstance | None = None
        self.daemon: policyd.PolicyDaemon | None = None
        self.client_cert = root / "tls" / "client.pem"
        self.client_key = root / "tls" / "client.key"
        self.other_cert = root / "tls" / "other.pem"
        self.other_key = root / "tls" / "other.key"

    def send(self, source: str, recipient: str, *, port: int = T.SMTP_PORT,
             raw: bytes | None = None, extra: list[str] = ()) -> smtp.SmtpResult:
        """One swaks transaction; `raw` is sent as the DATA exactly when given."""
        subject = "rollout %s" % uuid.uuid4().hex[:12]
        args = list(extra)
        if raw is not None:
            path = self.root / ("%s.eml" % uuid.uuid4().hex)
            path.write_bytes(raw.replace(b"SUBJECT", subject.encode()) + b".")
            os.chmod(path, 0o644)
            args += ["--data", "@%s" % path, "--no-data-fixup"]
        return smtp.send(server=T.MX6 if ":" in source else T.MX4, port=port,
                         sender=T.SENDER, recipients=[recipient], helo=T.HELO, source=source,
                         netns=self.sender, subject=subject, extra=args)

    def decisions_for(self, recipient: str) -> list[dict[str, str]]:
        return [d for d in self.daemon.decisions() if d.get("recipient") == recipient]


def _certificate(cert: Path, key: Path, name: str) -> str:
    """A self-signed certificate and its key; returns its SHA-256 fingerprint as
    openssl prints it (AB:CD:...)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=%s" % name, "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    os.chmod(key, 0o644)  # read by swaks and, for the server's, by Postfix's smtpd (root)
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint",
                          "-sha256"], check=True, capture_output=True, text=True).stdout
    return out.strip().split("=", 1)[1]


def _main_cf(fragment: str, root: Path) -> tuple[dict[str, str], str]:
    """The lab's settings and the fragment's commented lines, uncommented, with the maps'
    paths moved into the lab; the class's restrictions become lab_class_restrictions."""
    lines = dict(line.split(" = ", 1) for line in COMMENTED.findall(fragment))
    assert sorted(lines) == sorted(["smtpd_milter_maps", "milter_protocol", "smtpd_tls_ask_ccert",
                                    "smtpd_tls_fingerprint_digest", "smtpd_restriction_classes",
                                    "ipv6_policy", "smtpd_recipient_restrictions"]), lines
    restrictions = postfix.main_cf_value(fragment, "smtpd_recipient_restrictions")
    settings = {k: v for k, v in T.postfix_settings(restrictions, "unused").items()
                if not k.startswith("lab_")}
    milter_map, clients_map = root / "milter.cidr", root / "clients.cidr"
    milter_map.write_text((EXAMPLES / "policyd-ipv6-milter.cidr").read_text())
    clients_map.write_text((EXAMPLES / "policyd-ipv6-clients.cidr").read_text())
    class_restrictions = lines.pop("smtpd_recipient_restrictions")
    assert "check_client_access cidr:%s" % CLIENTS_MAP in class_restrictions
    assert lines["ipv6_policy"] == restrictions.split("reject_unauth_destination,")[1].strip()
    settings["lab_class_restrictions"] = class_restrictions.replace(CLIENTS_MAP,
                                                                    str(clients_map))
    settings.update({"smtpd_tls_cert_file": str(root / "tls" / "server.pem"),
                     "smtpd_tls_key_file": str(root / "tls" / "server.key"),
                     "smtpd_tls_security_level": "may"})
    extra = "".join("%s = %s\n" % item for item in lines.items())
    return settings, extra.replace(MILTER_MAP, str(milter_map))


@pytest.fixture(scope="module")
def rollout_lab(request):
    problem = _missing_requirement() or (None if shutil.which("openssl")
                                         else "openssl is not installed")
    if problem:
        if IN_CI:
            pytest.fail("CI=true, but the rollout lab cannot run: %s" % problem, pytrace=False)
        pytest.skip("END-TO-END ROLLOUT LAB NOT RUN: %s" % problem)
    root = Path(tempfile.mkdtemp(prefix="p6r-lab-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)
    lab = RolloutLab(root)
    (root / "tls").mkdir(mode=0o755)
    _certificate(root / "tls" / "server.pem", root / "tls" / "server.key", AUTHSERV)
    pinned = _certificate(lab.client_cert, lab.client_key, "partner.example")
    _certificate(lab.other_cert, lab.other_key, "stranger.example")
    netns.build_link(lab.mx, MX_IF, T.MX_ADDRESSES, lab.sender, SENDER_IF, T.SENDER_ADDRESSES,
                     "2001:db8::/32", [T.DNS6], request.addfinalizer)
    server = knot.KnotServer(T.zones(DkimKey.generate(1024).public_b64), [(T.DNS6, 53)],
                             netns=MX_NS, workdir=root)
    request.addfinalizer(server.stop)
    server.start()

    fragment = (EXAMPLES / "main.cf.fragment").read_text()
    settings, uncommented = _main_cf(fragment, root)
    smtpd = "inet  n       -       n       -       -       smtpd"
    by_class = ("\n  -o smtpd_recipient_restrictions=$lab_class_restrictions"
                "\n  -o smtpd_milter_maps=")
    services = ["[%s]:%d %s" % (T.MX6, T.SMTP_PORT, smtpd),
                "%s:%d %s" % (T.MX4, T.SMTP_PORT, smtpd),
                "[%s]:%d %s%s" % (T.MX6, CLASS_PORT, smtpd, by_class),
                "%s:%d %s%s" % (T.MX4, CLASS_PORT, smtpd, by_class),
                # TLS needs tlsmgr (entropy, session cache), which the lab does not run itself.
                "tlsmgr    unix  -       -       n       1000?   1       tlsmgr"]
    lab.postfix = postfix.PostfixInstance(root / "postfix", settings, [fragment, uncommented],
                                          services, lab.mx)
    request.addfinalizer(lab.postfix.stop)
    lab.postfix.start()
    socket_dir = lab.postfix.queue_dir / "policyd-ipv6"
    socket_dir.mkdir()
    shutil.chown(socket_dir, "root", "postfix")
    os.chmod(socket_dir, 0o2750)

    directory = root / "policyd"
    directory.mkdir()
    optin = directory / "optin-domains"
    optin.write_text((EXAMPLES / "optin-domains").read_text()
                     + "%s mode=report\n" % REPORTED)
    example = (EXAMPLES / "policyd-ipv6.toml").read_text()
    queue = str(lab.postfix.queue_dir)
    parsed = tomllib.loads(example)
    config = directory / "rollout.toml"
    config.write_text(policyd.config_from_example(example, {
        "user": "nobody", "optin_file": str(optin), "dns_timeout_seconds": 1.0,
        "decision_deadline_seconds": 5.0, "authserv_id": AUTHSERV,
        "listen": T.in_queue_dir(parsed["listen"], queue),
        "milter_listen": T.in_queue_dir(parsed["milter_listen"], queue),
        "exempt_client_certificates": [pinned]}))
    os.chmod(directory, 0o755)
    os.chmod(optin, 0o644)
    os.chmod(config, 0o644)
    lab.daemon = policyd.PolicyDaemon(config, directory / "rollout.log", lab.mx)
    request.addfinalizer(lab.daemon.stop)
    lab.daemon.start()
    milter = lab.postfix.queue_dir / "policyd-ipv6" / "milter"
    deadline = time.monotonic() + policyd.START_TIMEOUT_SECONDS
    while not milter.is_socket():
        assert time.monotonic() < deadline and lab.daemon.running, lab.daemon.log_tail()
        time.sleep(0.05)
    return lab


def fresh(domain: str, local: str = "bob") -> str:
    return "%s-%s@%s" % (local, uuid.uuid4().hex[:10], domain)


def unsigned(recipient: str, extra: bytes = b"") -> bytes:
    return message(T.SENDER, recipient, "SUBJECT", b"Not signed.\r\n", extra)


def test_report_mode_lets_an_spf_failing_unsigned_message_in_through_the_milter(rollout_lab):
    """OUTSIDE fails SPF and does not sign: to the mode=report domain the message is delivered
    with our Authentication-Results (the forged one gone), the milter logs would= the 4.7.26;
    to an enforcing domain the same message gets the 4.7.26 after DATA."""
    lab = rollout_lab
    bob = fresh(REPORTED)
    forged = b"Authentication-Results: %s; spf=pass smtp.mailfrom=ceo@bank.example\r\n" % (
        AUTHSERV.encode())
    result = lab.send(T.OUTSIDE, bob, raw=unsigned(bob, forged))
    assert result.accepted, result.transcript
    (copy,) = lab.postfix.wait_for_message(result.subject)
    ours = [str(v) for v in copy.get_all("Authentication-Results", [])]
    assert len(ours) == 1 and ours[0].strip().startswith(AUTHSERV), ours
    assert "spf=fail smtp.mailfrom=%s" % T.SENDER in ours[0] and "dkim=none" in ours[0]
    assert "bank.example" not in str(copy)
    assert [d["rule"] for d in lab.decisions_for(bob)] == ["spf-failed-dkim-pending"]
    lines = [line for line in lab.daemon.log().splitlines() if " milter client=" in line]
    assert any('rule=unsigned would="%s" reply="CONTINUE"' % no_auth(T.OUTSIDE) in line
               for line in lines), lab.daemon.log_tail()

    carol = fresh(T.OPTED_IN)
    enforced = lab.send(T.OUTSIDE, carol, raw=unsigned(carol))
    assert enforced.final_reply() == no_auth(T.OUTSIDE), enforced.transcript


def test_report_mode_policy_refusal_is_dunno_with_would_at_rcpt(rollout_lab):
    """NOPTR has no PTR: at the mode=report domain RCPT is accepted and the decision line
    carries rule=no-rdns with would= the 450 4.7.25; at an enforcing domain it is refused."""
    lab = rollout_lab
    bob, carol = fresh(REPORTED), fresh(T.OPTED_IN)
    result = lab.send(T.NOPTR, bob)
    assert result.accepted, result.transcript
    (line,) = lab.decisions_for(bob)
    assert (line["rule"], line["reply"]) == ("no-rdns", "DUNNO")
    assert line["would"].startswith("450 4.7.25 ") and "tls" not in line
    refused = lab.send(T.NOPTR, carol)
    assert re.match(r"450 4\.7\.25 ", refused.rcpt_reply(carol)), refused.transcript


def test_pinned_client_certificate_is_a_tls_connector(rollout_lab):
    """A client presenting the pinned certificate over STARTTLS is exempt at a domain that has
    not opted in (rule tls-connector, tls= logged); another certificate gets the 550 5.2.1."""
    lab = rollout_lab
    bob, carol = fresh(T.NOT_OPTED_IN), fresh(T.NOT_OPTED_IN)
    pinned = lab.send(T.OUTSIDE, bob, extra=["--tls", "--tls-cert", str(lab.client_cert),
                                             "--tls-key", str(lab.client_key)])
    assert pinned.accepted, pinned.transcript
    lab.postfix.wait_for_message(pinned.subject)
    (line,) = lab.decisions_for(bob)
    assert line["rule"] == "tls-connector" and line["tls"].startswith("TLSv1"), line
    other = lab.send(T.OUTSIDE, carol, extra=["--tls", "--tls-cert", str(lab.other_cert),
                                              "--tls-key", str(lab.other_key)])
    assert re.match(r"550 5\.2\.1 ", other.rcpt_reply(carol)), other.transcript
    (line,) = lab.decisions_for(carol)
    assert line["rule"] == "not-opted-in" and line["tls"].startswith("TLSv1")


def test_restriction_class_keeps_ipv4_away_from_the_daemon_even_when_stopped(rollout_lab):
    """The documented class (check_client_access cidr: ::/0 ipv6_policy): the daemon is asked
    about IPv6 clients only; stopped, IPv4 mail is still delivered and IPv6 mail gets 4xx.
    (Last in this module: it stops the daemon.)"""
    lab = rollout_lab
    six, four = fresh(T.NOT_OPTED_IN), fresh(T.NOT_OPTED_IN)
    refused = lab.send(T.OUTSIDE, six, port=CLASS_PORT)
    assert re.match(r"550 5\.2\.1 ", refused.rcpt_reply(six)), refused.transcript
    delivered = lab.send(T.IPV4, four, port=CLASS_PORT)
    assert delivered.accepted, delivered.transcript
    lab.postfix.wait_for_message(delivered.subject)
    assert len(lab.decisions_for(six)) == 1 and lab.decisions_for(four) == []

    lab.daemon.stop()
    six, four = fresh(T.OPTED_IN), fresh(T.OPTED_IN)
    still = lab.send(T.IPV4, four, port=CLASS_PORT)
    assert still.accepted, still.transcript
    lab.postfix.wait_for_message(still.subject)
    held = lab.send(T.GOOD, six, port=CLASS_PORT)
    assert re.match(r"4\d\d 4\.\d+\.\d+ ", held.rcpt_reply(six)), held.transcript
    assert lab.postfix.messages_with_subject(held.subject) == []
