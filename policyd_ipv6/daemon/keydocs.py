"""The documentation of the configuration keys, generated from the ``Config`` fields.

Contract: ``expected(root)`` returns, for each generated file under the source tree ``root``,
the text it must have: the README's key table (between ``<!-- keys:begin -->`` and
``<!-- keys:end -->``), the KEYS section of policyd-ipv6.toml(5) (between the roff comments
``.\\" keys:begin`` and ``.\\" keys:end``) and the per-key comment blocks of the two sample
configuration files (each keeps its own values; a key the file lacks is added at its default;
the header paragraph and what follows the last key are kept). Each key's text is its
documentation, its bounds and, for a key SIGHUP cannot change, "Changing it needs a restart."

``python3 -m policyd_ipv6.daemon.keydocs --write`` rewrites the stale files;
``--check`` lists them and exits 1 (tests/test_keydocs.py runs the same comparison).
Pure text in, text out: no Twisted, and nothing is written unless ``--write`` is given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

from policyd_ipv6.daemon.config import KEYS, Key

__all__ = ["toml_value", "description", "readme_table", "man_keys", "sample_comments",
           "expected", "TARGETS", "main"]

ROOT = Path(__file__).resolve().parents[2]
RESTART = "Changing it needs a restart."
README_MARKS = ("<!-- keys:begin -->", "<!-- keys:end -->")
MAN_MARKS = ('.\\" keys:begin', '.\\" keys:end')
SAMPLES = ("policyd_ipv6/sample/policyd-ipv6.toml", "postfix-examples/policyd-ipv6.toml")
_WIDTH = 95


def toml_value(value: Any) -> str:
    """A default in TOML syntax (JSON's is the same for the types the keys use)."""
    return json.dumps(value, separators=(", ", ": "))


def description(key: Key) -> str:
    """The key's documentation, then its bounds and whether a change needs a restart."""
    return " ".join(part for part in (key.doc, key.bounds(), RESTART if key.restart else "")
                    if part)


def _markdown(text: str) -> str:
    # Quoted values without spaces ("ptr", endpoint strings) become code: backslashes and
    # underscores in them are then shown as they are written in the file.
    text = re.sub(r'"([^"\s]+)"', r'`"\1"`', text)
    return text.replace("|", "\\|")


def readme_table() -> str:
    """The README's configuration table: key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key.name}` | `{toml_value(key.default)}` | {_markdown(description(key))} |"
             for key in KEYS]
    return "\n".join(rows) + "\n"


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # One sentence per line (roff's convention); a line must not start with a control character.
    lines = re.split(r'(?<=\.) (?=[A-Z"(])', text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in lines)


def man_keys() -> str:
    """The KEYS section's entries of policyd-ipv6.toml(5): ``.TP``, "key = default", text."""
    entries = []
    for key in KEYS:
        entries += [".TP", f"\\fB{_roff(key.name)}\\fR = {_roff(toml_value(key.default))}",
                    _roff(description(key))]
    return "\n".join(entries) + "\n"


def _between(text: str, marks: tuple[str, str], inner: str, where: str) -> str:
    begin, end = marks
    try:
        head, rest = text.split(begin + "\n", 1)
        _old, tail = rest.split(end + "\n", 1)
    except ValueError:
        raise ValueError(f"{where}: the markers {begin!r} and {end!r} are missing") from None
    return head + begin + "\n" + inner + end + "\n" + tail


_KEY_LINE = re.compile(r"^(\w+) = (.*)$")


def sample_comments(text: str) -> str:
    """A sample file with each key's comment block generated and its value kept.

    The header is the first paragraph; the keys follow in schema order (a key that is not in
    the file gets its default); everything after the file's last key line is kept."""
    lines = text.splitlines()
    header = lines[:lines.index("") + 1] if "" in lines else []
    known = {key.name for key in KEYS}
    values: dict[str, str] = {}
    last = len(header) - 1
    for number, line in enumerate(lines):
        match = _KEY_LINE.match(line)
        if match and match.group(1) in known:
            values[match.group(1)] = match.group(2)
            last = number
    tail = lines[last + 1:]
    while tail and not tail[0].strip():
        tail.pop(0)
    out = list(header)
    for key in KEYS:
        if isinstance(key.default, dict):
            continue  # a table ([replies]): documented by the file's own closing comment
        value = values.get(key.name, toml_value(key.default))
        text_ = description(key)
        if tomllib.loads(f"v = {value}")["v"] != key.default:
            text_ += f" (Default: {toml_value(key.default)}.)"
        out += textwrap.wrap(text_, _WIDTH - 2, initial_indent="# ", subsequent_indent="# ",
                             break_on_hyphens=False, break_long_words=False)
        out += [f"{key.name} = {value}", ""]
    return "\n".join(out + tail) + "\n"


def _readme(text: str) -> str:
    return _between(text, README_MARKS, readme_table(), "README.md")


def _man(text: str) -> str:
    return _between(text, MAN_MARKS, man_keys(), "policyd_ipv6/man/policyd-ipv6.toml.5")


TARGETS = (("README.md", _readme), ("policyd_ipv6/man/policyd-ipv6.toml.5", _man),
           *((sample, sample_comments) for sample in SAMPLES))


def expected(root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """Each generated file: (its current text, the text it must have)."""
    found = {}
    for name, render in TARGETS:
        path = root / name
        current = path.read_text(encoding="utf-8")
        found[path] = (current, render(current))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m policyd_ipv6.daemon.keydocs",
        description="Generate the configuration key documentation from the Config fields.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the stale files")
    action.add_argument("--check", action="store_true", help="list stale files, exit 1 if any")
    parser.add_argument("--root", type=Path, default=ROOT, help="the source tree")
    args = parser.parse_args(argv)
    try:
        files = expected(args.root)
    except (OSError, ValueError) as error:
        print(f"keydocs: {error}", file=sys.stderr)
        return 1
    stale = [path for path, (current, wanted) in files.items() if current != wanted]
    for path in stale:
        if args.write:
            path.write_text(files[path][1], encoding="utf-8")
            print(f"rewrote {path}")
        else:
            print(f"stale: {path} (run python3 -m policyd_ipv6.daemon.keydocs --write)")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
