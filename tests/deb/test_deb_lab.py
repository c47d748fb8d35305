"""The installed daemon in the end-to-end lab, started exactly as its systemd unit starts it.

Real Postfix, wired with README.Debian's main.cf lines, and real Knot run in two network
namespaces of this module's own (p6d-mx, p6d-snd) with the addresses and zones of the e2e lab
(tests/e2e/topology.py); swaks sends from the sender side. The daemon is the installed
/usr/bin/policyd-ipv6 running the unit's ExecStart verbatim - so on the installed
/etc/policyd-ipv6/policyd-ipv6.toml, unchanged - as the unit's user, in the unit's sandbox as
far as it can be reproduced without systemd (unitrun.py, unitfilter.py: no capabilities, a
read-only file system, private /tmp, the system-call filter, address families and W^X). Its
DNS is the namespace's resolv.conf, which the installed config's empty `nameservers` reads
and which names the lab's Knot. The one
change to the installed files: example.com is added to /etc/policyd-ipv6/optin-domains while
this module runs (the file is restored afterwards). The installed config listens on Unix
sockets in /var/spool/postfix/policyd-ipv6, which the unit's ExecStartPre= (the package's
tmpfiles.d entry) makes; the lab Postfix's queue directory links its policyd-ipv6 to that
directory, so README.Debian's unix:policyd-ipv6/policy reaches the real socket. A second
installed daemon listens on TCP as README.Debian's "Using TCP instead" says.

The lab lives under /var/spool, not /tmp: the reproduced PrivateTmp= hides /tmp from the daemon.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e import topology as T
from lab import knot, netns, postfix, smtp
from lab.policyd import config_from_example

from . import readme_debian
from .debbuild import require
from .expect import (
    CONFIG,
    FAKE_DKIM_KEY,
    NO_AUTH,
    NO_PTR,
    NOT_OPTED,
    OPTIN,
    installed_readme_debian,
)
from .unitfilter import filter_unavailable
from .unitrun import (
    UNIT_PATH,
    InstalledDaemon,
    Unit,
    command_line,
    credentials,
    mount_options,
    sandbox_argv,
)

pytestmark = pytest.mark.deb

MX_NS, SENDER_NS = "p6d-mx", "p6d-snd"
MX_IF, SENDER_IF = "p6d-mx0", "p6d-snd0"
POSTFIX_SPOOL = "/var/spool/postfix"
OK = r"250 2\.1\.5 Ok"


@dataclass
class DebLab:
    root: Path
    unit: Unit
    mx: netns.Namespace = field(default_factory=lambda: netns.Namespace(MX_NS))
    sender: netns.Namespace = field(default_factory=lambda: netns.Namespace(SENDER_NS))
    postfix: postfix.PostfixInstance | None = None
    daemon: InstalledDaemon | None = None
    unix_daemon: InstalledDaemon | None = None
    socket_path: Path | None = None

    def send(self, source: str, recipient: str, port: int = T.SMTP_PORT) -> smtp.SmtpResult:
        """One swaks transaction from `source` to `recipient`, with a unique subject."""
        server = T.MX4 if ":" not in source else T.MX6
        return smtp.send(server=server, port=port, sender=T.SENDER, recipients=[recipient],
                         helo=T.HELO, source=source, netns=self.sender,
                         subject="deb %s" % uuid.uuid4().hex[:12])

    def context(self) -> str:
        """Logs for an assertion message."""
        return "\n--- maillog ---\n%s\n--- daemon ---\n%s\n--- unix daemon ---\n%s" % (
            self.postfix.log_tail(20), self.daemon.log_tail(15), self.unix_daemon.log_tail(15))


def _requirements() -> str | None:
    for check in (netns.netns_unavailable, postfix.postfix_unavailable, knot.knot_unavailable,
                  smtp.swaks_unavailable, filter_unavailable):
        problem = check()
        if problem:
            return problem
    return None


def _network(lab: DebLab, request) -> None:
    netns.build_link(lab.mx, MX_IF, T.MX_ADDRESSES, lab.sender, SENDER_IF, T.SENDER_ADDRESSES,
                     "2001:db8::/32", [T.DNS6], request.addfinalizer)


def _postfix(lab: DebLab, readme: str, request) -> dict:
    """Postfix with README.Debian's main.cf lines; returns README.Debian's TCP recipe."""
    lines = readme_debian.main_cf_lines(readme)
    recipe = readme_debian.tcp_recipe(readme)
    tcp_endpoint = re.fullmatch(r"check_policy_service \{ (inet:\S+), timeout=30s \}",
                                recipe["check_policy_service"]).group(1)
    restrictions = postfix.main_cf_value(lines, "smtpd_recipient_restrictions")
    # The e2e listeners minus the one wired to a policy service that is down there.
    services = [s for s in T.postfix_services() if "]:%d " % T.SMTP_PORT_DNS_DOWN not in s]
    lab.postfix = postfix.PostfixInstance(lab.root / "postfix",
                                          T.postfix_settings(restrictions, tcp_endpoint), [lines],
                                          services, lab.mx)
    request.addfinalizer(lab.postfix.stop)
    lab.postfix.start()
    return recipe


def _sockets_directory(lab: DebLab, request) -> Path:
    """The unit's ExecStartPre= as systemd runs it (as root), then the lab Postfix's
    policyd-ipv6 linked to the directory it made; returns the directory."""
    (pre,) = lab.unit.settings["ExecStartPre"]
    made = subprocess.run(shlex.split(pre.lstrip("-+")), capture_output=True, text=True)
    assert made.returncode == 0, "%s: %s" % (pre, made.stderr)
    (writable,) = lab.unit.settings["ReadWritePaths"]
    directory = Path(writable.lstrip("-"))
    link = lab.postfix.queue_dir / directory.name
    link.symlink_to(directory)
    request.addfinalizer(lambda: link.unlink(missing_ok=True))
    return directory


def _daemons(lab: DebLab, recipe: dict, request) -> None:
    directory = _sockets_directory(lab, request)
    listen = tomllib.loads(CONFIG.read_text())["listen"]
    lab.socket_path = Path(listen[0].split(":")[1])
    assert lab.socket_path.parent == directory, listen
    tcp_config = lab.root / "tcp.toml"
    tcp_config.write_text(config_from_example(CONFIG.read_text(), {
        "listen": recipe["listen"], "milter_listen": [], "optin_file": str(OPTIN)}))
    os.chmod(tcp_config, 0o644)
    lab.daemon = InstalledDaemon(lab.unit, lab.root / "daemon.log", lab.mx,
                                 read_write_paths=[directory])
    lab.unix_daemon = InstalledDaemon(
        lab.unit, lab.root / "tcp-daemon.log", lab.mx, config_path=tcp_config)
    for daemon in (lab.daemon, lab.unix_daemon):
        request.addfinalizer(daemon.stop)
        daemon.launch()
    for daemon in (lab.daemon, lab.unix_daemon):
        daemon.wait_ready()


@pytest.fixture(scope="module")
def deb_lab(package, request) -> DebLab:
    """The lab with the installed daemons running (see the module docstring)."""
    require(_requirements())
    package.ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="p6d-lab-", dir="/var/spool"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)  # the daemon's user and Postfix's processes walk below it
    lab = DebLab(root, Unit.read(UNIT_PATH))
    _network(lab, request)
    dns = knot.KnotServer(T.zones(FAKE_DKIM_KEY), [(T.DNS6, 53)], netns=MX_NS, workdir=root)
    request.addfinalizer(dns.stop)
    dns.start()
    recipe = _postfix(lab, installed_readme_debian(), request)
    original = OPTIN.read_bytes()
    request.addfinalizer(lambda: OPTIN.write_bytes(original))
    OPTIN.write_bytes(original + ("%s\n" % T.OPTED_IN).encode())
    _daemons(lab, recipe, request)
    return lab


def rcpt(domain: str = T.OPTED_IN) -> str:
    return "bob-%s@%s" % (uuid.uuid4().hex[:8], domain)


def refused(code: str, recipient: str, text: str) -> str:
    """Postfix's RCPT reply carrying the policy reply `code text`, as a regex."""
    return r"%s <%s>: Recipient address rejected: %s" % (
        re.escape(code), re.escape(recipient), re.escape(text))


