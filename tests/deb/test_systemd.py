"""The package on Debian 13 ("trixie") and Debian 12 ("bookworm") under a real systemd.

For each release: the package is built in a clean root of that release (its unit tests run
during the build) and linted by that release's lintian; then a minbase + systemd root of the
same release, holding only what the package declares, is booted with systemd-nspawn as PID 1
(../shared/LAB.md) and the package installed there: the unit starts, reloads (no /bin/kill on
such a system), restarts, stops, is sandboxed (systemd-analyze security, a denied write), the
autopkgtest scripts pass, purge leaves only the system user; an upgrade from the previous
version keeps the administrator's opt-in table edit without a prompt, and one of its unedited
configuration warns a Postfix still wired to its TCP port; upgrades leave the milter socket
active with no failed job; and the autopkgtest tool itself (null virt server inside the
container) passes debian/tests against the built package.

The tests of one release run in file order against one booted container (module fixture).
Run them under the lab lock: `flock /tmp/e2e.lock pytest -m deb tests/deb/test_systemd.py`
(the pristine roots are made once per run, see containers.py).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from . import containers, rootbuild
from .debbuild import REPO, require

pytestmark = pytest.mark.deb

RELEASES = ("trixie", "bookworm")
SYSTEMD = {"trixie": 257, "bookworm": 252}
UNIT = "policyd-ipv6.service"
MILTER_SOCKET = "policyd-ipv6-milter.socket"
STATE = "/var/lib/policyd-ipv6"
ETC = "/etc/policyd-ipv6"
TABLE = ETC + "/optin-domains"
CONFIG = ETC + "/policyd-ipv6.toml"
RELOADED = "configuration reloaded (SIGHUP)"


class Lab:
    """One release: its build, and its booted container with the debs copied in."""

    def __init__(self, build: rootbuild.RootBuild, ct: containers.Booted):
        self.build, self.ct = build, ct

    def sh(self, script: str, check: bool = True, timeout: float = 120):
        return self.ct.run(["sh", "-c", script], check=check, timeout=timeout)

    def main_pid(self) -> int:
        return int(self.sh("systemctl show -P MainPID " + UNIT).stdout.strip())

    def journal(self) -> str:
        return self.sh("journalctl -q -o cat -u " + UNIT).stdout

    def wait_journal(self, text: str, count: int, seconds: float = 15) -> None:
        for _ in range(int(seconds * 5)):
            if self.journal().count(text) >= count:
                return
            self.sh("sleep 0.2")
        raise AssertionError("%r not logged %d times:\n%s" % (text, count, self.journal()))

    def active(self, unit: str = UNIT) -> str:
        return self.sh("systemctl is-active " + unit, check=False).stdout.strip()

    def settled(self, unit: str = UNIT) -> str:
        """The unit's state once it is no longer activating (bounded: a unit restarting after
        a failure stays "activating")."""
        for _ in range(50):
            if self.active(unit) != "activating":
                break
            self.sh("sleep 0.2")
        return self.active(unit)


@pytest.fixture(scope="module", params=RELEASES)
def lab(request):
    """The release's root build, then its booted minimal root with both debs in /root/debs."""
    if os.geteuid() != 0:
        require("booting containers needs root (uid %d)" % os.geteuid())
    missing = containers.missing_tools()
    require("missing tools: %s" % ", ".join(missing) if missing else None)
    release = request.param
    work = Path(tempfile.mkdtemp(prefix="p6d-ct-%s-" % release))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    build = rootbuild.build_in_root(release, work)
    with containers.Overlay(containers.pristine(release), work / "boot-root") as overlay:
        for deb in (build.deb, build.previous_deb):
            into = overlay.root / "root/debs" / deb.parent.name
            into.mkdir(parents=True)
            shutil.copy(deb, into / deb.name)
        shutil.copytree(REPO / "debian/tests", overlay.root / "root/autopkgtest")
        shutil.copytree(REPO / "debian", overlay.root / "root/src/debian")
        # Fetch the dependencies (postfix among them) with the host's network; the booted
        # container has none. Postfix's debconf question is answered beforehand, as an
        # administrator's preseed would: installed after boot, it writes no main.cf.
        containers.offline_prepare(overlay.root, (
            "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; "
            "echo 'postfix postfix/main_mailer_type select No configuration' "
            "| debconf-set-selections; "
            "apt-get install -y -qq --download-only --no-install-recommends /root/debs/new/%s; "
            "apt-get install -y -qq --download-only --no-install-recommends autopkgtest "
            "dpkg-dev"
            % build.deb.name), timeout=900)
        with containers.Booted(overlay.root, "p6d-" + release,
                               work / "console.log") as ct:
            yield Lab(build, ct)


def test_root_build_is_lintian_clean(lab):
    """The release's own lintian finds no error and no warning in the package built there."""
    print(lab.build.lintian_output)
    tags = [line for line in lab.build.lintian_output.splitlines() if re.match(r"^[EW]: ", line)]
    assert lab.build.lintian_status == 0 and tags == [], lab.build.lintian_output


