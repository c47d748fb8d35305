"""A private Postfix instance for the lab: own config, queue, log and Maildir, started by PID file.

Contract:
- `PostfixInstance(root, settings, fragments, services, netns)` lays out `root/` as
  `etc/` (main.cf, master.cf), `queue/`, `data/`, `log/maillog` and `mail/inbox/` (the Maildir
  every accepted recipient is delivered to, via virtual_mailbox_domains and
  `virtual_mailbox_maps = static:inbox/`).
- main.cf is the lab's `settings` (name -> value) followed by each of `fragments` verbatim:
  the text a user pastes (postfix-examples/main.cf.fragment) goes in unchanged, so a fragment
  Postfix cannot parse fails the lab.
- master.cf is the standard set of internal services with chroot off, plus `services`: the
  lab's smtpd listeners, one master.cf entry each (`-o` overrides make variants).
- The config files are backdated: Postfix makes every command wait about 2 s when main.cf or
  master.cf is younger than that.
- `start()` runs `postfix -c etc start` inside the namespace (under `script`, because Postfix
  writes its errors to stderr only when it is a terminal) and waits until master has written
  its PID file; `stop()` sends SIGTERM to that PID (as `postfix stop` does, without its
  one-second polling) and SIGKILL if master has not exited after 10 s.
  Needs root (Postfix's own requirement) and the Debian package `postfix`.
- Reading results: `log()`, `queued_files()` (files in the queue, i.e. mail not yet delivered),
  `messages()` (parsed Maildir messages) and `wait_for_message(subject)`.
"""

from __future__ import annotations

import email
import email.policy
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .netns import Namespace

# Internal services of Postfix 3.7's master.cf, chroot off ("n" in the fifth column): the lab
# runs outside /var/spool/postfix, where a chroot would have none of the files it needs.
INTERNAL_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
# The uid/gid virtual(8) delivers as; "nobody" exists everywhere and owns nothing else here.
MAILBOX_ID = 65534


class PostfixError(RuntimeError):
    """A postfix command failed; the message carries its output and the log's tail."""


def postfix_unavailable() -> str | None:
    """None when a private Postfix can be run here, else a sentence saying why not."""
    if not shutil.which("postfix"):
        return "Postfix is not installed (Debian package postfix)"
    if os.geteuid() != 0:
        return "Postfix instances need root"
    return None


def main_cf_value(text: str, name: str) -> str:
    """The value of parameter `name` in main.cf text, continuation lines joined by spaces.

    As Postfix reads main.cf: blank and comment lines are skipped, a line starting with
    white space continues the logical line before it, the last setting of a name wins.
    """
    value, current = None, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if current == name:
                value = (value + " " + line.strip()).strip()
            continue
        key, _, rest = line.partition("=")
        current = key.strip()
        if current == name:
            value = rest.strip()
    if value is None:
        raise KeyError(name)
    return value


