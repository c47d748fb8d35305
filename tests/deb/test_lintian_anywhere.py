"""lintian, run as nobody by the package tests, works from a clone anywhere: a working
directory and a build directory that only root can enter (a clone in /root) included."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from . import debbuild

pytestmark = pytest.mark.deb

CHANGES = """Format: 1.8
Date: Mon, 01 Jan 2024 00:00:00 +0000
Source: policyd-ipv6
Binary: policyd-ipv6
Architecture: all
Version: 0.0.0-1
Distribution: unstable
Urgency: medium
Maintainer: A <a@example.org>
Changed-By: A <a@example.org>
Description:
 policyd-ipv6 - test
Changes:
 policyd-ipv6 (0.0.0-1) unstable; urgency=medium
 .
   * Test.
Checksums-Sha1:
Checksums-Sha256:
Files:
"""


def test_lintian_runs_from_a_directory_only_root_can_enter(monkeypatch):
    """From a working directory and with a .changes in directories of mode 700 owned by root,
    lintian (as nobody) still reads and checks the file, and no mode is loosened."""
    if os.geteuid() != 0:
        pytest.skip("needs root: lintian runs as nobody only when the tests run as root")
    if shutil.which("lintian", path=debbuild.debian_env()["PATH"]) is None:
        debbuild.require("lintian is not installed (Debian package lintian)")
    private = Path(tempfile.mkdtemp(prefix="p6d-private-", dir="/root"
                                    if os.path.isdir("/root") else None))
    try:
        os.chmod(private, 0o700)
        changes = private / "policyd-ipv6_0.0.0-1_all.changes"
        changes.write_text(CHANGES)
        monkeypatch.chdir(private)
        result = debbuild.lintian(changes)
        output = result.stdout + result.stderr
        assert "Permission denied" not in output and "Can't cd" not in output, output
        assert "empty-field Files" in output, output  # lintian did check the file
        assert os.stat(private).st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(private)
