"""Send one SMTP transaction with swaks (optionally inside a namespace) and read its replies.

Contract: `send(...)` runs swaks once and returns an `SmtpResult`, whatever the server said
(a refusal is a result, not an exception; only a swaks that cannot run at all raises).
`SmtpResult.replies` is the list of (command, code, text) in order, where `command` is the
client line that the reply answers ("EHLO x", "MAIL FROM:<a>", "RCPT TO:<b>", "DATA", "." for
the end of the message, "" for the greeting); multi-line replies are joined with spaces.
`rcpt_reply(recipient)` and `final_reply()` pick out the replies tests assert on, and
`transcript` (swaks' whole output) goes into every assertion message.

swaks marks the lines it sends with "->", the server's with "<-" (or "<**" when the reply is an
error), and its own notes with "===" / "***"; the message body, between DATA's 354 and ".", is
skipped. IPv6 needs the Perl module IO::Socket::INET6 (Debian: libio-socket-inet6-perl).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

from .netns import Namespace

SWAKS = shutil.which("swaks") or "/usr/bin/swaks"

_SERVER = re.compile(r"^\s*(?:<-|<\*\*|<~|<~\*)\s+(\d{3})([ -])(.*)$")
_CLIENT = re.compile(r"^\s*(?:->|\*\*>|~>)\s(.*)$")


def swaks_unavailable() -> str | None:
    """None when swaks with IPv6 support is installed, else a sentence saying what is missing."""
    if not shutil.which("swaks"):
        return "swaks is not installed (Debian package swaks)"
    probe = subprocess.run(["perl", "-MIO::Socket::INET6", "-e", "1"], capture_output=True)
    if probe.returncode != 0:
        return "swaks cannot speak IPv6: install libio-socket-inet6-perl"
    return None


@dataclass
class SmtpResult:
    """What swaks saw: its exit status, its transcript and the parsed server replies."""

    exit_code: int
    transcript: str
    replies: list[tuple[str, str, str]] = field(default_factory=list)
    subject: str = ""

    def replies_to(self, command_prefix: str) -> list[str]:
        """'CODE text' of every reply to a command starting with `command_prefix` (any case)."""
        prefix = command_prefix.upper()
        return ["%s %s" % (code, text) for cmd, code, text in self.replies
                if cmd.upper().startswith(prefix)]

    def rcpt_reply(self, recipient: str) -> str:
        """The reply to RCPT TO:<recipient>."""
        found = self.replies_to("RCPT TO:<%s>" % recipient)
        if len(found) != 1:
            raise AssertionError("no single reply to RCPT TO:<%s>:\n%s"
                                 % (recipient, self.transcript))
        return found[0]

    def final_reply(self) -> str | None:
        """The reply to the end of the message data ("."), or None if no message was sent."""
        found = self.replies_to(".")
        return found[-1] if found else None

    @property
    def accepted(self) -> bool:
        """True when the server took the message (250 after the data)."""
        final = self.final_reply()
        return final is not None and final.startswith("250")


def parse_transcript(transcript: str) -> list[tuple[str, str, str]]:
    """(command, code, text) for every complete server reply in a swaks transcript."""
    replies: list[tuple[str, str, str]] = []
    command, in_data, pending = "", False, []
    for line in transcript.splitlines():
        server = _SERVER.match(line)
        if server:
            code, sep, text = server.groups()
            pending.append(text.strip())
            if sep == " ":
                replies.append((command, code, " ".join(pending)))
                pending = []
                in_data = command.upper() == "DATA" and code == "354"
            continue
        client = _CLIENT.match(line)
        if client:
            sent = client.group(1).rstrip("\r")
            if in_data:
                if sent == ".":
                    command, in_data = ".", False
                continue
            command = sent
    return replies


def send(*, server: str, port: int = 25, sender: str, recipients: list[str],
         helo: str, source: str | None = None, subject: str = "lab message",
         netns: Namespace | None = None, timeout_seconds: int = 30,
         extra: list[str] = ()) -> SmtpResult:
    """Run one swaks transaction; `sender=""` sends the null sender (MAIL FROM:<>)."""
    argv = [SWAKS, "--server", server, "--port", str(port), "--helo", helo,
            "--from", sender or "<>", "--to", ",".join(recipients),
            "--header", "Subject: %s" % subject, "--timeout", str(timeout_seconds),
            # ESMTP without pipelining: one reply per command, in order, easy to attribute.
            "--protocol", "ESMTP", *extra]
    if source is not None:
        argv += ["--local-interface", source]
    if netns is not None:
        argv = netns.argv(argv)
    run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_seconds + 10)
    transcript = run.stdout + run.stderr
    return SmtpResult(run.returncode, transcript, parse_transcript(transcript), subject)
