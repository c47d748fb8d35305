"""The opt-in table: which recipient domains accept mail over IPv6.

File format (one entry per line): ``example.com`` matches that domain exactly;
``.example.com`` matches its subdomains only, not example.com itself (as in Postfix tables,
parent_domain_matches_subdomains off). Blank lines, surrounding white space and ``#`` comments
(whole-line or trailing) are ignored. Matching ignores case and a trailing dot; U-labels and
A-labels (IDNA) are equivalent.

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
from dataclasses import dataclass

from policyd_ipv6.names import domain_key

__all__ = ["OptinTable", "OptinSyntaxError", "parse_optin", "load_optin"]

# An opt-in file larger than this is a mistake (a wrong path, a log file), not a table.
MAX_OPTIN_BYTES = 16 * 1024 * 1024


class OptinSyntaxError(ValueError):
    """A line of the opt-in file is not a domain name; ``lineno`` and ``line`` say which."""

    def __init__(self, source: str, lineno: int, line: str, why: str) -> None:
        super().__init__(f"{source}, line {lineno}: {why}: {line!r}")
        self.source, self.lineno, self.line, self.why = source, lineno, line, why


@dataclass(frozen=True)
class OptinTable:
    """Exact domains and parent domains (for ``.example.com`` entries), both as domain keys."""

    exact: frozenset[str]
    parents: frozenset[str]

    def __len__(self) -> int:
        return len(self.exact) + len(self.parents)

    def matches(self, domain: str | None) -> bool:
        """True if the recipient domain has opted in. ``None`` or a non-domain never matches."""
        if domain is None:
            return False
        key = domain_key(domain)
        if key is None:
            return False
        if key in self.exact:
            return True
        # Walk up the parents: a.b.example.com is under .b.example.com and .example.com.
        rest = key
        while "." in rest:
            rest = rest.split(".", 1)[1]
            if rest in self.parents:
                return True
        return False


def parse_optin(text: str, source: str = "<opt-in table>") -> OptinTable:
    """Parse the opt-in file's text; raise OptinSyntaxError at the first bad line."""
    exact: set[str] = set()
    parents: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        if any(ch.isspace() for ch in entry):
            raise OptinSyntaxError(source, lineno, raw, "more than one word on a line")
        subdomains = entry.startswith(".")
        key = domain_key(entry[1:] if subdomains else entry)
        if key is None:
            raise OptinSyntaxError(source, lineno, raw, "not a domain name")
        (parents if subdomains else exact).add(key)
    return OptinTable(frozenset(exact), frozenset(parents))


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
