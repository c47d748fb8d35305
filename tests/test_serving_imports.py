"""What a running daemon imports: the serving process loads the libraries of the parts its
configuration turns on, and no others (each costs resident memory for the daemon's lifetime).

The daemon runs as ``serve`` always does, with ``PYTHONPROFILEIMPORTTIME=1``: CPython then
writes a line to standard error (``serve.log``) for every module imported, whoever imports it,
and for every import tried and refused: Twisted's TCP transport tries ``OpenSSL.SSL``, which
``cli`` refuses when every endpoint is plain, so OpenSSL counts as loaded when any module of it
beyond those two names appears (pyOpenSSL's own imports: ``OpenSSL._util``, ``OpenSSL.crypto``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess

import pytest
from lab.daemonproc import ROOT, ServeProcess, request
from lab.knot import free_port

pytestmark = pytest.mark.process

# Libraries of the milter (dkimpy and what it loads), the metrics, PostgreSQL and TLS.
NOT_FOR_PLAIN_SERVING = ("dkim", "nacl", "cryptography", "service_identity",
                         "psycopg", "prometheus_client", "twisted.web")
_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", re.MULTILINE)


def imported(log: str, before: str = "") -> set[str]:
    """The modules named by the import-time lines of ``log`` (up to ``before``, if given)."""
    if before:
        log = log[:log.index(before)]
    return set(_IMPORTED.findall(log))


def under(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def openssl_loaded(modules: set[str]) -> bool:
    """Whether pyOpenSSL was loaded, not only tried (see the module docstring)."""
    return bool(set(under(modules, "OpenSSL")) - {"OpenSSL", "OpenSSL.SSL"})


def test_a_plain_configuration_serves_without_dkim_metrics_postgresql_or_tls(
        tmp_path, monkeypatch):
    """Started with a file opt-in and neither milter nor metrics, the daemon decides requests
    (DNS included) without ever importing dkim, nacl, OpenSSL, cryptography, psycopg,
    prometheus_client or twisted.web."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    settings = {"nameservers": [f"127.0.0.1:{free_port()}"]}  # nothing there: fails at once
    with ServeProcess(tmp_path, settings, optin="example.com\n") as daemon:
        assert daemon.ask(request(client_address="192.0.2.10")) == "DUNNO"
        assert daemon.ask(request(recipient="b@example.org")).startswith("550 5.2.1")
        assert daemon.ask(request(instance="m1")).startswith("451 4.4.3")
        log = daemon.log()
    modules = imported(log)
    assert {"twisted.internet.tcp", "policyd_ipv6.policy.server"} <= modules, log[-2000:]
    assert {p: under(modules, p) for p in NOT_FOR_PLAIN_SERVING if under(modules, p)} == {}
    assert not openssl_loaded(modules), under(modules, "OpenSSL")


def test_the_milter_and_the_metrics_load_their_libraries_before_the_daemon_is_ready(
        tmp_path, monkeypatch):
    """With milter_listen and metrics_listen, dkim and prometheus_client are imported before
    "ready" (before the privilege drop, from wherever the daemon was installed)."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    settings = {"milter_listen": [f"tcp:{free_port()}:interface=127.0.0.1"],
                "metrics_listen": [f"tcp:{free_port()}:interface=127.0.0.1"]}
    with ServeProcess(tmp_path, settings, optin="example.com\n") as daemon:
        log = daemon.log()
    modules = imported(log, before=" ready: ")
    assert under(modules, "dkim") and under(modules, "prometheus_client"), log[-2000:]
    assert "policyd_ipv6.daemon.metrics_http" in modules
    assert not openssl_loaded(modules)  # every endpoint plain: still no TLS


def test_a_tls_endpoint_keeps_twisted_tls(tmp_path, monkeypatch):
    """An endpoint of a type other than tcp, tcp6 or unix (here ssl:, which cannot start
    without its key) leaves pyOpenSSL importable: Twisted loads it as it always did."""
    if importlib.util.find_spec("OpenSSL") is None:
        pytest.skip("pyOpenSSL is not installed for this interpreter")
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    daemon = ServeProcess(tmp_path, {"metrics_listen": [f"ssl:{free_port()}:privateKey=none"]},
                          optin="example.com\n")
    done = subprocess.run(daemon.argv(), cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert openssl_loaded(imported(done.stderr)), done.stderr[-2000:]