def decision(daemon: InstalledDaemon, recipient: str) -> dict:
    (line,) = [d for d in daemon.decisions() if d.get("recipient") == recipient]
    return line


def assert_delivered(lab: DebLab, result: smtp.SmtpResult, recipient: str) -> None:
    assert result.accepted, result.transcript + lab.context()
    (message,) = lab.postfix.wait_for_message(result.subject)
    assert message["Delivered-To"] == recipient


# Run inside the reproduced sandbox: what the daemon's process may and may not do there.
PROBE = r"""
import errno, json, mmap, os, resource, socket
out = {"uid": os.getuid()}
def attempt(name, action):
    try:
        action()
        out[name] = "ok"
    except OSError as error:
        out[name] = errno.errorcode.get(error.errno, str(error.errno))
attempt("inet6 socket", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())
attempt("unix socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
attempt("netlink socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("writable+executable memory", lambda: mmap.mmap(-1, 4096, prot=7))
attempt("write /etc", lambda: open("/etc/p6d-probe", "w"))
attempt("chown (@privileged)", lambda: os.chown("/nonexistent-p6d", 0, 0))
attempt("sched_setaffinity (@resources)", lambda: os.sched_setaffinity(0, {0}))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
attempt("raise open files limit", lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)))
out["/root"] = os.listdir("/root")
print(json.dumps(out))
"""


