"""The daemon's life under a real systemd (Debian 13 and 12): Type=notify readiness, reload,
the watchdog, socket activation and a restart under load that loses nothing, a graceful stop.

For each release a minbase + systemd root (containers.py) gets Postfix (for its user and
group, which the packaged sockets and milter_peer_users name) and the package built from this
tree, is booted with systemd-nspawn, and the package is installed there with the packaged
configuration (policy and milter on Unix sockets that policyd-ipv6.socket and
policyd-ipv6-milter.socket hold). The tests of one release run in file order against one
container. Run them under the lab lock:
`flock /tmp/e2e.lock pytest -m deb tests/deb/test_systemd_lifecycle.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from . import containers
from .debbuild import require

pytestmark = pytest.mark.deb

RELEASES = ("trixie", "bookworm")
UNIT = "policyd-ipv6.service"
SOCKETS = ("policyd-ipv6.socket", "policyd-ipv6-milter.socket")
POLICY = "/var/spool/postfix/policyd-ipv6/policy"

# Runs inside the container as root (a milter_peer_users member): WORKERS connections in a
# row each, one request per connection as a fresh smtpd would, until /root/load.stop exists
# or LIMIT requests; counts replies, closes without a reply and refused connections.
LOAD = r"""
import json, os, socket, sys, threading, time
REQ = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
       b"client_name=unknown\nreverse_client_name=unknown\nsender=a@example.net\n"
       b"recipient=b@example.com\ninstance=x\n\n")
LIMIT, WORKERS = 20000, 4
counts = {"answered": 0, "unanswered": 0, "errors": []}
lock = threading.Lock()
def one():
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sys.argv[1])
        s.sendall(REQ)
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(4096)
            if not chunk:
                return None
            data += chunk
        return data.decode()
