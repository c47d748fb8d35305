"""The instructions of debian/README.Debian, read back so that the tests follow them literally.

Contract (pure text functions; they raise ValueError when README.Debian no longer has the part):
- `main_cf_lines(text)` is the block an administrator pastes into main.cf (the indented lines
  after "Add to /etc/postfix/main.cf:"), as one string ending in a newline.
- `tcp_recipe(text)` returns the steps of "Using TCP instead of a Unix socket": `listen`
  (the TOML line's list) and `check_policy_service` (the main.cf line).
- `milter_main_cf_lines(text)` is the block of main.cf lines of the optional milter section.
"""

from __future__ import annotations

import tomllib


def _indented_block_after(text: str, marker: str) -> list[str]:
    lines = text.splitlines()
    try:
        at = next(i for i, line in enumerate(lines) if line.strip() == marker)
    except StopIteration:
        raise ValueError("README.Debian has no line %r" % marker) from None
    block = []
    for line in lines[at + 1:]:
        if not line.strip():
            if block:
                break
            continue
        if not line.startswith("    "):
            break
        block.append(line[4:])
    if not block:
        raise ValueError("README.Debian has no indented block after %r" % marker)
    return block


def main_cf_lines(text: str) -> str:
    """The main.cf lines README.Debian tells the administrator to add."""
    return "\n".join(_indented_block_after(text, "Add to /etc/postfix/main.cf:")) + "\n"


def _one_line(text: str, start: str) -> str:
    found = [line.strip() for line in text.splitlines() if line.strip().startswith(start)]
    if len(found) != 1:
        raise ValueError("README.Debian should have one line starting with %r, has %d"
                         % (start, len(found)))
    return found[0]


def tcp_recipe(text: str) -> dict:
    """The TCP steps of README.Debian (see the module docstring)."""
    section = text.split("Using TCP instead of a Unix socket", 1)
    if len(section) != 2:
        raise ValueError("README.Debian has no TCP section")
    body = section[1]
    return {
        "listen": tomllib.loads(_one_line(body, "listen = "))["listen"],
        "check_policy_service": _one_line(body, "check_policy_service "),
    }


def milter_main_cf_lines(text: str) -> str:
    """The main.cf lines README.Debian gives for the built-in milter."""
    section = text.split("the built-in milter)", 1)
    if len(section) != 2:
        raise ValueError("README.Debian has no milter section")
    return "\n".join(_indented_block_after(section[1], "then add to /etc/postfix/main.cf:")) \
        + "\n"