def test_container_is_the_release_with_no_kill_binary(lab):
    """The booted root runs that release's systemd, and has no kill program (procps absent)."""
    version = lab.sh("systemctl --version").stdout.split()[1]
    assert int(version) == SYSTEMD[lab.build.release]
    assert not lab.sh("test -e /bin/kill || test -e /usr/bin/kill", check=False).returncode == 0


def test_install_starts_the_unit(lab):
    """apt-get install of the .deb, offline, brings postfix (a Depends), creates the user and
    starts the unit with the packaged configuration: the daemon says it is ready and is still
    running a second later."""
    lab.sh("apt-get install -y --no-install-recommends /root/debs/new/%s"
           % lab.build.deb.name, timeout=300)
    assert lab.sh("getent passwd postfix", check=False).returncode == 0
    lab.wait_journal(" ready: ", 1)
    pid = lab.main_pid()
    lab.sh("sleep 1")
    assert lab.active() == "active" and lab.main_pid() == pid, lab.journal()
    assert lab.sh("getent passwd _policyd-ipv6").stdout.split(":")[5] == "/nonexistent"


def test_reload_rereads_the_configuration(lab):
    """systemctl reload succeeds and the daemon logs a configuration reload; same main PID."""
    pid = lab.main_pid()
    before = lab.journal().count(RELOADED)
    lab.sh("systemctl reload " + UNIT)
    lab.wait_journal(RELOADED, before + 1)
    assert lab.main_pid() == pid and lab.active() == "active"


def test_restart_gives_a_new_main_process(lab):
    """systemctl restart replaces the main process and the unit is active again."""
    pid = lab.main_pid()
    lab.sh("systemctl restart " + UNIT)
    assert lab.active() == "active" and lab.main_pid() not in (0, pid)


def test_sandbox_exposure_is_at_most_2(lab):
    """systemd-analyze security rates the running unit's exposure 2.0 or lower."""
    out = lab.sh("systemd-analyze security --no-pager " + UNIT).stdout
    match = re.search(r"Overall exposure level for %s: ([\d.]+)" % re.escape(UNIT), out)
    assert match and float(match.group(1)) <= 2.0, out


def test_sandbox_denies_writing_the_configuration(lab):
    """Inside the running unit's mount namespace, as its user, /etc is read-only; the process
    has no capabilities, no new privileges and a seccomp filter."""
    pid = lab.main_pid()
    status = lab.sh("cat /proc/%d/status" % pid).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    probe = lab.sh("nsenter -t %d -m -S $(stat -c %%u /proc/%d) -G $(stat -c %%g /proc/%d) "
                   "sh -c 'echo x > %s/probe'" % (pid, pid, pid, ETC), check=False)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe
    writable = lab.sh("nsenter -t %d -m sh -c 'echo x > %s/probe && rm %s/probe'"
                      % (pid, "/tmp", "/tmp"), check=False)
    assert writable.returncode == 0, "the probe itself must be able to succeed: %s" % writable


def test_autopkgtest_scripts_pass_on_the_installed_package(lab):
    """debian/tests/policy-requests and packaged-service pass against the installed package."""
    for name in ("policy-requests", "packaged-service"):
        result = lab.sh("cd /root && /root/autopkgtest/%s" % name, check=False, timeout=180)
        assert result.returncode == 0, "%s:\n%s%s" % (name, result.stdout, result.stderr)


def test_stop_leaves_the_unit_inactive(lab):
    """systemctl stop ends the daemon: the unit is inactive, not failed."""
    lab.sh("systemctl stop " + UNIT)
    assert lab.active() == "inactive"


def test_purge_removes_everything_but_the_user(lab):
    """apt-get purge removes the unit, the program, /etc/policyd-ipv6 and the unit's state
    directory with an opt-in table's last-good copy and a temporary file of its write in it;
    the user stays."""
    # systemd made the StateDirectory= at start; the copies are what optin_postgresql writes.
    lab.sh(f"test -d {STATE} && echo customer.example > {STATE}/optin-domains.last-good "
           f"&& echo customer.exa > {STATE}/.optin-domains.a1b2c3")
    lab.sh("apt-get purge -y policyd-ipv6", timeout=300)
    left = lab.sh("ls -d /etc/policyd-ipv6 /usr/bin/policyd-ipv6 /usr/share/policyd-ipv6 "
                  "/lib/systemd/system/%s /usr/lib/systemd/system/%s %s 2>/dev/null; true"
                  % (UNIT, UNIT, STATE)).stdout.split()
    assert left == []
    assert lab.sh("systemctl cat " + UNIT, check=False).returncode != 0
    assert lab.sh("getent passwd _policyd-ipv6", check=False).returncode == 0


