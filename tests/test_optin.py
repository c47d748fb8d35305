"""Tests of the opt-in table (policyd_ipv6.optin) and its watcher (policyd_ipv6.optin_watch)."""

import errno
import os

import pytest
from twisted.internet import task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from policyd_ipv6.optin import watch
from policyd_ipv6.optin.table import OptinSyntaxError, load_optin, parse_optin
from policyd_ipv6.optin.watch import OptinWatcher

TEXT = """
# opted-in domains
contoso.com
  Fabrikam.COM.   # trailing dot and case do not matter
.example.org      # subdomains only
bücher.example
xn--caf-dma.example
"""


@pytest.mark.parametrize("domain, expected", [
    ("contoso.com", True),
    ("CONTOSO.COM.", True),
    ("fabrikam.com", True),
    ("sub.contoso.com", False),        # exact entry: no subdomains
    ("example.org", False),            # .example.org: not the parent itself
    ("a.example.org", True),
    ("a.b.example.org", True),
    ("xn--bcher-kva.example", True),   # A-label of a U-label entry
    ("café.example", True),            # U-label of an A-label entry
    ("other.com", False),
    ("[192.0.2.1]", False),
    (None, False),
    ("", False),
])
def test_matching(domain, expected):
    """Exact and subdomain entries match as in Postfix tables, ignoring case, dot and IDNA form."""
    assert parse_optin(TEXT).matches(domain) is expected


@pytest.mark.parametrize("line", ["two words", "bad_domain!.com", "-x.com", "a..b"])
def test_bad_line_names_the_line(line):
    """A line that is not a domain name raises OptinSyntaxError with its line number."""
    with pytest.raises(OptinSyntaxError) as info:
        parse_optin("ok.com\n" + line + "\n", source="optin")
    assert info.value.lineno == 2
    assert "optin, line 2" in str(info.value)


def test_empty_file_is_an_empty_table():
    """Only comments and blank lines: an empty table (legal, every domain refused)."""
    assert len(parse_optin("# nothing\n\n")) == 0


def test_watcher_reloads_on_change_and_keeps_last_good_table(tmp_path):
    """The watcher picks up edits; a broken or deleted file leaves the last good table in force."""
    path = tmp_path / "optin"
    path.write_text("contoso.com\n")
    clock = task.Clock()
    watcher = OptinWatcher(str(path), clock, 5.0)
    watcher.start()
    assert watcher().matches("contoso.com")

    path.write_text("contoso.com\nfabrikam.com\n")
    os.utime(path, ns=(1, 10**18))  # make the change visible even within one mtime tick
    clock.advance(5)
    assert watcher().matches("fabrikam.com")

    path.write_text("not a domain!\n")
    clock.advance(5)
    assert watcher().matches("fabrikam.com")  # previous table kept

    path.unlink()
    clock.advance(5)
    assert watcher().matches("contoso.com")

    path.write_text("woodgrove.com\n")
    assert watcher.reload("SIGHUP") is True
    assert watcher().matches("woodgrove.com") and not watcher().matches("contoso.com")
    watcher.stop()


def test_watcher_refuses_to_start_without_a_good_file(tmp_path):
    """At start-up a missing or invalid file raises (never an empty table)."""
    with pytest.raises(OSError):
        OptinWatcher(str(tmp_path / "missing"), task.Clock(), 5.0)
    bad = tmp_path / "bad"
    bad.write_text("a b\n")
    with pytest.raises(OptinSyntaxError):
        OptinWatcher(str(bad), task.Clock(), 5.0)


@pytest.fixture
def logged():
    """The daemon's log events while the test runs, as (level, text) pairs."""
    events: list = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [(e["log_level"], formatEvent(e)) for e in events
                   if e.get("log_namespace") == "policyd-ipv6"]
    globalLogPublisher.removeObserver(events.append)


def hide(monkeypatch, path, stat_errno=None, readable=True):
    """From now on the process sees ``path`` as an unprivileged user would: ``os.stat`` fails
    with ``stat_errno`` (a directory above it is mode 700) or ``os.access`` says it is not
    readable (the file itself is mode 600). (The tests run as root, which modes do not stop.)"""
    real_stat, real_access = os.stat, os.access

    def stat(name, *args, **kwargs):
        if stat_errno is not None and os.fspath(name) == str(path):
            raise OSError(stat_errno, os.strerror(stat_errno), str(name))
        return real_stat(name, *args, **kwargs)

    def access(name, mode, *args, **kwargs):
        if not readable and os.fspath(name) == str(path):
            return False
        return real_access(name, mode, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "access", access)


