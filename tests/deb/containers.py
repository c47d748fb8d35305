"""Minimal Debian 13 / 12 roots, booted with systemd-nspawn, for the package tests under systemd.

Contract (root only; the facts are ../shared/LAB.md's, "systemd for real"):
- `pristine(release)` returns a minbase root of `release` ("trixie", "bookworm") with only
  systemd, systemd-sysv and dbus added, made with debootstrap once per test run and cached
  under CACHE (POLICYD_IPV6_TESTS_CACHE, default /var/cache/policyd-ipv6-tests). A root is
  reused when its stamp names the current run (POLICYD_IPV6_TESTS_RUN, which tests/run sets)
  or, with no run named, whenever it is complete. It is never changed afterwards.
- `Overlay(lower, work)` mounts a writable overlay of a pristine root (a context manager);
  `offline_prepare(root, argv)` runs a shell command in it with the host's network and no
  init (`--as-pid2`), e.g. apt-get with --download-only, before boot.
- `Booted(root, name)` boots the root with systemd as PID 1, loopback-only network, from a
  cgroup of its own in each hierarchy the host mounts (v1 name=systemd and the v2 unified
  one; SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 gives the guest a v2 tree as on a Debian server);
  `run(argv)` runs a command inside (nsenter into the container's systemd), `poweroff()`
  and the context exit stop it, kill nspawn by its own PID if it hangs, and remove the
  cgroups. Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("POLICYD_IPV6_TESTS_CACHE", "/var/cache/policyd-ipv6-tests"))
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "systemd,systemd-sysv,dbus"
PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))


class ContainerError(RuntimeError):
    """A root could not be made, prepared, booted or entered; the message says which."""


def missing_tools() -> list[str]:
    """'tool (package)' for each tool these containers need that is not installed."""
    tools = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container",
             "nsenter": "util-linux"}
    return ["%s (%s)" % (tool, pkg) for tool, pkg in tools.items()
            if shutil.which(tool, path=PATH[5:]) is None]


def _run(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": PATH[5:], "LANG": "C.UTF-8"}, **kwargs)


def pristine(release: str) -> Path:
    """The cached minbase + systemd root of `release` (see the module docstring)."""
    root = CACHE / release
    stamp = CACHE / (release + ".complete")
    run_id = os.environ.get("POLICYD_IPV6_TESTS_RUN", "")
    if stamp.exists() and (not run_id or stamp.read_text() == run_id):
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    making = CACHE / (release + ".tmp")
    for old in (making, root):
        if old.exists():
            shutil.rmtree(old)
    result = _run(["debootstrap", "--variant=minbase", "--include=" + BASE_PACKAGES, release,
                   str(making), MIRROR], timeout=900)
    if result.returncode != 0:
        raise ContainerError("debootstrap %s failed:\n%s" % (release, result.stdout[-3000:]
                                                              + result.stderr[-3000:]))
    making.rename(root)
    stamp.write_text(run_id)
    return root


class Overlay:
    """A writable overlay of `lower` at `work`/root, mounted while the context is open."""

    def __init__(self, lower: Path, work: Path):
        self.lower, self.work = lower, work
        self.root = work / "root"

    def __enter__(self) -> Overlay:
        for name in ("upper", "work", "root"):
            (self.work / name).mkdir(parents=True, exist_ok=True)
        options = "lowerdir=%s,upperdir=%s,workdir=%s" % (self.lower, self.work / "upper",
                                                          self.work / "work")
        result = _run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
                      timeout=30)
        if result.returncode != 0:
            raise ContainerError("overlay mount failed: " + result.stderr)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf", follow_symlinks=True)
        return self

    def __exit__(self, *exc) -> None:
        _run(["umount", "-l", str(self.root)], timeout=30)


def offline_prepare(root: Path, script: str, timeout: float = 600) -> str:
    """`script` (sh) in `root` with the host's network and no init; its output, or raise."""
    result = _run(["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--as-pid2",
                   "--pipe", "-D", str(root), "sh", "-ec", script], timeout=timeout,
                  stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ContainerError("in %s: %s\n-> exit %d\n%s%s" % (root, script, result.returncode,
                                                               result.stdout[-4000:],
                                                               result.stderr[-4000:]))
    return result.stdout + result.stderr


class Booted:
    """`root` booted with systemd as PID 1 (see the module docstring)."""

    def __init__(self, root: Path, name: str, console: Path):
        self.root, self.name, self.console = root, name, console
        self.cgroups = [h / ("p6d-" + name) for h in CGROUP_HIERARCHIES if h.is_dir()]
        self.process: subprocess.Popen | None = None
        self.init_pid: int | None = None

    def __enter__(self) -> Booted:
        for cgroup in self.cgroups:
            cgroup.mkdir(exist_ok=True)
        cgroups = self.cgroups

        def own_cgroup() -> None:  # in the child, before exec: nspawn starts from fresh cgroups
            for cgroup in cgroups:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        env = {"PATH": PATH[5:], "LANG": "C.UTF-8", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(self.console, "w") as console:
            self.process = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(self.root),
                 "-M", self.name, "-b", "--private-network"], stdin=subprocess.DEVNULL,
                stdout=console, stderr=subprocess.STDOUT, env=env, preexec_fn=own_cgroup)
        try:
            self._wait_running()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_running(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise ContainerError("nspawn exited %d:\n%s" % (self.process.returncode,
                                                                self.console.read_text()))
            if self.init_pid is None:
                found = _run(["pgrep", "-P", str(self.process.pid), "-x", "systemd"], 10)
                if found.stdout.split():
                    self.init_pid = int(found.stdout.split()[0])
            if self.init_pid is not None:
                state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise ContainerError("%s not running after %d s:\n%s" % (self.name, timeout,
                                                                 self.console.read_text()))

    def run(self, argv: list[str], check: bool = True, timeout: float = 120,
            **kwargs) -> subprocess.CompletedProcess:
        """`argv` inside the booted container, as root with a clean environment."""
        result = _run(["nsenter", "-t", str(self.init_pid), "-a", "env", "-i", PATH,
                       "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", *argv],
                      timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise ContainerError("in %s: %s -> exit %d\n%s%s" % (
                self.name, " ".join(argv), result.returncode, result.stdout, result.stderr))
        return result

    def poweroff(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if self.init_pid is not None:
            self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=30)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()  # nspawn itself, by its PID; its PID namespace goes with it
            self.process.wait(timeout=30)

    def __exit__(self, *exc) -> None:
        self.poweroff()
        for cgroup in self.cgroups:
            end = time.monotonic() + 10
            while cgroup.exists() and time.monotonic() < end:
                for child in sorted(cgroup.glob("**/"), key=lambda p: -len(p.parts)):
                    if child != cgroup:
                        try:
                            child.rmdir()
                        except OSError:
                            pass
                try:
                    cgroup.rmdir()
                except OSError:
                    time.sleep(0.2)
