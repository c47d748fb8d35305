"""The opt-in file breaking under a running daemon: the last good table stays in force.

The daemon process polls its opt-in file (every 0.2 s here). Deleted, replaced by garbage, by
bytes that are not UTF-8, by a directory, truncated to nothing or made unreadable, the file
must never take the table away: each fault logs an error and the decisions go on with the
last table that loaded; a good file is picked up again without a restart. An empty table
would answer 550 to all IPv6 mail, which is why a zero-byte file counts as a fault.
"""

import ipaddress
import os
import re
import shutil
import stat
import time

import pytest
from lab.baddns import BadDns, Behaviour
from lab.daemonproc import ServeProcess, request
from lab.zones import txt_rdata

# Every test runs the daemon process against a DNS server on loopback.
pytestmark = pytest.mark.process

CLIENT = "2001:db8::25"
KEPT = "kept.test"
LATER = "later.test"
REFUSED = r"550 5\.2\.1 Service unavailable, \[{}\] does not accept email over IPv6\."


@pytest.fixture(scope="module")
def dns():
    """Enough DNS for a message from CLIENT to pass: a PTR and an SPF record."""
    table = {ipaddress.ip_address(CLIENT).reverse_pointer:
             Behaviour(records=(("PTR", "mx.example.net."),)),
             "example.net": Behaviour(records=(("TXT", txt_rdata(
                 "v=spf1 ip6:2001:db8::/64 -all")),))}
    with BadDns(table) as server:
        yield server


def settings(dns) -> dict:
    return {"nameservers": [f"127.0.0.1:{dns.port}"], "optin_reload_interval_seconds": 0.2}


def reply_for(daemon, domain: str) -> str:
    return daemon.ask(request(client_address=CLIENT, recipient=f"bob@{domain}"))


def assert_table(daemon, opted_in: str, not_opted_in: str) -> None:
    assert reply_for(daemon, opted_in) == "DUNNO"
    assert re.fullmatch(REFUSED.format(re.escape(not_opted_in)),
                        reply_for(daemon, not_opted_in))


def fault(daemon, mark: int, *words: str) -> int:
    """Wait for the error naming the fault (logged after offset ``mark``); the new offset."""
    end = time.monotonic() + 5
    while not any(w in daemon.log()[mark:] for w in ("table not reloaded", "table loaded")):
        assert time.monotonic() < end, "the change was not noticed within 5 s"
        time.sleep(0.05)
    text = daemon.log()[mark:]
    assert "opt-in table loaded" not in text, text
    line = next(x for x in text.splitlines() if "opt-in table not reloaded" in x)
    assert line.startswith("error "), line
    for word in words:
        assert word in line, line
    assert "keeping the previous table (1 entries)" in line
    return len(daemon.log())


def test_deleted_invalid_or_unreadable_file_keeps_the_last_table(tmp_path, dns):
    """Deleted, invalid, not UTF-8, a directory: each logs an error naming it and the last
    good table keeps deciding; a good file then takes effect without a restart."""
    with ServeProcess(tmp_path, settings(dns), optin=f"{KEPT}\n") as daemon:
        path = daemon.optin_path
        assert_table(daemon, KEPT, LATER)
        mark = len(daemon.log())

        path.unlink()
        mark = fault(daemon, mark, str(path), "No such file")
        assert_table(daemon, KEPT, LATER)

        path.write_text(f"{LATER}\nthis is not a domain\n")
        mark = fault(daemon, mark, "line 2")
        assert_table(daemon, KEPT, LATER)

        path.write_bytes(b"later.test\n\xff\xfe.test\n")
        mark = fault(daemon, mark, "not UTF-8")
        assert_table(daemon, KEPT, LATER)

        path.unlink()
        path.mkdir()
        mark = fault(daemon, mark, "not a regular file but a directory")
        assert_table(daemon, KEPT, LATER)
        path.rmdir()

        replacement = tmp_path / "optin.new"
        replacement.write_text(f"{LATER}\n")
        os.rename(replacement, path)  # the atomic way to replace the table
        daemon.wait_for("opt-in table loaded (file changed)", 5, after=mark)
        assert_table(daemon, LATER, KEPT)
        assert daemon.alive() and daemon.problems() == []


def test_truncated_file_keeps_the_last_table(tmp_path, dns):
    """A file truncated to zero bytes (an interrupted copy, a shell redirection) is a fault,
    not an empty table that would refuse all IPv6 mail with 550."""
    with ServeProcess(tmp_path, settings(dns), optin=f"{KEPT}\n") as daemon:
        mark = len(daemon.log())
        daemon.optin_path.write_bytes(b"")
        fault(daemon, mark, str(daemon.optin_path))
        assert_table(daemon, KEPT, LATER)


def test_unreadable_file_keeps_the_last_table(tmp_path, dns):
    """A file made unreadable (mode 000) logs an error and keeps the last table; readable
    again, it is loaded again. (Root ignores file modes: the daemon runs without the
    capabilities that allow that.)"""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("NOT TESTED: root reads a mode-000 file, and setpriv (util-linux) is "
                    "missing to take that power away from the daemon")
    with ServeProcess(tmp_path, settings(dns), optin=f"{KEPT}\n",
                      file_modes_apply=os.geteuid() == 0) as daemon:
        path = daemon.optin_path
        assert_table(daemon, KEPT, LATER)
        mark = len(daemon.log())
        path.write_text(f"{LATER}\n")
        os.chmod(path, 0)
        os.utime(path, (time.time() + 5, time.time() + 5))  # a change the poll notices
        mark = fault(daemon, mark, "Permission denied")
        assert_table(daemon, KEPT, LATER)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        os.utime(path, (time.time() + 10, time.time() + 10))
        daemon.wait_for("opt-in table loaded (file changed)", 5, after=mark)
        assert_table(daemon, LATER, KEPT)
        assert daemon.alive() and daemon.problems() == []
