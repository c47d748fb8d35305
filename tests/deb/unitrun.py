"""Run the installed daemon the way its systemd unit does, on a machine where systemd is not PID 1.

Contract:
- `Unit.read(path)` parses a unit file's [Service] section: `exec_start` and `exec_reload`
  (argv lists), `user`, `group`, `umask`, and every setting as `settings[key] -> [values]`.
- `sandbox_argv(unit, command, read_write_paths)` wraps `command` so that it runs as the unit's
  User= and Group= (with that user's groups, as systemd's initgroups), with no_new_privs
  (NoNewPrivileges=), an empty capability bounding set (CapabilityBoundingSet=), the unit's
  UMask= and a clean environment, in a private mount namespace where the whole file system is
  read-only (ProtectSystem=strict) except `read_write_paths` (ReadWritePaths=), /tmp and
  /var/tmp are empty private tmpfs (PrivateTmp=) and /home, /root, /run/user are empty
  (ProtectHome=); and, last, under the unit's SystemCallFilter=, RestrictAddressFamilies= and
  MemoryDenyWriteExecute= (unitfilter.py). Every step execs the next, so the process's PID is
  the daemon's own. Not reproduced (systemd-analyze verify and security check them in the unit
  file): PrivateDevices=, PrivateIPC=, the Protect{Kernel*,Clock,Hostname,ControlGroups,Proc}=
  settings and RestrictNamespaces=. Paths the daemon needs must not lie below /tmp or /var/tmp.
- `InstalledDaemon(unit, log_path, netns, config_path, read_write_paths)` is the lab's
  `PolicyDaemon` (same start, readiness, stop and log parsing) running the unit's ExecStart in
  that sandbox - with `config_path` in place of the unit's --config when given.
  `reload()` runs the unit's ExecReload= with $MAINPID replaced, as `systemctl reload` does.
- `credentials(pid)` reads uid, gid, groups, NoNewPrivs and the capability sets from /proc;
  `mount_options(pid)` the mounts the process sees; `command_line(pid)` its argv.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lab.policyd import PolicyDaemon

from .unitfilter import filter_argv

UNIT_PATH = Path("/lib/systemd/system/policyd-ipv6.service")
# systemd's default PATH for system services (systemd.exec(5), "Environment variables").
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The mount-namespace part of the sandbox; the command comes as "$@" (see sandbox_argv).
# The writable paths become mounts of their own first: a bind mount copies the flags of the
# mount it is made from, so one made after / turned read-only would be read-only too.
_MOUNTS = """set -e
for dir in %(rw)s; do mount --bind "$dir" "$dir"; done
mount -o remount,bind,ro /
for dir in /tmp /var/tmp; do mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$dir"; done
for dir in /home /root /run/user; do
    if [ -d "$dir" ]; then mount -t tmpfs -o ro,mode=755 tmpfs "$dir"; fi
done
umask %(umask)s
exec "$@"
"""


@dataclass
class Unit:
    settings: dict[str, list[str]]

    @classmethod
    def read(cls, path: Path = UNIT_PATH) -> Unit:
        """The [Service] settings of a unit file (systemd.syntax(7): repeated keys add up)."""
        settings: dict[str, list[str]] = {}
        section = None
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section == "Service" and "=" in line:
                if line.endswith("\\"):
                    raise ValueError("continuation lines are not supported: %r" % line)
                key, _, value = line.partition("=")
                settings.setdefault(key.strip(), []).append(value.strip())
        return cls(settings)

    def one(self, key: str, default: str | None = None) -> str:
        """The value in force for a single-valued key (the last assignment wins)."""
        values = self.settings.get(key, [])
        if not values or values[-1] == "":
            if default is None:
                raise KeyError("the unit has no %s=" % key)
            return default
        return values[-1]

    @property
    def exec_start(self) -> list[str]:
        return shlex.split(self.one("ExecStart"))

    @property
    def exec_reload(self) -> list[str]:
        return shlex.split(self.one("ExecReload"))

    user = property(lambda self: self.one("User"))
    group = property(lambda self: self.one("Group", self.one("User")))
    umask = property(lambda self: self.one("UMask", "0022"))


def sandbox_argv(unit: Unit, command: list[str], read_write_paths=(),
                 mdwe: str = "prctl") -> list[str]:
    """`command` wrapped as described in the module docstring (`mdwe`: see filter_argv)."""
    script = _MOUNTS % {"rw": " ".join(shlex.quote(str(p)) for p in read_write_paths) or "",
                        "umask": shlex.quote(unit.umask)}
    identity = ["setpriv", "--reuid=" + unit.user, "--regid=" + unit.group, "--init-groups",
                "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--"]
    environment = ["env", "-i", "PATH=" + SERVICE_PATH, "LANG=C.UTF-8",
                   "USER=" + unit.user, "LOGNAME=" + unit.user, "HOME=/nonexistent"]
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", script, "sandbox", *identity, *environment,
            *filter_argv(unit, command, mdwe)]


class InstalledDaemon(PolicyDaemon):
    """The installed daemon, started as its unit starts it (see the module docstring)."""

    def __init__(self, unit: Unit, log_path: Path, netns=None, config_path: Path | None = None,
                 read_write_paths=()):
        command = unit.exec_start
        if "--config" not in command:
            raise ValueError("the unit's ExecStart has no --config: %s" % command)
        at = command.index("--config") + 1
        if config_path is not None:
            command = command[:at] + [str(config_path)] + command[at + 1:]
        super().__init__(Path(command[at]), log_path, netns)
        self.unit, self.command, self.read_write_paths = unit, command, read_write_paths

    def argv(self) -> list[str]:
        return sandbox_argv(self.unit, self.command, self.read_write_paths)

    def reload(self) -> None:
        """The unit's ExecReload= for this process (`systemctl reload`)."""
        argv = [str(self.process.pid) if word == "$MAINPID" else word
                for word in self.unit.exec_reload]
        subprocess.run(argv, check=True)


def credentials(pid: int) -> dict[str, str]:
    """Uid, Gid, Groups, NoNewPrivs, the capability sets and the seccomp mode of `pid`."""
    wanted = ("Uid", "Gid", "Groups", "NoNewPrivs", "CapEff", "CapPrm", "CapBnd", "Seccomp",
              "Seccomp_filters")
    fields = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            fields[key] = value.strip()
    return fields


def mount_options(pid: int) -> dict[str, tuple[str, str]]:
    """Mount point -> (per-mount options, file system type) as process `pid` sees them."""
    mounts = {}
    for line in Path("/proc/%d/mountinfo" % pid).read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        mounts[fields[4]] = (fields[5], fstype)  # a later mount on the same point wins
    return mounts


def command_line(pid: int) -> list[str]:
    """The argv of process `pid`."""
    raw = Path("/proc/%d/cmdline" % pid).read_bytes()
    return raw.decode().split("\0")[:-1]