def test_reproduced_sandbox_enforces_the_units_restrictions(deb_lab):
    """The sandbox the lab runs the daemon in denies what the unit denies (other address
    families, W+X memory, writes outside ReadWritePaths, @privileged and @resources calls),
    hides /root, and allows what the daemon needs (IP and Unix sockets, its open-files limit)."""
    run = subprocess.run(sandbox_argv(deb_lab.unit, ["/usr/bin/python3", "-c", PROBE]),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen == {
        "uid": pwd.getpwnam(deb_lab.unit.user).pw_uid,
        "inet6 socket": "ok", "unix socket": "ok", "netlink socket": "EAFNOSUPPORT",
        "writable+executable memory": "EACCES", "write /etc": "EROFS",
        "chown (@privileged)": "EPERM", "sched_setaffinity (@resources)": "EPERM",
        "raise open files limit": "ok", "/root": []}


def test_daemon_runs_as_its_unit_says(deb_lab):
    """The installed daemon runs the unit's ExecStart as the unit's user, without privileges or
    capabilities, under the unit's seccomp filter, on a read-only file system with a private
    /tmp, on the installed config, the namespace's DNS and the installed opt-in table."""
    pid = deb_lab.daemon.process.pid
    user = pwd.getpwnam(deb_lab.unit.user)
    creds = credentials(pid)
    assert set(creds["Uid"].split()) == {str(user.pw_uid)}, creds
    assert set(creds["Gid"].split()) == {str(user.pw_gid)}, creds
    assert creds["NoNewPrivs"] == "1"
    assert {creds["CapEff"], creds["CapPrm"], creds["CapBnd"]} == {"0" * 16}
    assert (creds["Seccomp"], creds["Seccomp_filters"]) == ("2", "1"), creds
    assert command_line(pid)[1:] == deb_lab.unit.exec_start
    mounts = mount_options(pid)
    assert mounts["/"][0].split(",")[0] == "ro", mounts["/"]
    assert mounts["/tmp"][1] == "tmpfs" and mounts["/root"][0].startswith("ro"), mounts
    (ready,) = [line for line in deb_lab.daemon.log().splitlines() if " ready: " in line]
    assert T.DNS6 in ready and "opt-in table %s (1 entries)" % OPTIN in ready, ready


def test_ptr_and_spf_pass_is_delivered(deb_lab):
    """An IPv6 sender with a PTR and an SPF pass to an opted-in domain gets its mail delivered."""
    bob = rcpt()
    result = deb_lab.send(T.GOOD, bob)
    assert re.fullmatch(OK, result.rcpt_reply(bob)), result.transcript + deb_lab.context()
    assert_delivered(deb_lab, result, bob)
    assert decision(deb_lab.daemon, bob)["reply"] == "DUNNO"


def test_no_ptr_is_refused_with_4_7_25(deb_lab):
    """An IPv6 sender without PTR gets 450 4.7.25 from the installed daemon, via Postfix."""
    bob = rcpt()
    result = deb_lab.send(T.NOPTR, bob)
    assert re.fullmatch(refused("450 4.7.25", bob, NO_PTR.split(" ", 2)[2] % T.NOPTR),
                        result.rcpt_reply(bob)), result.transcript + deb_lab.context()
    assert not result.accepted
    assert decision(deb_lab.daemon, bob)["rule"] == "no-rdns"


def test_spf_fail_is_refused_with_4_7_26(deb_lab):
    """An IPv6 sender with a PTR but outside the sender's SPF record gets 450 4.7.26."""
    bob = rcpt()
    result = deb_lab.send(T.OUTSIDE, bob)
    assert re.fullmatch(refused("450 4.7.26", bob, NO_AUTH.split(" ", 2)[2] % T.OUTSIDE),
                        result.rcpt_reply(bob)), result.transcript + deb_lab.context()
    assert not result.accepted
    assert decision(deb_lab.daemon, bob)["rule"] == "spf-failed"


def test_domain_not_opted_in_is_refused_with_5_2_1(deb_lab):
    """Mail over IPv6 to a domain missing from the installed opt-in table gets 550 5.2.1."""
    bob = rcpt(T.NOT_OPTED_IN)
    result = deb_lab.send(T.GOOD, bob)
    assert re.fullmatch(refused("550 5.2.1", bob, NOT_OPTED.split(" ", 2)[2] % T.NOT_OPTED_IN),
                        result.rcpt_reply(bob)), result.transcript + deb_lab.context()
    assert not result.accepted


def test_ipv4_sender_is_not_affected(deb_lab):
    """Over IPv4 even a domain that has not opted in gets its mail (the daemon says DUNNO)."""
    bob = rcpt(T.NOT_OPTED_IN)
    result = deb_lab.send(T.IPV4, bob)
    assert_delivered(deb_lab, result, bob)
    assert decision(deb_lab.daemon, bob)["rule"] == "ipv4"


def test_reload_applies_an_optin_edit(deb_lab):
    """The unit's ExecReload (SIGHUP to $MAINPID, as `systemctl reload` sends it) makes a domain
    just added to /etc/policyd-ipv6/optin-domains accept mail over IPv6."""
    before = rcpt(T.ADDED_LATER)
    result = deb_lab.send(T.GOOD, before)
    assert result.rcpt_reply(before).startswith("550 5.2.1"), result.transcript
    reloads = deb_lab.daemon.log().count("configuration reloaded (SIGHUP)")
    with open(OPTIN, "a") as table:
        table.write("%s\n" % T.ADDED_LATER)
    deb_lab.daemon.reload()
    deadline = time.monotonic() + 10
    while deb_lab.daemon.log().count("configuration reloaded (SIGHUP)") == reloads:
        assert time.monotonic() < deadline, deb_lab.context()
        time.sleep(0.05)
    after = rcpt(T.ADDED_LATER)
    result = deb_lab.send(T.GOOD, after)
    assert re.fullmatch(OK, result.rcpt_reply(after)), result.transcript + deb_lab.context()
    assert_delivered(deb_lab, result, after)


def test_installed_daemon_listens_on_its_unix_sockets_postfix_reaches(deb_lab):
    """The installed config's sockets lie in the directory ExecStartPre= made (the unit's user,
    group postfix, 2750), belong to the unit's user and group postfix with mode 660, and
    Postfix's smtpd gets the installed daemon's replies through unix:policyd-ipv6/policy."""
    directory = deb_lab.socket_path.parent
    info = directory.stat()
    assert stat.S_IMODE(info.st_mode) == 0o2750 and stat.S_ISDIR(info.st_mode)
    assert pwd.getpwuid(info.st_uid).pw_name == deb_lab.unit.user
    assert info.st_gid == grp.getgrnam("postfix").gr_gid
    for name in ("policy", "milter"):
        info = (directory / name).stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660, name
        assert pwd.getpwuid(info.st_uid).pw_name == deb_lab.unit.user, name
        assert info.st_gid == grp.getgrnam("postfix").gr_gid, name
    good, noptr = rcpt(), rcpt()
    assert_delivered(deb_lab, deb_lab.send(T.GOOD, good), good)
    result = deb_lab.send(T.NOPTR, noptr)
    assert result.rcpt_reply(noptr).startswith("450 4.7.25"), result.transcript
    assert decision(deb_lab.daemon, good)["reply"] == "DUNNO"
    assert decision(deb_lab.daemon, noptr)["rule"] == "no-rdns"


def test_tcp_listener_as_readme_debian_says(deb_lab):
    """README.Debian's TCP alternative works: Postfix reaches the installed daemon on
    inet:127.0.0.1:10045 and gets its replies."""
    good = rcpt()
    result = deb_lab.send(T.GOOD, good, port=T.SMTP_PORT_FCRDNS)
    assert_delivered(deb_lab, result, good)
    assert decision(deb_lab.unix_daemon, good)["reply"] == "DUNNO"


# Connects to each socket with the credentials it runs with; prints what happened.
PEER = r"""
import errno, json, socket, sys
out = {}
for path in sys.argv[1:]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
        sock.sendall(b"request=smtpd_access_policy\n")
        out[path] = "closed" if sock.recv(100) == b"" else "answered"
    except socket.timeout:
        out[path] = "still open after 5 s"
    except (ConnectionResetError, BrokenPipeError):
        # Closed with unread data (a reset), or closed before the request was written.
        out[path] = "closed"
    except OSError as error:
        out[path] = errno.errorcode.get(error.errno, str(error.errno))
    finally:
        sock.close()
print(json.dumps(out))
"""


def _connect_as(args: list[str], paths: list[Path]) -> dict:
    run = subprocess.run(["setpriv", *args, "--", "/usr/bin/python3", "-c", PEER,
                          *map(str, paths)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_other_local_users_are_refused_on_both_sockets(deb_lab):
    """A local user other than root and postfix cannot use the sockets: as nobody the
    directory refuses it (EACCES); even with group postfix, the daemon reads its uid
    (SO_PEERCRED) and closes the connection at once, on the policy and the milter socket."""
    directory = deb_lab.socket_path.parent
    paths = [directory / "policy", directory / "milter"]
    nobody = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    assert _connect_as(nobody, paths) == {str(p): "EACCES" for p in paths}
    with_group = ["--reuid=nobody", "--regid=nogroup", "--groups=postfix"]
    assert _connect_as(with_group, paths) == {str(p): "closed" for p in paths}
    refused = "connection from uid %d refused" % pwd.getpwnam("nobody").pw_uid
    assert refused in deb_lab.daemon.log(), deb_lab.daemon.log_tail()


def test_sigkill_then_restart_binds_the_same_paths(deb_lab):
    """Killed with SIGKILL (socket files and locks left behind), the daemon started again as
    Restart=on-failure does binds the same socket paths (lockfile=1) and Postfix reaches it."""
    daemon = deb_lab.daemon
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)
    daemon.process = None
    assert deb_lab.socket_path.is_socket()  # left behind
    daemon.start()
    bob = rcpt()
    assert_delivered(deb_lab, deb_lab.send(T.GOOD, bob), bob)
    assert decision(daemon, bob)["reply"] == "DUNNO"


def test_sigterm_stops_the_daemon_with_status_0(deb_lab):
    """SIGTERM, what `systemctl stop` sends, ends the installed daemon with exit status 0."""
    process, deb_lab.daemon.process = deb_lab.daemon.process, None
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0, deb_lab.daemon.log_tail()
    assert "policyd-ipv6 stopped" in deb_lab.daemon.log()
