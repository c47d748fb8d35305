"""DKIM workers started by a daemon that is still root: they import as root, then verify as
the daemon's user, so a clone only root can read (mode 700, /root) still verifies DKIM.

The pool runs in a real child interpreter started from such a clone (with dkimpy copied beside
the package, as a virtual environment inside the clone would hold it), as ``serve`` starts it:
just before the parent drops to nobody.
"""

import os
import pwd
import shutil
import subprocess
import tempfile

import dkim
import pytest

pytestmark = pytest.mark.process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"

# Started from the clone: a pool with one worker told to become nobody, the parent dropping to
# nobody right after (as serve does), then one parse job; prints the answer and the worker's
# real and effective uid as /proc shows them.
SCRIPT = """
import os, pwd, sys
from twisted.internet import reactor
from policyd_ipv6.checks.dkim_pool import DkimPool

nobody = pwd.getpwnam("nobody")
plan = (nobody.pw_uid, nobody.pw_gid, "nobody")
pool = DkimPool(reactor, workers=1, queue_limit=1, deadline_seconds=20)
head = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=sel; h=from; bh=x; b=y\\r\\n\\r\\n"

def go():
    pool.start(become=plan)
    os.initgroups("nobody", nobody.pw_gid); os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)
    d = pool.submit({"job": "parse", "limit": 5, "body_start": len(head)}, head)
    def done(answer):
        pid = pool.workers[0].transport.pid
        with open(f"/proc/{pid}/status") as status:
            uids = [line.split()[1:3] for line in status if line.startswith("Uid:")][0]
        print("ANSWER", answer, "UIDS", uids, flush=True)
    d.addCallbacks(done, lambda f: print("FAILED", f.getErrorMessage(), flush=True))
    d.addBoth(lambda _: reactor.stop())

reactor.callWhenRunning(go)
reactor.run()
"""


def test_workers_started_as_root_import_first_then_verify_as_the_daemons_user():
    """From a mode-700 clone, a worker spawned before the drop answers a job, and its real and
    effective uid are nobody's: it imported as root and dropped before reading the job."""
    if os.geteuid() != 0:
        pytest.skip("needs root (tests/run runs as root)")
    nobody = pwd.getpwnam("nobody").pw_uid
    clone = tempfile.mkdtemp(prefix="policyd-dkim-clone-",
                             dir="/root" if os.path.isdir("/root") else None)
    try:
        os.chmod(clone, 0o700)
        shutil.copytree(os.path.join(ROOT, "policyd_ipv6"), os.path.join(clone, "policyd_ipv6"))
        shutil.copytree(os.path.dirname(dkim.__file__), os.path.join(clone, "dkim"))
        # Debian's interpreter: it has no editable install of this checkout to fall back on,
        # so the package can only come from the clone, as in a clone's own virtual environment.
        result = subprocess.run([PYTHON, "-c", SCRIPT], cwd=clone, capture_output=True,
                                text=True, timeout=60, env={**os.environ, "PYTHONPATH": clone})
    finally:
        shutil.rmtree(clone)
    out = result.stdout + result.stderr
    assert "ANSWER" in result.stdout, out
    assert f"UIDS ['{nobody}', '{nobody}']" in result.stdout, out
    assert "cannot drop" not in out and "Traceback" not in out, out
