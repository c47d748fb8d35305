"""The package built inside a clean root of a Debian release, linted by that release's lintian.

Contract: `build_in_root(release, workdir)` copies the tree (as debbuild.copy_source does;
POLICYD_IPV6_DEB_REF=<commit> takes that commit's files instead) and
the previous package version's commit (`previous_version_ref()`: the newest commit whose
debian/changelog starts with another version) into an overlay of the release's pristine root,
installs lintian and the build dependencies there with apt-get (`apt-get build-dep`, so
debian/control's Build-Depends are what is installed, nothing else), runs
`dpkg-buildpackage -us -uc -b` for both (the current one runs its unit tests) and lintian on
the current one, and returns a `RootBuild`: both .deb files (copied out to `workdir`/new and
`workdir`/old), the lintian exit status and output. It raises ContainerError when a
step fails. Nothing from the host's Python or libraries takes part in the build; only
DEB_BUILD_OPTIONS is passed on (nocheck skips the build-time tests, for a quick try).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import containers, debbuild


@dataclass(frozen=True)
class RootBuild:
    release: str
    deb: Path
    previous_deb: Path
    previous_version: str
    lintian_status: int
    lintian_output: str


def previous_version_ref() -> tuple[str, str]:
    """(commit, version) of the newest commit whose debian/changelog has another version."""
    current = debbuild.changelog_version()
    commits = subprocess.run(["git", "-C", str(debbuild.REPO), "log", "--format=%H", "--",
                              "debian/changelog"], capture_output=True, text=True,
                             check=True).stdout.split()
    for commit in commits:
        text = subprocess.run(["git", "-C", str(debbuild.REPO), "show",
                               commit + ":debian/changelog"], capture_output=True,
                              text=True).stdout
        match = re.match(r"^%s \(([^)]+)\) " % re.escape(debbuild.PACKAGE), text)
        if match and match.group(1) != current:
            return commit, match.group(1)
    raise containers.ContainerError("no earlier package version in debian/changelog's history")


_PINNED: dict[str, str] = {}


def pinned_ref() -> str | None:
    """POLICYD_IPV6_DEB_REF as the commit it names at first use: every release in a run
    builds the same files even when the branch moves meanwhile."""
    ref = os.environ.get("POLICYD_IPV6_DEB_REF") or None
    if ref is not None and ref not in _PINNED:
        _PINNED[ref] = subprocess.run(["git", "-C", str(debbuild.REPO), "rev-parse", ref],
                                      capture_output=True, text=True,
                                      check=True).stdout.strip()
    return _PINNED.get(ref) if ref else None


_BUILD = """
export DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
apt-get update -qq
apt-get install -y -qq --no-install-recommends lintian build-essential > /dev/null
cd /build/new/src && apt-get build-dep -y -qq --no-install-recommends ./ > /dev/null
cd /build/old/src && apt-get build-dep -y -qq --no-install-recommends ./ > /dev/null
cd /build/old/src && dpkg-buildpackage -us -uc -b > ../build.log 2>&1
cd /build/new/src && dpkg-buildpackage -us -uc -b > ../build.log 2>&1
"""


def build_in_root(release: str, workdir: Path) -> RootBuild:
    """Build and lint in a clean `release` root (see the module docstring)."""
    ref, previous = previous_version_ref()
    with containers.Overlay(containers.pristine(release), workdir / "build-root") as overlay:
        build = overlay.root / "build"
        debbuild.copy_source(build / "new" / "src", pinned_ref())
        debbuild.copy_source(build / "old" / "src", ref)
        try:
            options = os.environ.get("DEB_BUILD_OPTIONS", "")
            containers.offline_prepare(overlay.root, "export DEB_BUILD_OPTIONS=%s\n%s"
                                       % (shlex.quote(options), _BUILD), timeout=900)
        except containers.ContainerError as error:
            logs = "".join("\n--- %s build log tail:\n%s" % (
                name, "\n".join((build / name / "build.log").read_text(
                    errors="replace").splitlines()[-40:]))
                for name in ("old", "new") if (build / name / "build.log").exists())
            raise containers.ContainerError(str(error) + logs) from None
        lint = subprocess.run(
            ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--as-pid2", "--pipe",
             "-D", str(overlay.root), "sh", "-c",
             "cd /build/new && lintian --fail-on error,warning --display-info *.changes"],
            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        out = {}
        for name in ("new", "old"):
            (deb,) = (build / name).glob("%s_*_all.deb" % debbuild.PACKAGE)
            out[name] = workdir / name / deb.name
            out[name].parent.mkdir()
            shutil.copy(deb, out[name])
    return RootBuild(release, out["new"], out["old"], previous, lint.returncode,
                     lint.stdout + lint.stderr)
