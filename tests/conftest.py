"""Tests grouped by what they cost, so each slice can be run on its own (`pytest -m unit`).

The cost markers are registered in pyproject.toml:

- `unit`: no sockets, no subprocesses, no root (fakes, `StringTransport`, `task.Clock`);
- `process`: real sockets or subprocesses on loopback (the daemon as a process, a fake DNS
  server), no root;
- `knot`: a real Knot DNS server (and unbound) on loopback;
- `postgresql`: a private PostgreSQL cluster (initdb, postgres on loopback) and psycopg 3;
- `soak`: long runs that watch resource use (minutes);
- `e2e`: root, network namespaces, real Postfix, Knot and swaks;
- `deb`: builds, installs and purges the Debian package (root).

A test carries its marker (a module's `pytestmark`, or a decorator); every test that carries
none is marked `unit` here. A `unit` test that binds or connects a socket, or starts a
subprocess, fails at once with a message saying so: the fast slice stays what its name says.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
from hypothesis import settings

# No deadline per example: a slow first example (imports, a loaded build machine: one took 716
# ms of the default 200 in a package build) is not a failure; speed is the benchmark's job.
settings.register_profile("unhurried", deadline=None)
settings.load_profile("unhurried")
# The package build runs the unit tests with --hypothesis-profile=derandomized (debian/rules):
# every build of a release tries the same examples, and no example database carries over.
settings.register_profile("derandomized", derandomize=True, database=None, deadline=None)

COST_MARKERS = ("unit", "process", "knot", "postgresql", "soak", "e2e", "deb")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(name) for name in COST_MARKERS):
            item.add_marker(pytest.mark.unit)


class NotAUnitTest(AssertionError):
    """A test marked `unit` (or carrying no cost marker) used a socket or a subprocess."""


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise NotAUnitTest("a unit test must not %s: mark the test (or its module) `process` "
                           "or `knot` (see tests/conftest.py)" % what)
    return refuse


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request, monkeypatch):
    """For `unit` tests: binding, connecting or spawning raises instead of happening."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    for name in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, _refuse("%s a socket" % name))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a subprocess"))
    yield


@pytest.fixture(scope="module")
def knot():
    """A real Knot server on loopback serving the shared lab zones (tests/dnslab.py); yields
    its port. A module that needs other zones defines its own ``knot`` fixture."""
    import dnslab
    from lab.knot import KnotServer, free_port, require_knot

    require_knot()
    port = free_port()
    with KnotServer(dnslab.zones(), [("127.0.0.1", port)]):
        yield port
