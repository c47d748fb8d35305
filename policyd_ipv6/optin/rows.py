"""The PostgreSQL opt-in source's pure parts: rows to a table, and the connection string as it
may be shown.

Contract: ``table_from_rows(rows, source)`` turns the rows of ``optin_query`` (``(domain,
options)``; ``options`` NULL or the opt-in file's own ``key=value`` words, parsed by
``table.parse_optin``, so a database row means exactly what the same line of the file means)
into a ``Loaded``: the ``OptinTable``, ``text`` (the opt-in file's syntax, what the last-good
copy holds and ``load_optin`` reads back) and ``skipped``, one message per row that was left
out, naming it. A row whose domain fails the file's validation, or whose options are bad, is
skipped, never the whole table (one bad row must not refuse all IPv6 mail). A result that is not
rows of one or two columns raises ``ValueError``.

``redact(conninfo)`` is the libpq connection string (``key=value`` words or a
``postgresql://`` URI) with every password replaced by ``***``: the only form logs and ``check``
ever show. ``secrets(conninfo)`` lists the passwords, to scrub from a driver's messages.
``conninfo(key, value)`` is the configuration parser: a string, "" for none, whose syntax
libpq would accept; its errors never repeat the value. Pure: no I/O, no Twisted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from policyd_ipv6.optin.table import OptinSyntaxError, OptinTable, parse_optin
from policyd_ipv6.text import printable

__all__ = ["Loaded", "table_from_rows", "redact", "secrets", "conninfo", "HEADER"]

HEADER = ("# policyd-ipv6: the last opt-in table loaded from PostgreSQL (optin_postgresql), "
          "served when the database does not answer at start-up. Written by the daemon.\n")
_URI = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
_KEYWORD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*")
_SECRET_KEYS = ("password",)


@dataclass(frozen=True)
class Loaded:
    table: OptinTable
    text: str
    skipped: tuple[str, ...]


def table_from_rows(rows: Iterable[Sequence[object]], source: str) -> Loaded:
    """The table of the good rows, the last-good text, and a message per skipped row."""
    lines: list[str] = []
    skipped: list[str] = []
    for number, row in enumerate(rows, start=1):
        if len(row) not in (1, 2):
            raise ValueError(f"{source}: the query returns {len(row)} columns; it must return "
                             "domain and options")
        domain, options = row[0], (row[1] if len(row) == 2 else None)
        line, why = _line(domain, options)
        if line is not None:
            try:
                parse_optin(line, source)
            except OptinSyntaxError as error:
                line, why = None, error.why
        if line is None:
            skipped.append(f"{source}: row {number} skipped (domain {_show(domain)}, "
                           f"options {_show(options)}): {why}")
            continue
        lines.append(line)
    text = HEADER + "".join(line + "\n" for line in lines)
    return Loaded(parse_optin(text, source), text, tuple(skipped))


def _show(value: object) -> str:
    return "NULL" if value is None else f'"{printable(str(value), 100)}"'


def _line(domain: object, options: object) -> tuple[str | None, str]:
    """The row as one line of the opt-in file, or None and why it cannot be one."""
    if not isinstance(domain, str) or not domain.strip():
        return None, "the domain is not text"
    if options is not None and not isinstance(options, str):
        return None, "the options are not text"
    domain, words = domain.strip(), (options or "").strip()
    # One line, one domain word: anything that would make the line mean something else.
    if any(c.isspace() or c == "#" for c in domain) or "#" in words or any(
            c in words for c in "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"):
        return None, "not a domain name followed by options"
    return (f"{domain} {words}" if words else domain), ""


def _words(text: str) -> list[tuple[str, str]]:
    """libpq's key=value words; ValueError naming the problem (never the value)."""
    words: list[tuple[str, str]] = []
    at = 0
    while at < len(text):
        if text[at:].strip() == "":
            break
        match = _KEYWORD.match(text, at)
        if match is None:
            raise ValueError("expected key=value words or a postgresql:// URI")
        key, at = match.group(1), match.end()
        value: list[str] = []
        if text[at:at + 1] == "'":
            at += 1
            while at < len(text) and text[at] != "'":
                if text[at] == "\\" and at + 1 < len(text):
                    at += 1
                value.append(text[at])
                at += 1
            if at >= len(text):
                raise ValueError(f"the quoted value of {key} has no closing quote")
            at += 1
        else:
            while at < len(text) and not text[at].isspace():
                if text[at] == "\\" and at + 1 < len(text):
                    at += 1
                value.append(text[at])
                at += 1
        words.append((key, "".join(value)))
    return words


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def secrets(text: str) -> list[str]:
    """The passwords a connection string holds (to scrub from driver messages)."""
    if _URI.match(text):
        parts = urlsplit(text)
        found = [unquote(parts.password)] if parts.password else []
        return found + [v for k, v in parse_qsl(parts.query) if k in _SECRET_KEYS and v]
    try:
        return [v for k, v in _words(text) if k in _SECRET_KEYS and v]
    except ValueError:
        return []


def redact(text: str) -> str:
    """The connection string with each password replaced by ``***``."""
    if _URI.match(text):
        parts = urlsplit(text)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hosts = netloc.rpartition("@")
            netloc = quote(unquote(userinfo.partition(":")[0]), safe="") + ":***@" + hosts
        query = urlencode([(k, "***" if k in _SECRET_KEYS else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)],
                          safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    try:
        words = _words(text)
    except ValueError:
        return "(a connection string that does not parse)"
    return " ".join(f"{k}=***" if k in _SECRET_KEYS else f"{k}={_quote(v)}" if (
        not v or any(c.isspace() or c in "'\\" for c in v)) else f"{k}={v}" for k, v in words)


def conninfo(key: str, value: object) -> str:
    """The configuration parser of ``optin_postgresql``."""
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be a string (a libpq connection string or URI)")
    if value and not _URI.match(value):
        try:
            if not _words(value):
                raise ValueError("no key=value word")
        except ValueError as error:
            # Never repeat the value: it may hold a password.
            raise ValueError(f"{key} (not shown: it may hold a password): {error}") from None
    return value
