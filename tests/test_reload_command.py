"""``policyd-ipv6 reload --pid PID``: the unit's ExecReload=, which needs no ``kill`` binary.

The command sends SIGHUP to the running daemon; with ``--config`` (as the unit runs it) it first
checks that configuration as ``configtest`` does and refuses to signal when it would not load.
A process id that cannot be the daemon, or a process that is gone, is an error naming the id
(exit status 1).
"""

import os
import socket
import subprocess
import sys

import pytest
from test_cli import ROOT, Daemon, write_config

from policyd_ipv6.daemon.cli import main


@pytest.mark.parametrize("pid", ["0", "1", "-1", "-42"])
def test_reload_refuses_process_ids_that_are_no_daemon(pid, capsys):
    """0, 1 and negative ids (process groups, init) are refused with status 1, unsignalled."""
    assert main(["reload", "--pid", pid]) == 1
    assert f"--pid {pid} is not a daemon's process id" in capsys.readouterr().err


@pytest.mark.process
def test_reload_of_a_process_that_is_gone_fails_naming_it():
    """A pid with no process behind it gives status 1 and a message naming the pid."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    result = subprocess.run([sys.executable, "-m", "policyd_ipv6", "reload", "--pid",
                             str(gone.pid)], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert f"cannot signal process {gone.pid}: No such process" in result.stderr


@pytest.mark.process
def test_reload_makes_the_running_daemon_reread_its_configuration(tmp_path, knot):
    """reload --pid of a serving daemon makes it re-read the configuration and the opt-in
    table exactly as SIGHUP does, with no configuration option of its own."""
    config = write_config(tmp_path, knot, ["tcp:0:interface=127.0.0.1"])
    daemon = Daemon(config)
    try:
        result = subprocess.run([sys.executable, "-m", "policyd_ipv6", "reload", "--pid",
                                 str(daemon.process.pid)], cwd="/", capture_output=True,
                                text=True, timeout=30,
                                env={**os.environ, "PYTHONPATH": ROOT})
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        daemon.wait_for("configuration reloaded (SIGHUP)")
    finally:
        daemon.stop()
    assert daemon.process.returncode == 0


@pytest.mark.process
def test_reload_with_a_bad_configuration_is_refused_and_the_daemon_not_signalled(tmp_path, knot):
    """reload --config FILE --pid PID checks FILE first: a bad edit gives status 1 with the
    error naming the key, and the daemon gets no SIGHUP (systemctl reload fails visibly)."""
    config = write_config(tmp_path, knot, ["tcp:0:interface=127.0.0.1"])
    daemon = Daemon(config)
    try:
        with open(config, "a") as handle:
            handle.write("dns_attempts = 99\n")
        result = subprocess.run([sys.executable, "-m", "policyd_ipv6", "reload", "--config",
                                 config, "--pid", str(daemon.process.pid)], cwd="/",
                                capture_output=True, text=True, timeout=30,
                                env={**os.environ, "PYTHONPATH": ROOT})
        assert result.returncode == 1
        assert "dns_attempts = 99" in result.stderr and "not signalled" in result.stderr
        text = daemon.text()
    finally:
        daemon.stop()
    assert "SIGHUP" not in text


@pytest.mark.process
def test_reload_signals_at_once_whatever_the_database_does(tmp_path):
    """reload --config with optin_postgresql leaves the database alone: one that never answers
    (and no last-good copy) does not hold the check for optin_connect_timeout_seconds, past the
    start timeout systemd applies to ExecReload=; the daemon is signalled at once."""
    pytest.importorskip("psycopg")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # accepts nothing, answers nothing
        config = tmp_path / "p.toml"
        config.write_text('listen = ["tcp:0:interface=127.0.0.1"]\n'
                          f'optin_postgresql = "host=127.0.0.1 port={silent.getsockname()[1]} '
                          'dbname=mail user=policyd"\noptin_connect_timeout_seconds = 120\n'
                          f'state_directory = "{tmp_path}"\nnameservers = ["127.0.0.1:9"]\n')
        target = subprocess.Popen(
            [sys.executable, "-c", "import signal, sys, time\n"
             "signal.signal(signal.SIGHUP, lambda *a: sys.exit(7))\n"
             "print('waiting', flush=True)\ntime.sleep(60)\n"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert target.stdout.readline() == "waiting\n"  # its SIGHUP handler is in place
            result = subprocess.run([sys.executable, "-m", "policyd_ipv6", "reload", "--config",
                                     str(config), "--pid", str(target.pid)], cwd="/",
                                    capture_output=True, text=True, timeout=30,
                                    env={**os.environ, "PYTHONPATH": ROOT})
            assert result.returncode == 0, result.stderr
            assert "configuration OK" in result.stdout and "not read" in result.stdout
            assert target.wait(10) == 7
        finally:
            target.kill()
            target.wait()
            target.stdout.close()