def test_upgrade_keeps_the_optin_table_edit_without_a_prompt(lab):
    """From the previous version with an edited opt-in table and configuration, a
    non-interactive upgrade asks nothing about the table, keeps both edits, and the unit runs
    (and reloads) on the new version; the table is no longer a live conffile."""
    lab.sh("apt-get install -y --no-install-recommends /root/debs/old/%s"
           % lab.build.previous_deb.name, timeout=300)
    lab.sh("echo edited.example >> %s && echo '# edited by the administrator' >> %s"
           % (TABLE, CONFIG))
    upgrade = lab.sh("apt-get install -y --no-install-recommends "
                     "-o Dpkg::Options::=--force-confold /root/debs/new/%s < /dev/null"
                     % lab.build.deb.name, timeout=300)
    assert "optin-domains" not in upgrade.stdout + upgrade.stderr, upgrade.stdout
    assert failed_jobs(upgrade) == [], upgrade.stderr
    # The kept configuration still listens on 127.0.0.1:10045 (and no main.cf names it).
    assert "WARNING" not in upgrade.stdout + upgrade.stderr, upgrade.stdout
    assert "edited.example" in lab.sh("cat " + TABLE).stdout
    assert "# edited by the administrator" in lab.sh("cat " + CONFIG).stdout
    conffiles = lab.sh("dpkg-query -W -f '${Conffiles}' policyd-ipv6").stdout
    live = [line.split()[0] for line in conffiles.strip().splitlines()
            if not line.strip().endswith("obsolete")]
    assert live == [CONFIG], conffiles
    assert lab.settled() == "active", lab.journal()[-4000:]
    assert lab.active(MILTER_SOCKET) == "active"
    before = lab.journal().count(RELOADED)
    lab.sh("systemctl reload " + UNIT)
    lab.wait_journal(RELOADED, before + 1)


def failed_jobs(result) -> list[str]:
    """The lines of apt's output saying a start or restart the postinst asked for failed:
    systemctl's "Job for UNIT failed", deb-systemd-invoke's "Could not execute systemctl"."""
    return re.findall(r"^.*(?:Job for \S+ failed|Could not execute systemctl).*$",
                      result.stdout + result.stderr, re.M)


def test_upgrade_of_the_unedited_configuration_warns_a_postfix_wired_to_tcp(lab):
    """From the previous version with its configuration unedited and Postfix wired as its
    README.Debian said (inet:127.0.0.1:10045), the upgrade replaces the configuration without
    a prompt, warns with the new wiring, and leaves the unit and the milter socket active; a
    later reinstall restarts them with no failed job and no warning."""
    lab.sh("dpkg --purge policyd-ipv6", timeout=300)
    had_main_cf = lab.sh("test -e /etc/postfix/main.cf", check=False).returncode == 0
    lab.sh("test -e /etc/postfix/main.cf && cp /etc/postfix/main.cf /root/main.cf.saved; "
           "printf 'smtpd_recipient_restrictions = reject_unauth_destination,\n"
           "    check_policy_service { inet:127.0.0.1:10045, timeout=30s }\n' "
           ">> /etc/postfix/main.cf")
    try:
        lab.sh("apt-get install -y --no-install-recommends /root/debs/old/%s"
               % lab.build.previous_deb.name, timeout=300)
        upgrade = lab.sh("apt-get install -y --no-install-recommends /root/debs/new/%s "
                         "< /dev/null" % lab.build.deb.name, timeout=300)
        # apt-get passes on what dpkg's maintainer scripts print, stderr too, on its stdout.
        said = upgrade.stdout + upgrade.stderr
        assert "WARNING" in said and "inet:127.0.0.1:10045" in said, said
        assert "check_policy_service { unix:policyd-ipv6/policy, timeout=30s }" in said
        assert "10045" not in lab.sh("grep -v '^#' %s" % CONFIG).stdout
        assert failed_jobs(upgrade) == [], upgrade.stderr
        assert lab.settled() == "active", lab.journal()[-4000:]
        assert lab.active(MILTER_SOCKET) == "active"
        again = lab.sh("apt-get install -y --reinstall --no-install-recommends "
                       "/root/debs/new/%s < /dev/null" % lab.build.deb.name, timeout=300)
        assert failed_jobs(again) == [], again.stdout + again.stderr
        assert "WARNING" not in again.stdout + again.stderr, again.stdout
        assert lab.settled() == "active", lab.journal()[-4000:]
        assert lab.active(MILTER_SOCKET) == "active"
    finally:
        lab.sh("mv /root/main.cf.saved /etc/postfix/main.cf" if had_main_cf
               else "rm -f /etc/postfix/main.cf")


def test_autopkgtest_tool_passes_against_the_built_package(lab):
    """The real autopkgtest, run inside the booted container against the built .deb and the
    source's debian/tests (null virt server: the container is the testbed), passes both tests.
    Last in the file: installing autopkgtest brings procps (/bin/kill) into the root.
    isolation-container is ignored because null cannot declare it; the testbed is one."""
    lab.sh("dpkg --purge policyd-ipv6", timeout=300)  # autopkgtest installs it anew
    # autopkgtest reads the source tree with dpkg-dev's tools (downloaded before boot).
    lab.sh("apt-get install -y -qq --no-install-recommends autopkgtest dpkg-dev", timeout=300)
    result = lab.sh("autopkgtest --ignore-restrictions=isolation-container "
                    "/root/debs/new/%s /root/src/ -- null" % lab.build.deb.name,
                    check=False, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    for name in ("policy-requests", "packaged-service"):
        assert re.search(r"^%s\s+PASS" % name, out, re.M), out[-6000:]