class PostfixInstance:
    """One Postfix instance (config, queue, log, Maildir) under `root`, run inside `netns`."""

    def __init__(self, root: Path, settings: dict[str, str], fragments: list[str],
                 services: list[str], netns: Namespace | None = None):
        self.root = Path(root)
        self.settings = settings
        self.fragments = fragments
        self.services = services
        self.netns = netns
        self.master_pid: int | None = None

    # -- layout --------------------------------------------------------------------------
    config_dir = property(lambda self: self.root / "etc")
    queue_dir = property(lambda self: self.root / "queue")
    log_path = property(lambda self: self.root / "log" / "maillog")
    maildir = property(lambda self: self.root / "mail" / "inbox")

    def main_cf(self) -> str:
        base = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.root / "data"),
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.log_path.parent),
            "virtual_mailbox_base": str(self.root / "mail"),
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": "static:%d" % MAILBOX_ID,
            "virtual_gid_maps": "static:%d" % MAILBOX_ID,
            # No local users and no outbound mail in the lab: only the virtual domains exist.
            "mydestination": "",
            "local_transport": "error:5.1.1 no local delivery in this instance",
            "default_transport": "error:5.4.4 no outbound delivery in this instance",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
        }
        base.update(self.settings)
        lines = ["# Written by the policyd-ipv6 test lab.\n"]
        lines += ["%s = %s\n" % item for item in base.items()]
        for fragment in self.fragments:
            lines.append("\n" + fragment.rstrip("\n") + "\n")
        return "".join(lines)

    def master_cf(self) -> str:
        return "".join(s.rstrip("\n") + "\n" for s in self.services) + INTERNAL_SERVICES

    def write(self) -> None:
        """Create the directories and the (backdated) config files."""
        for sub in ("", "etc", "queue", "data", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root / sub, 0o755)  # Postfix's unprivileged processes read here
        mail = self.root / "mail"
        mail.mkdir(exist_ok=True)
        os.chown(mail, MAILBOX_ID, MAILBOX_ID)
        shutil.chown(self.root / "data", "postfix")
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "master.cf").write_text(self.master_cf())
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.chmod(self.config_dir / name, 0o644)
            os.utime(self.config_dir / name, (past, past))

    # -- commands ------------------------------------------------------------------------
    def command(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run a Postfix command with `-c etc` inside the namespace; return its output."""
        argv = [args[0], "-c", str(self.config_dir), *args[1:]]
        if self.netns is not None:
            argv = self.netns.argv(argv)
        # script(1) gives Postfix a terminal, the only place it prints its errors to. Postfix
        # creates its queue directories with the caller's umask: make it the usual one.
        shell = "umask 022; exec " + shlex.join(argv)
        result = subprocess.run(["script", "-qec", shell, "/dev/null"],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise PostfixError("%s -> exit %d\n%s%s\n--- maillog ---\n%s" % (
                " ".join(argv), result.returncode, result.stdout, result.stderr,
                self.log_tail()))
        return result.stdout + result.stderr

    def start(self) -> PostfixInstance:
        """Write the files, check them with `postfix check`, start master, wait for its PID."""
        self.write()
        self.command("postfix", "check")
        self.command("postfix", "start")
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.master_pid = int(pid_file.read_text().split()[0])
                os.kill(self.master_pid, 0)
                return self
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        raise PostfixError("master did not start:\n%s" % self.log_tail())

    def stop(self) -> None:
        """Stop master by PID (it takes its children with it). Idempotent."""
        pid, self.master_pid = self.master_pid, None
        if pid is None:
            return
        # SIGTERM is what `postfix stop` sends too, but postfix-script then polls in whole
        # seconds; master ends its child processes before it exits.
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    # -- results -------------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def queued_files(self) -> list[Path]:
        """Queue files not yet delivered (empty when nothing was accepted or all was delivered)."""
        found = []
        for sub in QUEUE_SUBDIRS:
            base = self.queue_dir / sub
            if base.is_dir():
                found += [p for p in base.rglob("*") if p.is_file()]
        return found

    def messages(self) -> list[email.message.EmailMessage]:
        """Every message delivered to the Maildir so far."""
        out = []
        for sub in ("new", "cur"):
            folder = self.maildir / sub
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    with open(path, "rb") as f:
                        out.append(email.message_from_binary_file(f, policy=email.policy.default))
        return out

    def messages_with_subject(self, subject: str) -> list[email.message.EmailMessage]:
        return [m for m in self.messages() if m.get("Subject") == subject]

    def wait_until_queue_empty(self, timeout: float = 10) -> list[Path]:
        """Wait until every accepted message has left the queue; return what is still there."""
        deadline = time.monotonic() + timeout
        while self.queued_files() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.queued_files()

    def wait_for_message(self, subject: str, count: int = 1,
                         timeout: float = 10) -> list[email.message.EmailMessage]:
        """Wait until `count` copies of the message with `subject` are delivered; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages_with_subject(subject)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
