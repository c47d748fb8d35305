"""Metrics end to end: a real Prometheus server scrapes the lab's main daemon while real mail
flows through Postfix, and the counters are read back through Prometheus's HTTP query API.

Prometheus (Debian package ``prometheus``) runs in the MX namespace with its own
configuration and storage in a temporary directory, scraping the daemon's ``metrics_listen``
(127.0.0.1:``METRICS_PORT`` there) every second; its own web port is on the same loopback.
Queries go through ``/api/v1/query`` from inside the namespace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse

import pytest
from lab.process import terminate

from . import topology as T
from .test_mail import rcpt

pytestmark = pytest.mark.e2e

PROMETHEUS_PORT = 9190
JOB = "policyd-ipv6"
# Fetches one URL inside the namespace and prints the body (the test runs in the root one).
FETCH = ("import sys, urllib.request\n"
         "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


def fetch(lab, url: str) -> str:
    done = lab.mx.run([sys.executable, "-c", FETCH, url], check=False, capture_output=True,
                      text=True, timeout=20)
    if done.returncode != 0:
        raise ConnectionError(done.stderr[-500:])
    return done.stdout


def query(lab, promql: str) -> list[dict]:
    """The result vector of an instant query (an empty list when nothing matches)."""
    url = "http://127.0.0.1:%d/api/v1/query?%s" % (
        PROMETHEUS_PORT, urllib.parse.urlencode({"query": promql}))
    answer = json.loads(fetch(lab, url))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def value(lab, promql: str) -> float:
    """The one value of a query that sums to a scalar-like vector (0 when empty)."""
    result = query(lab, "sum(%s)" % promql)
    return float(result[0]["value"][1]) if result else 0.0


def wait_for(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except (ConnectionError, json.JSONDecodeError) as error:
            last = error
        time.sleep(0.5)
    raise AssertionError("%s: not within %ss (last: %r)" % (what, timeout, last))


@pytest.fixture(scope="module")
def prometheus(lab, tmp_path_factory):
    """A Prometheus server scraping the main daemon every second; stopped by PID."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    directory = tmp_path_factory.mktemp("prometheus")
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: %s\n    scrape_interval: 1s\n    scrape_timeout: 1s\n"
        "    static_configs:\n      - targets: ['127.0.0.1:%d']\n" % (JOB, T.METRICS_PORT))
    log = open(directory / "prometheus.log", "wb")
    process = lab.mx.popen(
        [binary, "--config.file=%s" % config, "--storage.tsdb.path=%s" % (directory / "data"),
         "--web.listen-address=127.0.0.1:%d" % PROMETHEUS_PORT, "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: value(lab, 'up{job="%s"}' % JOB) == 1, "Prometheus scraping the daemon")
        yield process
    finally:
        terminate(process, grace_seconds=10)
        log.close()


def decisions(lab, rule: str, outcome: str) -> float:
    return value(lab, 'policyd_ipv6_decisions_total{job="%s",rule="%s",outcome="%s"}'
                 % (JOB, rule, outcome))


def test_prometheus_reads_the_decisions_of_real_mail(lab, prometheus):
    """Mail accepted over IPv6, deferred for a missing PTR and accepted over IPv4 shows up in
    Prometheus as decisions by rule and outcome, with DNS queries and cache lookups."""
    cases = [("pass", "accept"), ("no-rdns", "defer"), ("ipv4", "accept")]
    before = {case: decisions(lab, *case) for case in cases}
    messages = 'policyd_ipv6_cache_lookups_total{job="%s",cache="message"}' % JOB
    messages_before = value(lab, messages)
    good = lab.send(T.GOOD, [rcpt("bob")])
    assert good.accepted, good.transcript
    noptr = lab.send(T.NOPTR, [rcpt("bob")])
    assert not noptr.accepted, noptr.transcript
    ipv4 = lab.send(T.IPV4, [rcpt("bob")])
    assert ipv4.accepted, ipv4.transcript

    def counted() -> bool:
        return all(decisions(lab, *case) >= before[case] + 1 for case in cases)
    wait_for(counted, "the three decisions counted in Prometheus")
    # Earlier tests may have left the answers in the caches: new queries are not certain.
    assert value(lab, 'policyd_ipv6_dns_queries_total{job="%s"}' % JOB) >= 1
    assert value(lab, messages) >= messages_before + 2  # one per IPv6 message
    assert value(lab, 'policyd_ipv6_decision_duration_seconds_count{job="%s"}' % JOB) >= 3
    assert value(lab, 'policyd_ipv6_optin_entries{job="%s"}' % JOB) >= 1
    assert value(lab, 'policyd_ipv6_internal_errors_total{job="%s"}' % JOB) == 0
    assert value(lab, 'process_resident_memory_bytes{job="%s"}' % JOB) > 0
    # Exactly the contract's labels (plus job and instance, which Prometheus adds).
    (series,) = query(lab, 'policyd_ipv6_decisions_total{job="%s",rule="ipv4"}' % JOB)
    assert set(series["metric"]) == {"__name__", "job", "instance", "rule", "outcome"}
