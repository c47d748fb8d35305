"""Build, lint, install and purge the Debian package, for the package tests.

Contract:
- `build(workdir)` copies the repository's files as git sees them - tracked and untracked,
  without ignored ones (build output, caches, virtual environments), i.e. the code every other
  test runs; with `ref` (or POLICYD_IPV6_DEB_REF=<commit>), that commit's files through
  `git archive` - to `workdir/src`, checks the build
  dependencies and runs `dpkg-buildpackage -us -uc -b` there, so the build never writes into
  the work tree. It returns a `Build` (the .deb, the .changes, the build log) or raises
  `DebError` with the log's tail. Debian's tools run with Debian's own PATH and a clean
  environment: no virtual environment, pyenv or PYTHONPATH of the caller leaks into the build.
- `lintian(changes)` runs lintian on the .changes (the .deb and .buildinfo) as user nobody
  (lintian unpacks what it checks), on copies in a directory of its own under /tmp so that it
  works from a clone anywhere (/root included), and returns its exit status and output.
- `installed_version()`, `install(deb)` and `purge()` query, install (with apt-get, so the
  dependencies come from Debian) and purge the package; `system_paths_named()` lists every path
  under the system directories whose name contains the package's name, for a before/after
  comparison around install and purge.
- `require(problem)` skips a test loudly when something it needs is missing (fails under CI).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "policyd-ipv6"
REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"
# Where a package's files and its dpkg/apt/systemd bookkeeping can be left behind.
SYSTEM_DIRS = ("/etc", "/usr", "/var", "/lib", "/opt", "/srv", "/run")
NAME_PATTERNS = (PACKAGE, PACKAGE.replace("-", "_"))
# Tools the package tests need, each with the Debian package that has it.
TOOLS = {"dpkg-buildpackage": "dpkg-dev", "dpkg-checkbuilddeps": "dpkg-dev",
         "lintian": "lintian", "apt-get": "apt", "git": "git", "runuser": "util-linux",
         "setpriv": "util-linux", "unshare": "util-linux"}


def require(problem: str | None) -> None:
    """In a test: skip loudly when `problem` says what is missing; under CI=true fail instead."""
    import pytest  # only tests call this

    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true, but the Debian package test cannot run: %s" % problem,
                    pytrace=False)
    pytest.skip("DEBIAN PACKAGE NOT TESTED: %s" % problem)


class DebError(RuntimeError):
    """A build, lint, install or purge step failed; the message carries the output."""


@dataclass(frozen=True)
class Build:
    deb: Path
    changes: Path
    log: Path


def debian_env(**extra: str) -> dict[str, str]:
    """A clean environment for Debian's tools: /usr/bin/python3, not a venv's or pyenv's."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": os.environ.get("HOME", "/root"), "DEBIAN_FRONTEND": "noninteractive"}
    env.update(extra)
    return env


def missing_tools() -> list[str]:
    """'tool (package)' for every tool of TOOLS that is not installed."""
    path = debian_env()["PATH"]
    return ["%s (%s)" % (tool, pkg) for tool, pkg in TOOLS.items()
            if shutil.which(tool, path=path) is None]


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", debian_env())
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def copy_source(dest: Path, ref: str | None = None) -> None:
    """Copy the repository's files (see the module docstring), or commit `ref`'s, into `dest`."""
    dest.mkdir(parents=True)
    if ref is not None:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest)
        return
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet committed
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


def changelog_version() -> str:
    """The package version in debian/changelog (its first entry)."""
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"^%s \(([^)]+)\) " % re.escape(PACKAGE), first)
    if not match:
        raise DebError("debian/changelog does not start with a %s entry: %r" % (PACKAGE, first))
    return match.group(1)


def build(workdir: Path, ref: str | None = None) -> Build:
    """Build the binary package from a copy of the tree in `workdir` (see the module docstring)."""
    ref = ref or os.environ.get("POLICYD_IPV6_DEB_REF") or None
    src = workdir / "src"
    copy_source(src, ref)
    deps = _run(["dpkg-checkbuilddeps"], cwd=src)
    if deps.returncode != 0:
        raise DebError("build dependencies missing (apt-get install them):\n" + deps.stderr)
    log = workdir / "build.log"
    with open(log, "w") as out:
        result = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src,
                                env=debian_env(), stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise DebError("dpkg-buildpackage failed (exit %d):\n%s"
                       % (result.returncode, _tail(log.read_text(errors="replace"))))
    version = changelog_version()
    debs = sorted(workdir.glob("%s_*.deb" % PACKAGE))
    changes = sorted(workdir.glob("%s_%s_*.changes" % (PACKAGE, version)))
    if len(debs) != 1 or len(changes) != 1:
        raise DebError("expected one .deb and one .changes in %s, found %s"
                       % (workdir, sorted(p.name for p in workdir.iterdir())))
    return Build(debs[0], changes[0], log)


def lintian(changes: Path) -> subprocess.CompletedProcess:
    """lintian on `changes`, failing on errors and warnings, as nobody when run as root."""
    if os.geteuid() != 0:
        return _run(["lintian", "--fail-on", "error,warning", "--display-info", str(changes)],
                    env=debian_env(HOME="/nonexistent"))
    # nobody must be able to reach the files and its working directory, wherever the build
    # and the clone are (a clone in /root, mode 700, included): lint copies in a directory of
    # its own under /tmp, never loosening the modes of the caller's directories.
    shared = Path(tempfile.mkdtemp(prefix="p6d-lintian-", dir="/tmp"))
    try:
        os.chmod(shared, 0o755)
        for path in changes.parent.glob("%s_*" % PACKAGE):
            if path.is_file():
                shutil.copy(path, shared / path.name)
                os.chmod(shared / path.name, 0o644)
        argv = ["runuser", "-u", "nobody", "--", "lintian", "--fail-on", "error,warning",
                "--display-info", str(shared / changes.name)]
        return _run(argv, env=debian_env(HOME="/nonexistent"), cwd=shared)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def installed_version() -> str | None:
    """The installed version of the package, or None when it is not installed."""
    query = _run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", PACKAGE])
    if query.returncode != 0:
        return None
    status, _, version = query.stdout.partition(" ")
    return version if status == "installed" else None


def _apt(*args: str) -> subprocess.CompletedProcess:
    # Wait for a concurrent apt/dpkg rather than failing on its lock.
    argv = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "--no-install-recommends", *args]
    result = _run(argv)
    if result.returncode != 0:
        raise DebError("%s -> exit %d\n%s%s" % (" ".join(argv), result.returncode,
                                                result.stdout, result.stderr))
    return result


def install(deb: Path) -> str:
    """apt-get install the .deb file (a path, so apt resolves its dependencies); its output."""
    return _apt("install", str(deb.resolve())).stdout


def purge() -> str:
    """apt-get purge the package; its output."""
    return _apt("purge", PACKAGE).stdout


def system_paths_named() -> set[str]:
    """Every path under SYSTEM_DIRS whose name contains the package's name (or module name)."""
    roots = [d for d in SYSTEM_DIRS if os.path.isdir(d)]
    names = []
    for pattern in NAME_PATTERNS:
        names += ["-o", "-name", "*%s*" % pattern]
    found = subprocess.run(["find", *roots, "-xdev", "(", *names[1:], ")", "-print"],
                           capture_output=True, text=True)
    return set(found.stdout.split("\n")) - {""}
