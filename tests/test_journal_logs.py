"""Journal-native log lines: sd-daemon priority prefixes when standard output is the journal.

systemd sets ``JOURNAL_STREAM=DEV:INODE`` for StandardOutput=journal; the daemon compares it
with its own stream's ``fstat``. Here the stream is a real file and the variable names (or
does not name) that file's device and inode.
"""

from __future__ import annotations

import io
import os

import pytest
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from policyd_ipv6.daemon.logs import _LineObserver, journal_stream


def dev_ino(path) -> str:
    info = os.stat(path)
    return f"{info.st_dev}:{info.st_ino}"


def test_journal_stream_matches_the_streams_device_and_inode(tmp_path):
    """JOURNAL_STREAM naming the file's dev:inode is the journal; another inode, garbage, no
    variable or a stream without a descriptor is not."""
    path, other = tmp_path / "out", tmp_path / "other"
    other.write_text("")
    with open(path, "w") as stream:
        assert journal_stream(stream, {"JOURNAL_STREAM": dev_ino(path)})
        assert not journal_stream(stream, {"JOURNAL_STREAM": dev_ino(other)})
        assert not journal_stream(stream, {"JOURNAL_STREAM": "x:y"})
        assert not journal_stream(stream, {})
    assert not journal_stream(io.StringIO(), {"JOURNAL_STREAM": dev_ino(path)})


@pytest.mark.parametrize("journal", [True, False])
def test_every_line_carries_its_priority_on_the_journal(tmp_path, monkeypatch, journal):
    """On the journal each line, a traceback's too, starts with <3>, <4>, <6> or <7>; on any
    other stream the lines are unchanged."""
    path = tmp_path / "out"
    with open(path, "w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", dev_ino(path) if journal else "0:0")
        observer = _LineObserver(stream, "debug", None, journal_stream(stream))
        globalLogPublisher.addObserver(observer)
        try:
            for level in (LogLevel.debug, LogLevel.info, LogLevel.warn):
                globalLogPublisher({"log_level": level, "log_format": "{line}",
                                    "log_namespace": "policyd-ipv6", "line": level.name})
            try:
                raise ValueError("boom")
            except ValueError:
                globalLogPublisher({"log_level": LogLevel.error, "log_format": "failed",
                                    "log_namespace": "policyd-ipv6", "log_failure": Failure()})
        finally:
            globalLogPublisher.removeObserver(observer)
    lines = path.read_text().splitlines()
    if journal:
        assert lines[:4] == ["<7>debug debug", "<6>info info", "<4>warn warn", "<3>error failed"]
        assert len(lines) > 5 and all(line.startswith("<3>    ") for line in lines[4:])
    else:
        assert lines[:4] == ["debug debug", "info info", "warn warn", "error failed"]
        assert lines[-1] == "    builtins.ValueError: boom"


@pytest.mark.parametrize("journal", [False, True])
@pytest.mark.parametrize("level", ["info", "warn"])
def test_decision_lines_take_a_short_path_to_the_same_text(journal, level):
    """A decision line (preformatted "{line}", info) is written exactly as the general path
    writes it (which a log_failure key, even None, forces), or dropped alike."""
    event = {"line": 'decision client=2001:db8::1 helo="x" rule=pass reply="DUNNO"',
             "log_level": LogLevel.info, "log_namespace": "policyd-ipv6",
             "log_format": "{line}", "log_time": 0.0}
    short, general = io.StringIO(), io.StringIO()
    _LineObserver(short, level, journal=journal)(dict(event))
    _LineObserver(general, level, journal=journal)(dict(event, log_failure=None))
    assert short.getvalue() == general.getvalue()
    assert (short.getvalue() != "") == (level == "info")
