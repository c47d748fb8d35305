"""The metrics listener of a running daemon: scraped over HTTP on loopback, as Prometheus does."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from lab.daemonproc import ROOT, ServeProcess, request
from lab.knot import free_port

from policyd_ipv6.daemon.metrics_http import MAX_CONNECTIONS

pytestmark = pytest.mark.process


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:PORT/PATH."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def sample(text: str, line_start: str) -> float:
    """The value of the one sample line starting with ``line_start``."""
    (value,) = [line.rsplit(" ", 1)[1] for line in text.splitlines()
                if line.startswith(line_start + " ")]
    return float(value)


def test_metrics_are_scraped_over_loopback_and_other_paths_are_404(tmp_path):
    """GET /metrics answers the text format with the decisions just made, IPv4 included;
    every other path is 404, and decisions go on while it is scraped."""
    port = free_port()
    dead_dns = free_port()  # nothing listens there: every query fails at once
    settings = {"metrics_listen": [f"tcp:{port}:interface=127.0.0.1"],
                "nameservers": [f"127.0.0.1:{dead_dns}"]}
    with ServeProcess(tmp_path, settings, optin="example.com\n") as daemon:
        assert daemon.ask(request(client_address="192.0.2.10")) == "DUNNO"
        assert daemon.ask(request(recipient="b@example.org")).startswith("550 5.2.1")
        assert daemon.ask(request(instance="m1")).startswith("451 4.4.3")
        status, content_type, text = get(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert sample(text, 'policyd_ipv6_decisions_total{outcome="accept",rule="ipv4"}') == 1
        assert sample(text, 'policyd_ipv6_decisions_total{outcome="reject",'
                            'rule="not-opted-in"}') == 1
        assert sample(text, 'policyd_ipv6_decisions_total{outcome="defer",'
                            'rule="rdns-temporary"}') == 1
        assert sample(text, "policyd_ipv6_decision_duration_seconds_count") == 3
        assert sample(text, 'policyd_ipv6_dns_queries_total{outcome="error",type="PTR"}') >= 1
        assert sample(text, "policyd_ipv6_optin_entries") == 1
        assert re.search(r"^process_resident_memory_bytes \d", text, re.MULTILINE)
        for path in ("/", "/metrics/", "/metricsx", "/other"):
            assert get(port, path)[0] == 404, path
        assert get(port, "/metrics?name=x")[0] == 200
        assert daemon.ask(request(client_address="192.0.2.11")) == "DUNNO"
        assert daemon.problems() == []


def test_a_metrics_endpoint_that_cannot_be_bound_stops_the_daemon(tmp_path):
    """A metrics_listen port already in use stops serve with a message naming the key."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = ServeProcess(tmp_path, {"metrics_listen": [f"tcp:{port}:interface=127.0.0.1"]},
                              optin="example.com\n")
        # Run to its end: "Address already in use" would satisfy ServeProcess's wait for "ready".
        done = subprocess.run(daemon.argv(), cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f'metrics_listen = "tcp:{port}:interface=127.0.0.1": cannot listen' in done.stderr


def closed_by_the_daemon(sockets: list[socket.socket], expected: int) -> int:
    """How many of ``sockets`` the daemon has closed, once ``expected`` are (or after 10 s)."""
    end = time.monotonic() + 10
    while True:
        readable, _, _ = select.select(sockets, [], [], 0.2)  # EOF or reset: closed
        if len(readable) >= expected or time.monotonic() > end:
            return len(readable)


def test_metrics_connections_are_bounded_and_bodies_refused_unread(tmp_path):
    """With 120 metrics connections attempted under a 128 open-files limit, MAX_CONNECTIONS
    stay open and the rest are closed at once, the policy listener still answers; a POST
    announcing 300 MB is answered 413 without a temporary file; GET is still served."""
    port = free_port()
    settings = {"metrics_listen": [f"tcp:{port}:interface=127.0.0.1"],
                "nameservers": [f"127.0.0.1:{free_port()}"]}
    with ServeProcess(tmp_path, settings, optin="example.com\n",
                      rlimit_nofile=(128, 128)) as daemon:
        before = daemon.open_fds()
        held: list[socket.socket] = []
        try:
            for _ in range(120):
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
                except OSError:  # the daemon no longer accepts: the test fails below
                    break
                held.append(sock)
            closed = closed_by_the_daemon(held, len(held) - MAX_CONNECTIONS)
            assert (len(held), closed) == (120, 120 - MAX_CONNECTIONS)
            assert daemon.open_fds() <= before + MAX_CONNECTIONS
            assert daemon.ask(request(client_address="192.0.2.10")) == "DUNNO"
        finally:
            for sock in held:
                sock.close()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 314572800\r\n\r\n")
            try:
                sock.sendall(b"x" * (1 << 20))
            except OSError:  # closed after the refusal, before all of it was sent
                pass
            answer = sock.recv(4096)
            spooled = [os.readlink(f"/proc/{daemon.pid}/fd/{fd}")
                       for fd in os.listdir(f"/proc/{daemon.pid}/fd")]
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert not [path for path in spooled if "(deleted)" in path]  # a temporary file's mark
        assert get(port, "/metrics")[0] == 200
        assert daemon.problems() == []
