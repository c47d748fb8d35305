"""The maintainer scripts and debian/NEWS: what an upgrade from the TCP listener tells the
administrator, what purge removes, how the units are restarted (no build, no root).

The unit tests read the files. The process tests run postinst and postrm as they are, on a
copy whose absolute paths point into a temporary directory, with stand-ins for adduser and
postconf first on PATH (dpkg is the host's); and render the postinst snippets this host's
debhelper makes from debian/rules' own dh_installsystemd commands.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from lab.policyd import config_from_example

from . import debbuild, readme_debian
from .debbuild import require

DEBIAN = debbuild.DEBIAN
EXAMPLES = debbuild.REPO / "postfix-examples"
MILTER_SOCKET = "policyd-ipv6-milter.socket"
# The version before the listener moved to a Unix socket: 0.1.0-1's conffile listened on
# tcp:10045:interface=127.0.0.1 and its README.Debian wired inet:127.0.0.1:10045.
TCP_VERSION = "0.1.0-1"


def packaged(name: str) -> str:
    return (DEBIAN / name).read_text()


def news_entries() -> dict[str, str]:
    """debian/NEWS as version -> the entry's text (header to trailer)."""
    text = packaged("NEWS")
    starts = [m for m in re.finditer(r"^policyd-ipv6 \(([^)]+)\) ", text, re.M)]
    return {m.group(1): text[m.start():(starts[i + 1].start() if i + 1 < len(starts)
                                         else len(text))]
            for i, m in enumerate(starts)}


def unix_wiring() -> str:
    """README.Debian's check_policy_service item, as one line."""
    lines = readme_debian.main_cf_lines(packaged("README.Debian"))
    (item,) = re.findall(r"check_policy_service \{[^}]*\}", lines)
    return item


def test_news_tells_an_upgrade_from_tcp_how_to_rewire_postfix():
    """debian/NEWS has an entry for the version postinst warns upgrades from before (one
    debian/changelog has), giving README.Debian's Unix socket wiring, the old TCP address and
    README.Debian's TCP listen line to keep TCP instead."""
    (changed,) = re.findall(r'dpkg --compare-versions "\$2" lt (\S+)',
                            packaged("policyd-ipv6.postinst"))
    changelog = re.findall(r"^policyd-ipv6 \(([^)]+)\) ", packaged("changelog"), re.M)
    assert changed in changelog and TCP_VERSION in changelog
    assert changelog.index(changed) == changelog.index(TCP_VERSION) - 1
    entry = " ".join(news_entries()[changed].split())
    recipe = readme_debian.tcp_recipe(packaged("README.Debian"))
    assert unix_wiring() in entry and "unix:policyd-ipv6/policy" in unix_wiring()
    assert "inet:127.0.0.1:10045" in recipe["check_policy_service"]
    assert "inet:127.0.0.1:10045" in entry
    assert 'listen = ["%s"]' % recipe["listen"][0] in entry


def test_control_description_names_the_packaged_listener():
    """The package description says where the packaged configuration listens (the Unix
    sockets' directory), not the TCP address of 0.1.0-1."""
    description = packaged("control").split("\nDescription:", 1)[1]
    assert "10045" not in description and "127.0.0.1" not in description
    assert "/var/spool/postfix/policyd-ipv6" in " ".join(description.split())


def test_milter_socket_is_not_restarted_on_its_own():
    """debian/rules' dh_installsystemd call for the milter socket neither stops nor restarts
    it on upgrade: systemd refuses to start a socket unit whose service runs (EBUSY)."""
    rules = packaged("rules").replace("\\\n", " ")
    (call,) = [line.split() for line in rules.splitlines()
               if "dh_installsystemd" in line and "--name=policyd-ipv6-milter" in line]
    assert "--no-stop-on-upgrade" in call
    assert not {"--restart-after-upgrade", "-R", "--no-restart-after-upgrade"} & set(call)


def _stand_in(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def _run_postinst(tmp_path: Path, args: list[str], config: str, postconf: str | None):
    """postinst `args` with /etc/policyd-ipv6 and /usr/share/policyd-ipv6 under tmp_path, the
    given configuration file, and `postconf` (a shell body; None: no postconf at all)."""
    require(None if shutil.which("dpkg") else "dpkg is not installed")
    root = tmp_path / "root"
    (root / "etc/policyd-ipv6").mkdir(parents=True)
    (root / "usr/share/policyd-ipv6").mkdir(parents=True)
    (root / "usr/share/policyd-ipv6/optin-domains").write_text("# none\n")
    (root / "etc/policyd-ipv6/policyd-ipv6.toml").write_text(config)
    script = packaged("policyd-ipv6.postinst")
    for path in ("/etc/policyd-ipv6/", "/usr/share/policyd-ipv6/"):
        script = script.replace(path, str(root) + path)
    (tmp_path / "postinst").write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "adduser", "exit 0\n")
    if postconf is not None:
        _stand_in(bin_dir, "postconf", postconf)
    return subprocess.run(["sh", str(tmp_path / "postinst")] + args, capture_output=True,
                          text=True, timeout=30,
                          env={"PATH": "%s:/usr/bin:/bin" % bin_dir, "LC_ALL": "C"})


OLD_MAIN_CF = ('case "$1" in -n) echo "smtpd_recipient_restrictions = permit_mynetworks, '
               'reject_unauth_destination, check_policy_service { inet:127.0.0.1:10045, '
               'timeout=30s }";; esac\n')
OLD_MASTER_CF = ('case "$1" in -P) echo "smtp/inet/smtpd_recipient_restrictions = '
                 'check_policy_service inet:127.0.0.1:10045";; esac\n')
