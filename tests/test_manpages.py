"""The Debian man pages stay in step with the code they document.

The KEYS section of policyd-ipv6.toml(5) is generated from the ``Config`` fields (its
staleness test is tests/test_keydocs.py); here it must say which keys need a restart, and the
REPLIES section must have one entry per reply text of ``[replies]`` with its default.
policyd-ipv6(8) must have an entry for every subcommand and option of the command line (read
from the argparse parser itself) and none for an option that does not exist. Both pages carry
the program's version and render without a groff warning (lintian checks the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from policyd_ipv6 import __version__
from policyd_ipv6.daemon import cli
from policyd_ipv6.policy.replies import Replies

MAN = Path(__file__).resolve().parents[1] / "policyd_ipv6" / "man"
PAGE_8 = MAN / "policyd-ipv6.8"
PAGE_5 = MAN / "policyd-ipv6.toml.5"


def plain(roff: str) -> str:
    """Roff text with font changes removed and the escapes used in these pages resolved."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    for escape, char in ((r"\-", "-"), (r"\(dq", '"'), (r"\e", "\\"), (r"\&", ""),
                         (r"\(lq", '"'), (r"\(rq", '"')):
        text = text.replace(escape, char)
    return text


def sections(roff: str) -> dict[str, list[str]]:
    """The lines of each .SH section (name without quotes), as plain text."""
    found: dict[str, list[str]] = {}
    current = None
    for line in roff.splitlines():
        if line.startswith(".SH "):
            current = line[4:].strip().strip('"')
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return found


def _tag(line: str) -> str:
    """A .TP tag line as plain text, with a leading font macro and its quotes removed."""
    if line.startswith("."):
        line = re.sub(r'^\.\w+\s*', "", line).replace('" "', " ").replace('"', "")
    return plain(line).strip()


def entries(lines: list[str]) -> dict[str, list[str]]:
    """Each .TP entry of a section: its tag (plain text) -> the raw lines of its body."""
    found: dict[str, list[str]] = {}
    body = None
    for before, line in zip([""] + lines, lines):
        if before.strip() == ".TP":
            body = found.setdefault(_tag(line), [])
        elif line.strip() == ".TP" or line.startswith((".SS", ".PP")):
            body = None
        elif body is not None:
            body.append(line)
    return found


def tagged_items(lines: list[str]) -> list[str]:
    """The tag of every .TP entry of a section."""
    return [_tag(line) for before, line in zip(lines, lines[1:]) if before.strip() == ".TP"]


def test_every_reply_text_is_documented_with_its_default():
    """The REPLIES section has exactly one "name = default text" entry per reply of [replies]."""
    tags = tagged_items(sections(PAGE_5.read_text())["REPLIES"])
    expected = ['%s = "%s"' % (f.name, f.default) for f in dataclasses.fields(Replies)]
    assert sorted(tags) == sorted(expected)


def _commands_and_options() -> tuple[list[str], set[str]]:
    """(subcommand names, every option string) of the real command-line parser."""
    parser = cli._parser()
    options = {s for a in parser._actions for s in a.option_strings}
    commands = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands.append(name)
                options |= {s for a in sub._actions for s in a.option_strings}
    return commands, options


def test_every_command_and_option_is_documented():
    """policyd-ipv6(8) has a .TP entry for each subcommand and each option of cli.py."""
    page = sections(PAGE_8.read_text())
    command_tags = tagged_items(page["COMMANDS"])
    option_tags = " ".join(tagged_items(page["OPTIONS"])).replace(",", " ").split()
    commands, options = _commands_and_options()
    assert commands, "the parser has no subcommands: this test reads it wrongly"
    assert [c for c in commands if c not in command_tags] == []
    assert sorted(o for o in options if o not in option_tags) == []


def test_no_unknown_option_is_documented():
    """Every option policyd-ipv6(8) documents in OPTIONS exists in cli.py, as does each command."""
    page = sections(PAGE_8.read_text())
    commands, options = _commands_and_options()
    documented = [w for w in " ".join(tagged_items(page["OPTIONS"])).replace(",", " ").split()
                  if w.startswith("-")]
    assert [o for o in documented if o not in options] == []
    assert [c for c in tagged_items(page["COMMANDS"]) if c not in commands] == []


def test_log_level_choices_are_documented():
    """The --log-level values in policyd-ipv6(8) are exactly the parser's choices."""
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    (level,) = [a for a in serve._actions if "--log-level" in a.option_strings]
    (body,) = [b for tag, b in entries(sections(PAGE_8.read_text())["OPTIONS"]).items()
               if tag.startswith("--log-level")]
    shown = re.findall(r"^\.BR? (\w+)", "\n".join(body), re.M)
    assert sorted(set(shown)) == sorted(level.choices)


@pytest.mark.parametrize("page", [PAGE_8, PAGE_5], ids=lambda p: p.name)
def test_pages_carry_the_program_version(page):
    """The .TH line names the version in policyd_ipv6/__init__.py."""
    (th,) = [line for line in page.read_text().splitlines() if line.startswith(".TH ")]
    assert '"policyd\\-ipv6 %s"' % __version__ in th


@pytest.mark.process
@pytest.mark.parametrize("page", [PAGE_8, PAGE_5], ids=lambda p: p.name)
def test_pages_render_without_warnings(page):
    """man(1) formats the page without a single groff warning (lintian's groff-message check)."""
    if not shutil.which("man"):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but man(1) is not installed (Debian package man-db)")
        pytest.skip("NOT TESTED: man(1) is not installed (Debian package man-db)")
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    run = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stderr == "", run.stderr


def test_keys_that_need_a_restart_say_so():
    """Each key SIGHUP cannot change (config.RESTART_KEYS) is documented as needing a restart."""
    from policyd_ipv6.daemon.config import RESTART_KEYS

    documented = {tag.split(" = ", 1)[0]: plain(" ".join(body))
                  for tag, body in entries(sections(PAGE_5.read_text())["KEYS"]).items()}
    for key in RESTART_KEYS:
        assert "Changing it needs a restart" in documented[key], key
    others = [k for k, text in documented.items()
              if "needs a restart" in text and k not in RESTART_KEYS]
    assert others == [], "documented as needing a restart, but SIGHUP applies them: %s" % others


def test_sighup_sends_the_reader_to_the_keys_marked_restart():
    """policyd-ipv6(8)'s SIGHUP entry names the restart-only keys by policyd-ipv6.toml(5)'s
    mark, and each key it names there as an example is one of config.RESTART_KEYS."""
    from policyd_ipv6.daemon.config import KEYS, RESTART_KEYS

    def text(line: str) -> str:  # a font macro's arguments, as man(1) joins them
        macro, _, rest = line.partition(" ")
        if macro in (".B", ".I"):
            return " ".join(shlex.split(rest))
        if macro in (".BR", ".RB", ".IR", ".RI", ".BI", ".IB"):
            return "".join(shlex.split(rest))
        return line

    body = entries(sections(PAGE_8.read_text())["SIGNALS"])["SIGHUP"]
    sighup = plain(" ".join(text(line) for line in body))
    [sentence] = [s for s in sighup.split(". ") if "restart" in s]
    assert 'policyd-ipv6.toml(5) marks "Changing it needs a restart"' in sentence, sentence
    names = {key.name for key in KEYS}
    named = [word for word in re.findall(r"[a-z_]+", sentence) if word in names]
    assert named and set(named) <= set(RESTART_KEYS), sentence
