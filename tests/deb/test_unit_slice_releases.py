"""The unit slice on Debian 13 ("trixie") and Debian 12 ("bookworm") with each release's own Python.

CI's host runs the unit tests on its own Python with PyPI's newest libraries and with its own
release's python3 libraries; this module covers the other release too. For each release: a
writable overlay of the release's pristine root (containers.py, debootstrapped once per run
and shared with the other package tests) gets, with apt-get and the host's network, the
release's python3 and the Debian packages the code and the unit tests import (RUNTIME and
TESTING below); the tree (debbuild.copy_source: the tracked and untracked-but-not-ignored
files, no venv, no .git) is copied to /root/src with mode 700, as a clone in root's home
would be; then `python3 -m pytest -q -m unit -p no:cacheprovider` runs there as root, with no
init (systemd-nspawn --as-pid2). The test asserts the interpreter and the libraries are the
release's (VERSIONS), that pytest passed (with CI=true inside: a test missing a tool fails
instead of skipping) and that it ran a plausible number of tests (MIN_PASSED: a slice that
quietly collects nothing, or a handful, is a failure); a failure's message carries the tail
of pytest's output. The overlay is unmounted and its directory removed in all cases; the
pristine root is never changed.

Root only; run it under the lab lock:
`flock /tmp/e2e.lock pytest -m deb tests/deb/test_unit_slice_releases.py`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from . import containers, debbuild
from .debbuild import require

pytestmark = pytest.mark.deb

RELEASES = ("trixie", "bookworm")
# What the daemon imports (pyproject.toml's dependencies, as Debian packages them).
RUNTIME = ("python3", "python3-twisted", "python3-dnspython", "python3-spf", "python3-dkim",
           "python3-idna", "python3-prometheus-client")
# What the unit tests need besides: pytest, hypothesis, PyYAML for the SPF suites, and openssl
# for the DKIM keys (tests/dkimkeys.py; without it the DKIM and milter tests are skipped).
TESTING = ("python3-pytest", "python3-hypothesis", "python3-yaml", "openssl")
# (Python major.minor, Twisted major, dnspython major.minor) that each release ships.
VERSIONS = {"trixie": ("3.13", 24, "2.7"), "bookworm": ("3.11", 22, "2.3")}
MIN_PASSED = 800
SRC = "/root/src"

_INSTALL = """export DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
apt-get update -qq
apt-get install -y -qq --no-install-recommends %s > /dev/null
"""

# The versions as the interpreter inside sees them, one JSON line.
_VERSIONS = """import json, sys, importlib.metadata as md
import twisted, dns.version, spf, dkim
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "twisted": twisted.__version__,
                  "dnspython": dns.version.version, "pyspf": spf.__version__,
                  "dkimpy": md.version("dkimpy")}))
"""

# pytest's output and exit status go to files, so a failing run is read back, not raised.
# CI=true: a test that would skip for want of a tool (openssl) fails; the root has them all.
_PYTEST = """export LANG=C.UTF-8 HOME=/root PYTHONDONTWRITEBYTECODE=1 CI=true
cd %s
status=0
timeout 900 python3 -m pytest -q -m unit -p no:cacheprovider > /root/pytest.log 2>&1 \
    || status=$?
echo "$status" > /root/pytest.status
""" % SRC


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.parametrize("release", RELEASES)
def test_unit_slice_passes_on_the_release_python(release):
    """The unit tests pass under the release's own python3 and python3-* libraries, with more
    than MIN_PASSED tests run, on exactly the versions that release ships."""
    if os.geteuid() != 0:
        require("making and entering Debian roots needs root (uid %d)" % os.geteuid())
    missing = containers.missing_tools()
    require("missing tools: %s" % ", ".join(missing) if missing else None)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="p6d-unit-%s-" % release))
    try:
        with containers.Overlay(containers.pristine(release), work / "unit-root") as overlay:
            source = overlay.root / SRC.lstrip("/")
            debbuild.copy_source(source)
            source.chmod(0o700)
            containers.offline_prepare(overlay.root, _INSTALL % " ".join(RUNTIME + TESTING),
                                       timeout=900)
            installed = time.monotonic()
            printed = containers.offline_prepare(
                overlay.root, "python3 -c " + shlex.quote(_VERSIONS), timeout=60)
            # offline_prepare appends nspawn's own stderr (warnings) to the program's output.
            (line,) = [line for line in printed.splitlines() if line.startswith("{")]
            versions = json.loads(line)
            containers.offline_prepare(overlay.root, _PYTEST, timeout=960)
            status = int((overlay.root / "root/pytest.status").read_text())
            output = (overlay.root / "root/pytest.log").read_text(errors="replace")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    print("%s: %s; apt-get %.0f s, pytest %.0f s: %s" % (
        release, versions, installed - started, time.monotonic() - installed, summary))
    python, twisted_major, dnspython = VERSIONS[release]
    assert (versions["python"], int(versions["twisted"].split(".")[0]),
            ".".join(versions["dnspython"].split(".")[:2])) == (python, twisted_major,
                                                                dnspython), versions
    passed = re.search(r"\b(\d+) passed\b", summary)
    assert status == 0, "pytest -m unit on %s exited %d:\n%s" % (release, status, _tail(output))
    assert passed and int(passed.group(1)) > MIN_PASSED, (
        "pytest -m unit on %s ran too few tests (%s):\n%s" % (release, summary, _tail(output)))