NEW_MAIN_CF = ('case "$1" in -n) echo "smtpd_recipient_restrictions = '
               'check_policy_service { unix:policyd-ipv6/policy, timeout=30s }";; esac\n')


@pytest.mark.process
@pytest.mark.parametrize("version, postconf, tcp, warns", [
    (TCP_VERSION, OLD_MAIN_CF, False, True),      # the unedited conffile replaced
    (TCP_VERSION, OLD_MASTER_CF, False, True),    # wired in master.cf instead
    (TCP_VERSION, OLD_MAIN_CF, True, False),      # the administrator kept TCP
    (TCP_VERSION, NEW_MAIN_CF, False, False),     # Postfix already rewired
    (TCP_VERSION, None, False, False),            # no postconf at all
    (TCP_VERSION, "echo 'postconf: fatal: open main.cf' >&2; exit 1\n", False, False),
    ("", OLD_MAIN_CF, False, False),              # a first installation
    ("0.1.0-2", OLD_MAIN_CF, False, False),       # already on the Unix socket version
], ids=["main.cf", "master.cf", "tcp-kept", "rewired", "no-postconf", "postconf-fails",
        "install", "later-upgrade"])
def test_postinst_warns_an_upgrade_still_wired_to_the_tcp_port(tmp_path, version, postconf,
                                                               tcp, warns):
    """postinst configure succeeds, and warns on stderr with the fix exactly when it upgrades
    from the TCP version, Postfix (main.cf or master.cf) names inet:127.0.0.1:10045 and the
    configuration no longer listens on that port."""
    example = (EXAMPLES / "policyd-ipv6.toml").read_text()
    recipe = readme_debian.tcp_recipe(packaged("README.Debian"))
    config = config_from_example(example, {"listen": recipe["listen"]}) if tcp else example
    run = _run_postinst(tmp_path, ["configure", version], config, postconf)
    assert run.returncode == 0, run.stdout + run.stderr
    if warns:
        assert "WARNING" in run.stderr and "inet:127.0.0.1:10045" in run.stderr
        assert unix_wiring() in run.stderr and "postfix reload" in run.stderr
        assert 'listen = ["%s"]' % recipe["listen"][0] in run.stderr
    else:
        assert run.stderr == ""


@pytest.mark.process
def test_postrm_purge_removes_the_state_directory_but_what_an_administrator_added(tmp_path):
    """postrm purge removes the last-good copy of the opt-in table and the temporary files
    of its write from /var/lib/policyd-ipv6 and the directory itself; a file of the
    administrator's there is kept, and so is the directory then."""
    paths = ("/etc/policyd-ipv6", "/var/spool/postfix/policyd-ipv6", "/var/lib/policyd-ipv6")
    script = packaged("policyd-ipv6.postrm")
    for path in paths:
        script = script.replace(path, str(tmp_path) + path)
    (tmp_path / "postrm").write_text(script)
    for kept in (False, True):
        state = tmp_path / "var/lib/policyd-ipv6"
        for path in paths:
            (tmp_path / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (tmp_path / "etc/policyd-ipv6/policyd-ipv6.toml").write_text("listen = []\n")
        (state / "optin-domains.last-good").write_text("customer.example\n")
        (state / ".optin-domains.k2j3l4").write_text("customer.exam")
        if kept:
            (state / "notes").write_text("mine\n")
        run = subprocess.run(["sh", str(tmp_path / "postrm"), "purge"], capture_output=True,
                             text=True, timeout=30)
        assert run.returncode == 0, run.stdout + run.stderr
        left = sorted(p.name for p in state.iterdir()) if state.exists() else None
        assert left == (["notes"] if kept else None)
        assert not (tmp_path / "etc/policyd-ipv6").exists()


@pytest.mark.process
def test_rendered_postinst_restarts_the_milter_socket_only_with_the_service(tmp_path):
    """The maintainer scripts this host's debhelper makes from debian/rules' own
    dh_installsystemd calls restart the service and the policy socket together and only start
    the milter socket (a no-op once the service pulled it in), stopping it on removal only."""
    for tool in ("dh_installsystemd", "make"):
        require(None if shutil.which(tool) else "%s is not installed (debhelper, make)" % tool)
    shutil.copytree(DEBIAN, tmp_path / "debian")
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    for command in (["dh_installsystemd", "-ppolicyd-ipv6"],
                    ["make", "-s", "-f", "debian/rules", "execute_after_dh_installsystemd"],
                    ["dh_installdeb", "-ppolicyd-ipv6"]):
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
    scripts = tmp_path / "debian/policyd-ipv6/DEBIAN"
    snippets = {name: (scripts / name).read_text() if (scripts / name).exists() else ""
                for name in ("preinst", "postinst", "prerm")}
    invokes = [line.split() for line in snippets["postinst"].splitlines()
               if "deb-systemd-invoke" in line]
    assert ["deb-systemd-invoke", "$_dh_action", "'policyd-ipv6.service'",
            "'policyd-ipv6.socket'"] in [call[:4] for call in invokes]
    milter = [call for call in invokes if "'%s'" % MILTER_SOCKET in call]
    assert [call[:3] for call in milter] == [["deb-systemd-invoke", "start",
                                              "'%s'" % MILTER_SOCKET]]
    assert MILTER_SOCKET not in snippets["preinst"]
    (stop,) = [line for line in snippets["prerm"].splitlines() if MILTER_SOCKET in line]
    assert "deb-systemd-invoke stop" in stop
