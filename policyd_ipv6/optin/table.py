"""The opt-in table: which recipient domains accept mail over IPv6.

File format (one entry per line): ``example.com`` matches that domain exactly;
``.example.com`` matches its subdomains only, not example.com itself (as in Postfix tables,
parent_domain_matches_subdomains off). Blank lines, surrounding white space and ``#`` comments
(whole-line or trailing) are ignored. Matching ignores case and a trailing dot; U-labels and
A-labels (IDNA) are equivalent.

Options may follow the domain on its line, Postfix-style ``key=value`` words:
``example.com mode=report rdns=fcrdns``. ``mode`` (``enforce`` or ``report``) overrides the
configuration's ``mode`` for that entry, in both directions; ``rdns`` (``ptr`` or ``fcrdns``)
its ``rdns``. An unknown key, a bad value or a key given twice is a syntax error naming the
line. ``entry(domain)`` returns the ``OptinEntry`` (the options) of the entry that matches, an
exact entry before a parent one, the nearest parent first.

``parse_optin(text)`` returns an immutable ``OptinTable`` or raises ``OptinSyntaxError`` naming
the first bad line. ``load_optin(path)`` reads a file (raising ``OSError`` or
``OptinSyntaxError``; an empty file is refused, a file of comments is an empty table; anything
but a regular file, a FIFO or a device, is refused with an ``OSError`` saying what it is,
without blocking on it). Reloading on change is the job of the service (``optin_watch``); this
module is pure apart from the one file read in ``load_optin``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from policyd_ipv6.names import domain_key

__all__ = ["OptinTable", "OptinEntry", "OptinSyntaxError", "parse_optin", "load_optin",
           "OPTIONS"]

# An opt-in file larger than this is a mistake (a wrong path, a log file), not a table.
MAX_OPTIN_BYTES = 16 * 1024 * 1024
# The per-entry options and their values (the configuration keys they override).
OPTIONS = {"mode": ("enforce", "report"), "rdns": ("ptr", "fcrdns")}


class OptinSyntaxError(ValueError):
    """A line of the opt-in file is not a domain name; ``lineno`` and ``line`` say which."""

    def __init__(self, source: str, lineno: int, line: str, why: str) -> None:
        super().__init__(f"{source}, line {lineno}: {why}: {line!r}")
        self.source, self.lineno, self.line, self.why = source, lineno, line, why


@dataclass(frozen=True)
class OptinEntry:
    """The options of one entry; None: the configuration's value applies."""

    mode: str | None = None
    rdns: str | None = None


_PLAIN = OptinEntry()


@dataclass(frozen=True)
class OptinTable:
    """Exact domains and parent domains (for ``.example.com`` entries), both as domain keys,
    each with its options."""

    exact: Mapping[str, OptinEntry]
    parents: Mapping[str, OptinEntry]

    def __len__(self) -> int:
        return len(self.exact) + len(self.parents)

    def matches(self, domain: str | None) -> bool:
        """True if the recipient domain has opted in. ``None`` or a non-domain never matches."""
        return self.entry(domain) is not None

    def entry(self, domain: str | None) -> OptinEntry | None:
        """The options of the entry the recipient domain matches, or None (not opted in)."""
        if domain is None:
            return None
        key = domain_key(domain)
        if key is None:
            return None
        found = self.exact.get(key)
        if found is not None:
            return found
        # Walk up the parents: a.b.example.com is under .b.example.com and .example.com.
        rest = key
        while "." in rest:
            rest = rest.split(".", 1)[1]
            found = self.parents.get(rest)
            if found is not None:
                return found
        return None


def parse_optin(text: str, source: str = "<opt-in table>") -> OptinTable:
    """Parse the opt-in file's text; raise OptinSyntaxError at the first bad line."""
    exact: dict[str, OptinEntry] = {}
    parents: dict[str, OptinEntry] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        entry, options = words[0], _options(words[1:], source, lineno, raw)
        subdomains = entry.startswith(".")
        key = domain_key(entry[1:] if subdomains else entry)
        if key is None or "=" in entry:
            raise OptinSyntaxError(source, lineno, raw, "not a domain name")
        (parents if subdomains else exact)[key] = options
    return OptinTable(exact, parents)


def _options(words: list[str], source: str, lineno: int, raw: str) -> OptinEntry:
    if not words:
        return _PLAIN
    given: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or name not in OPTIONS:
            raise OptinSyntaxError(source, lineno, raw, f"unknown option {word!r} (options: "
                                   + ", ".join(f"{k}=" for k in OPTIONS) + ")")
        if value not in OPTIONS[name]:
            raise OptinSyntaxError(source, lineno, raw, f"{name}={value!r}: must be "
                                   + " or ".join(OPTIONS[name]))
        if name in given:
            raise OptinSyntaxError(source, lineno, raw, f"option {name} given twice")
        given[name] = value
    return OptinEntry(**given)


def load_optin(path: str) -> OptinTable:
    """Read and parse the opt-in file. Raises OSError or OptinSyntaxError."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, with the
    # reactor stopped. What is not a regular file is refused before any read.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"not a regular file but {_kind(mode)}", path)
    with open(fd, "rb") as handle:
        data = handle.read(MAX_OPTIN_BYTES + 1)
    if len(data) > MAX_OPTIN_BYTES:
        raise OptinSyntaxError(path, 0, "", f"file larger than {MAX_OPTIN_BYTES} bytes")
    if not data.strip():
        # A zero-byte file is what a crash or a half-done copy leaves: never read it as "no
        # domain opted in", which would refuse all IPv6 mail. An intentionally empty table is
        # a file with a comment line.
        raise OptinSyntaxError(path, 0, "", "the file is empty (write a comment line if no "
                               "domain is to accept mail over IPv6)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        lineno = data[: error.start].count(b"\n") + 1
        raise OptinSyntaxError(path, lineno, "", "not UTF-8 text") from None
    return parse_optin(text, source=path)


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, for the error message."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"
