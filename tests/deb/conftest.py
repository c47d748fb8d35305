"""The package under test, built once per session and installed on demand.

`package` (session) builds the binary package from a copy of the tree (debbuild.build) and
purges it at the end of the session if a test installed it. `installed` (per test) makes sure
the package is installed from that build, with apt-get, and returns the same handle.

These tests install, change (/etc/policyd-ipv6/optin-domains) and purge a system package, so
they need root and refuse to start when policyd-ipv6 is already installed (an administrator's
copy is not theirs to modify). Outside root, or without the build tools, they are skipped
with a loud reason; under CI=true every such skip is a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from . import debbuild
from .debbuild import require


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if "deb" in getattr(r, "keywords", {})]
    if skipped:
        reason = skipped[0].longrepr[2] if isinstance(skipped[0].longrepr, tuple) else ""
        terminalreporter.write_sep("!", "%d DEBIAN PACKAGE TESTS NOT RUN: %s"
                                   % (len(skipped), reason), red=True, bold=True)


class PackageUnderTest:
    """The build, the system paths named after the package before it was installed, and timings."""

    def __init__(self, build: debbuild.Build, paths_before: set[str]):
        self.build = build
        self.paths_before = paths_before
        self.installed_by_us = False
        self.timings: dict[str, float] = {}

    def ensure_installed(self) -> None:
        if debbuild.installed_version() is None:
            started = time.monotonic()
            self.install_output = debbuild.install(self.build.deb)
            self.timings.setdefault("install", time.monotonic() - started)
            self.installed_by_us = True

    def purge(self) -> str:
        started = time.monotonic()
        output = debbuild.purge()
        self.timings.setdefault("purge", time.monotonic() - started)
        return output


@pytest.fixture(scope="session")
def package(request) -> PackageUnderTest:
    """The built package (see the module docstring)."""
    if os.geteuid() != 0:
        require("installing a Debian package needs root (running as uid %d)" % os.geteuid())
    missing = debbuild.missing_tools()
    require("missing tools: %s" % ", ".join(missing) if missing else None)
    version = debbuild.installed_version()
    if version is not None:
        pytest.fail("%s %s is already installed on this machine; these tests install, modify "
                    "and purge it: remove it first (apt-get purge %s)"
                    % (debbuild.PACKAGE, version, debbuild.PACKAGE), pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="p6d-deb-"))
    request.addfinalizer(lambda: shutil.rmtree(workdir, ignore_errors=True))
    paths_before = debbuild.system_paths_named()
    started = time.monotonic()
    built = PackageUnderTest(debbuild.build(workdir), paths_before)
    built.timings["build"] = time.monotonic() - started

    def purge_if_ours() -> None:
        if built.installed_by_us and debbuild.installed_version() is not None:
            built.purge()
    request.addfinalizer(purge_if_ours)
    return built


@pytest.fixture
def installed(package) -> PackageUnderTest:
    """The package, installed with apt-get from the session's build."""
    package.ensure_installed()
    return package