def worker():
    for _ in range(LIMIT // WORKERS):
        if os.path.exists("/root/load.stop"):
            return
        try:
            reply = one()
        except OSError as error:
            with lock:
                counts["errors"].append(repr(error))
            continue
        with lock:
            counts["answered" if reply == "action=DUNNO\n\n" else "unanswered"] += 1
if sys.argv[2:] == ["once"]:
    print(one().strip())
    sys.exit(0)
threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
for t in threads: t.start()
while any(t.is_alive() for t in threads):
    time.sleep(0.1)
    with lock:
        open("/root/load.progress", "w").write(str(counts["answered"]))
for t in threads: t.join()
counts["errors"] = counts["errors"][:20] + [len(counts["errors"])]
json.dump(counts, open("/root/load.json", "w"))
"""


class Container:
    def __init__(self, ct: containers.Booted, release: str):
        self.ct, self.release = ct, release

    def sh(self, script: str, check: bool = True, timeout: float = 120):
        try:
            return self.ct.run(["sh", "-c", script], check=check, timeout=timeout)
        except containers.ContainerError as error:
            log = self.ct.run(["sh", "-c", "journalctl -q -b --no-pager -n 60 -o short-monotonic"
                               " -u policyd-ipv6.service -u 'policyd-ipv6*.socket'"],
                              check=False)
            raise AssertionError("%s\n--- journal:\n%s" % (error, log.stdout)) from None

    def show(self, prop: str, unit: str = UNIT) -> str:
        return self.sh(f"systemctl show -P {prop} {unit}").stdout.strip()

    def main_pid(self) -> int:
        return int(self.show("MainPID"))

    def journal(self, *args: str) -> str:
        return self.sh("journalctl -q -o cat -u %s %s" % (UNIT, " ".join(args))).stdout

    def wait(self, condition, seconds: float, what: str) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError("%s: not within %s s\n%s" % (what, seconds, self.journal()[-3000:]))


@pytest.fixture(scope="module", params=RELEASES)
def ct(request, package):
    """A booted root of the release with Postfix and the package installed."""
    if os.geteuid() != 0:
        require("booting containers needs root (uid %d)" % os.geteuid())
    missing = containers.missing_tools()
    require("missing tools: %s" % ", ".join(missing) if missing else None)
    release = request.param
    work = Path(tempfile.mkdtemp(prefix="p6d-life-%s-" % release))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    deb = package.build.deb
    with containers.Overlay(containers.pristine(release), work / "boot-root") as overlay:
        (overlay.root / "root/debs").mkdir(parents=True)
        shutil.copy(deb, overlay.root / "root/debs" / deb.name)
        (overlay.root / "root/load.py").write_text(LOAD)
        # Postfix installed before boot (no daemon started: no init); the package's own
        # dependencies only downloaded, installed under the booted systemd.
        containers.offline_prepare(overlay.root, (
            "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; "
            "echo 'postfix postfix/main_mailer_type select No configuration' "
            "| debconf-set-selections; "
            "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d; "
            "chmod +x /usr/sbin/policy-rc.d; "
            "apt-get install -y -qq --no-install-recommends postfix; "
            "rm /usr/sbin/policy-rc.d; "
            "apt-get install -y -qq --download-only --no-install-recommends /root/debs/%s"
            % deb.name), timeout=900)
        with containers.Booted(overlay.root, "p6d-life-" + release,
                               work / "console.log") as booted:
            box = Container(booted, release)
            box.sh("apt-get install -y -qq --no-install-recommends /root/debs/%s" % deb.name,
                   timeout=300)
            yield box


def test_start_is_active_only_once_ready(ct):
    """systemctl start returns with the unit active and systemd already holding READY=1's
    STATUS=, the sockets handed over (socket activation) and a policy request answered."""
    ct.sh("systemctl stop " + UNIT)
    assert ct.show("ActiveState") == "inactive"
    ct.sh("systemctl start " + UNIT)
    assert ct.show("Type") == "notify" and ct.show("ActiveState") == "active"
    assert ct.show("StatusText").startswith("serving on 2 listener(s)")
    for socket_unit in SOCKETS:
        assert ct.show("ActiveState", socket_unit) == "active"
    assert "socket activation, policy" in ct.journal("_PID=%d" % ct.main_pid())
    assert "socket activation, milter" in ct.journal("_PID=%d" % ct.main_pid())
    assert ct.sh("stat -c '%%a %%U %%G' %s" % POLICY).stdout.split() == \
        ["660", "_policyd-ipv6", "postfix"]
    reply = ct.sh("python3 /root/load.py %s once" % POLICY).stdout
    assert reply.strip() == "action=DUNNO", reply


def test_reload_is_reloading_then_ready_again(ct):
    """systemctl reload re-reads the configuration in the same process and ends active."""
    pid = ct.main_pid()
    before = ct.journal().count("configuration reloaded (SIGHUP)")
    ct.sh("systemctl reload " + UNIT)
    ct.wait(lambda: ct.journal().count("configuration reloaded (SIGHUP)") > before, 15,
            "reload logged")
    assert ct.main_pid() == pid and ct.show("ActiveState") == "active"


def test_journal_priorities(ct):
    """The journal stores each line's priority: a bad edit fails `systemctl reload` (the
    unit's ExecReload checks the file first) with the error at priority err, the daemon keeps
    running unsignalled; the ready line is info only (in -p info, not in -p warning)."""
    config = "/etc/policyd-ipv6/policyd-ipv6.toml"
    ct.sh("cp %s /root/config.keep && echo 'no_such_key = 1' >> %s" % (config, config))
    try:
        refused = ct.sh("systemctl reload %s; echo status=$?" % UNIT)
        assert "status=0" not in refused.stdout, refused.stdout
        ct.wait(lambda: "reload: configuration error" in ct.journal("-p err"), 15,
                "the refused reload logged as an error")
    finally:
        ct.sh("cp /root/config.keep %s" % config)
    assert "no_such_key" in ct.journal("-p err")
    assert " ready: " in ct.journal("-p info")
    warnings = ct.journal("-p warning")
    assert " ready: " not in warnings and "reload: configuration error" in warnings
    assert ct.show("ActiveState") == "active"


def test_restart_under_load_answers_every_request(ct):
    """Requests sent continuously over the policy socket while the service restarts are all
    answered: none refused, none closed without a reply."""
    ct.sh("rm -f /root/load.stop /root/load.json /root/load.progress")
    ct.sh("python3 /root/load.py %s > /root/load.log 2>&1 &" % POLICY)

    def answered() -> int:
        text = ct.sh("cat /root/load.progress 2>/dev/null || echo 0").stdout.strip()
        return int(text or 0)
    ct.wait(lambda: answered() >= 100, 30, "load running")
    pid = ct.main_pid()
    ct.sh("systemctl restart " + UNIT)
    assert ct.main_pid() not in (0, pid)
    at_restart = answered()
    ct.wait(lambda: answered() >= at_restart + 200, 30, "answers after the restart")
    ct.sh("touch /root/load.stop")
    ct.wait(lambda: ct.sh("test -e /root/load.json", check=False).returncode == 0, 60,
            "load finished")
    counts = json.loads(ct.sh("cat /root/load.json").stdout)
    assert counts["unanswered"] == 0 and counts["errors"] == [0], counts
    assert counts["answered"] >= at_restart + 200, counts


def test_watchdog_restarts_a_frozen_reactor(ct):
    """With WatchdogSec=3s (a drop-in), a daemon frozen with SIGSTOP is killed by systemd for
    its missing WATCHDOG=1 and restarted (Restart=on-failure)."""
    assert ct.show("WatchdogUSec") == "30s"
    ct.sh("mkdir -p /run/systemd/system/%s.d && printf '[Service]\\nWatchdogSec=3s\\n"
          "RestartSec=1s\\n' > /run/systemd/system/%s.d/watchdog.conf && systemctl "
          "daemon-reload && systemctl restart %s" % (UNIT, UNIT, UNIT))
    try:
        pid = ct.main_pid()
        ct.sh("sleep 4")  # pings keep it alive beyond WatchdogSec
        assert ct.main_pid() == pid and ct.show("ActiveState") == "active"
        ct.sh("systemctl kill --kill-whom=main -s STOP " + UNIT)
        ct.wait(lambda: ct.main_pid() not in (0, pid) and ct.show("ActiveState") == "active",
                30, "restarted after the watchdog")
        assert "atchdog timeout" in ct.journal(), ct.journal()[-2000:]
    finally:
        ct.sh("rm -rf /run/systemd/system/%s.d && systemctl daemon-reload && "
              "systemctl restart %s" % (UNIT, UNIT))


def test_stop_is_graceful_and_clean(ct):
    """systemctl stop ends the daemon with a clean exit (not failed), the sockets stay with
    systemd (the next start finds its connections queued there)."""
    pid = ct.main_pid()
    ct.sh("systemctl stop " + UNIT)
    assert ct.show("ActiveState") == "inactive" and ct.show("Result") == "success"
    assert "policyd-ipv6 stopped" in ct.journal("_PID=%d" % pid)
    assert ct.show("ActiveState", SOCKETS[0]) == "active"
    ct.sh("test -S " + POLICY)