def test_file_hidden_by_the_privilege_drop_warns_once_and_is_no_change(tmp_path, monkeypatch,
                                                                        logged):
    """A file loaded as root that the dropped user cannot stat (a clone in /root) logs one
    warning naming the file, the user and the remedy at start, and no error at each poll."""
    path = tmp_path / "optin"
    path.write_text("contoso.com\n")
    clock = task.Clock()
    watcher = OptinWatcher(str(path), clock, 5.0)
    hide(monkeypatch, path, stat_errno=errno.EACCES)
    watcher.start()
    for _ in range(5):
        clock.advance(5)
    events = logged()
    assert [level for level, _text in events] == [LogLevel.warn], events
    text = events[0][1]
    user = watch._running_user()
    assert str(path) in text and f"user {user}" in text
    assert f"not picked up until restart: make it readable by {user}" in text
    assert watcher.failures == 0 and watcher().matches("contoso.com")

    monkeypatch.undo()  # the directory made readable, the file edited: picked up
    path.write_text("fabrikam.com\n")
    clock.advance(5)
    assert watcher().matches("fabrikam.com")
    assert [level for level, _text in logged()][1:] == [LogLevel.info]
    watcher.stop()


def test_unreadable_file_warns_at_start_and_a_later_change_is_an_error(tmp_path, monkeypatch,
                                                                       logged):
    """A file the dropped user can stat but not read warns once at start; a genuine change
    it then cannot read is still an error that keeps the previous table."""
    path = tmp_path / "optin"
    path.write_text("contoso.com\n")
    clock = task.Clock()
    watcher = OptinWatcher(str(path), clock, 5.0)
    hide(monkeypatch, path, readable=False)
    watcher.start()
    clock.advance(5)
    assert [level for level, _text in logged()] == [LogLevel.warn]

    def denied(name):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)

    monkeypatch.setattr(watch, "load_optin", denied)
    path.write_text("contoso.com\nfabrikam.com\n")
    os.utime(path, ns=(1, 10**18))  # make the change visible even within one mtime tick
    clock.advance(5)
    events = logged()
    assert [level for level, _text in events] == [LogLevel.warn, LogLevel.error]
    assert "not reloaded (file changed)" in events[1][1] and "Permission denied" in events[1][1]
    assert watcher.failures == 1 and not watcher().matches("fabrikam.com")
    watcher.stop()


def test_readable_file_starts_without_a_warning(tmp_path, logged):
    """A file the running user can read starts the watcher silently."""
    path = tmp_path / "optin"
    path.write_text("contoso.com\n")
    watcher = OptinWatcher(str(path), task.Clock(), 5.0)
    watcher.start()
    assert logged() == []
    watcher.stop()


def test_load_refuses_non_utf8(tmp_path):
    """A file that is not UTF-8 is a syntax error naming the line."""
    path = tmp_path / "optin"
    path.write_bytes(b"ok.com\n\xff\xfe\n")
    with pytest.raises(OptinSyntaxError, match="line 2"):
        load_optin(str(path))


def test_empty_file_is_refused_but_comments_only_is_an_empty_table(tmp_path):
    """A zero-byte file is an error (truncation), a file of comments a deliberate empty table."""
    path = tmp_path / "optin"
    path.write_bytes(b"")
    with pytest.raises(OptinSyntaxError, match="empty"):
        load_optin(str(path))
    path.write_text("# no domain accepts IPv6 mail yet\n")
    assert len(load_optin(str(path))) == 0


@pytest.mark.parametrize("entry, domain, expected", [
    ("straße.de", "strasse.de", False),            # IDNA 2003 mapped ß to ss; 2008 does not
    ("straße.de", "xn--strae-oqa.de", True),       # the IDNA 2008 A-label of straße
    ("straße.de", "STRASSE.DE", False),
    ("strasse.de", "straße.de", False),
    ("xn--strae-oqa.de", "Straße.de", True),       # UTS #46 maps case first
    ("bücher.example", "ｂüｃｈｅｒ．example", True),  # UTS #46: full-width letters and dot
    ("bücher.example", "bu\u0308cher.example", True),   # decomposed ü is the same name (NFC)
])
def test_matching_uses_idna_2008_with_uts46_mapping(entry, domain, expected):
    """U-labels become A-labels by IDNA 2008 after the UTS #46 mapping: straße is not strasse."""
    assert parse_optin(entry + "\n").matches(domain) is expected


@pytest.mark.parametrize("make, kind", [
    (lambda path: os.mkfifo(path), "a FIFO"),
    (lambda path: os.symlink("/dev/null", path), "a character device"),
    (lambda path: os.mkdir(path), "a directory"),
])
def test_special_files_are_refused_without_blocking(tmp_path, make, kind):
    """A FIFO (which would block the reader until a writer comes), a device or a directory is
    refused at once with an OSError saying what it is, not read."""
    import signal

    def blocked(signum, frame):
        raise TimeoutError("load_optin blocked")

    path = tmp_path / "optin"
    make(str(path))
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(5)  # a blocked open would otherwise hang the test run
    try:
        with pytest.raises(OSError, match=f"not a regular file but {kind}"):
            load_optin(str(path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
