"""systemd without libsystemd: readiness notification (sd_notify(3)) and socket activation
(sd_listen_fds(3)), both no-ops when the daemon is not started by systemd.

Contract:
- ``notify_message(fields)`` (pure) is the datagram for ``{"READY": "1", ...}``: one
  ``KEY=value`` line each; a key that is not upper-case letters, digits and ``_``, or a value
  with a newline, raises ``ValueError``.
- ``notify_address(value)`` (pure) is the socket address of ``$NOTIFY_SOCKET``: a path, or
  ``"@name"`` for Linux's abstract namespace (returned with its leading NUL); None when unset
  or of a kind this does not speak (``vsock:``).
- ``Notifier.from_environment()`` takes ``NOTIFY_SOCKET`` out of the environment (so no
  child inherits it) and ``send()`` writes one datagram to it, never blocking and never
  raising (a failure is logged once; the daemon serves on without systemd's bookkeeping).
  ``ready()``, ``reloading()``, ``stopping()`` and ``watchdog()`` are the messages the daemon
  sends. Without ``NOTIFY_SOCKET`` every call does nothing and returns False.
- ``watchdog_seconds(environ, pid)`` (pure) is ``$WATCHDOG_USEC`` in seconds when the
  watchdog is meant for this process (``$WATCHDOG_PID`` absent or ``pid``), else None;
  ``start_watchdog(clock, notifier, seconds)`` sends ``WATCHDOG=1`` from the reactor every
  half of it, so a reactor that stops turning stops the pings and systemd restarts us.
- ``listen_fds(environ, pid)`` (pure) is the list of ``(fd, name)`` systemd passed this
  process (``$LISTEN_PID`` equal to ``pid``; fds from 3, names from ``$LISTEN_FDNAMES``, the
  socket units' ``FileDescriptorName=``); [] when none. Malformed variables raise
  ``ValueError``. ``take_listen_fds()`` also removes the variables from the environment and
  marks the fds close-on-exec (the DKIM workers must not hold our listeners).
- ``adopt(reactor, fd, factory)`` serves ``factory`` on an inherited listening stream socket
  (TCP or Unix) and closes ``fd`` (the port holds its own duplicate). A Unix socket's owner,
  mode and file are the socket unit's: never chmod-ed, never unlinked when the port closes, so
  connections keep queueing in the kernel's backlog while the service restarts.
- ``adopt_inherited(reactor, fds, factory, milter_factory)`` adopts every ``(fd, name)``:
  ``policy`` for policy requests, ``milter`` for the milter; another name, a milter socket
  without a milter, or an fd that is not a listening stream socket raises ``ConfigError``
  naming the fd (the ports already adopted are closed first).
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from twisted.internet import task, tcp, unix
from twisted.logger import Logger

from policyd_ipv6.daemon.config import ConfigError

__all__ = ["notify_message", "notify_address", "Notifier", "watchdog_seconds",
           "start_watchdog", "listen_fds", "take_listen_fds", "adopt", "adopt_inherited",
           "LISTEN_FDS_START"]

_log = Logger(namespace="policyd-ipv6")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_KEY = re.compile(r"[A-Z0-9_]+\Z")


def notify_message(fields: Mapping[str, str]) -> bytes:
    """The sd_notify datagram for ``fields``, in order."""
    lines = []
    for key, value in fields.items():
        if not _KEY.match(key):
            raise ValueError(f"not a notify key: {key!r}")
        if "\n" in value:
            raise ValueError(f"a notify value has no newline: {key}={value!r}")
        lines.append(f"{key}={value}\n")
    return "".join(lines).encode("utf-8")


def notify_address(value: str | None) -> str | None:
    """The address to send to for ``$NOTIFY_SOCKET`` (see the module docstring)."""
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # the abstract namespace (unix(7))
    return None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1's MONOTONIC_USEC wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Messages to the service manager (see the module docstring)."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        value = env.pop("NOTIFY_SOCKET", None)
        address = notify_address(value)
        if value and address is None:
            _log.warn("NOTIFY_SOCKET={value}: not a Unix socket address; systemd is not told "
                      "when the daemon is ready", value=value[:200])
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send one message; True if it left (see the module docstring)."""
        if self.address is None:
            return False
        message = notify_message(fields)
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX,
                                          socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self.sock.setblocking(False)
            self.sock.sendto(message, self.address)
        except OSError as error:
            if not self.failed:
                _log.warn("cannot notify systemd at {address}: {error}",
                          address=self.address.replace("\0", "@"), error=str(error))
            self.failed = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send({"READY": "1", **({"STATUS": status} if status else {})})

    def reloading(self, usec: int | None = None) -> bool:
        return self.send({"RELOADING": "1",
                          "MONOTONIC_USEC": str(monotonic_usec() if usec is None else usec)})

    def stopping(self) -> bool:
        return self.send({"STOPPING": "1"})

    def watchdog(self) -> bool:
        return self.send({"WATCHDOG": "1"})

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def watchdog_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout meant for ``pid``, in seconds, or None (sd_watchdog_enabled)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1e6


def start_watchdog(clock, notifier: Notifier, seconds: float) -> task.LoopingCall:
    """Send WATCHDOG=1 every ``seconds / 2`` from ``clock`` (the reactor), first one now."""
    ping = task.LoopingCall(notifier.watchdog)
    ping.clock = clock
    ping.start(seconds / 2, now=True)
    return ping


def listen_fds(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The sockets systemd passed ``pid``: ``(fd, name)`` each (see the module docstring)."""
    owner = environ.get("LISTEN_PID", "")
    count = environ.get("LISTEN_FDS", "")
    if not owner or not count:
        return []
    if not owner.isdigit():
        raise ValueError(f"LISTEN_PID={owner[:40]!r}: not a process id")
    if int(owner) != pid:
        return []  # meant for another process (we were started by the one it names)
    if not count.isdigit() or not 0 < int(count) <= 64:
        raise ValueError(f"LISTEN_FDS={count[:40]!r}: not a number of sockets (1-64)")
    n = int(count)
    names = environ.get("LISTEN_FDNAMES", "")
    named = names.split(":") if names else []
    if len(named) != n:
        named = ["unknown"] * n  # sd_listen_fds_with_names: the names do not match the fds
    return [(LISTEN_FDS_START + i, named[i]) for i in range(n)]


def take_listen_fds(environ: MutableMapping[str, str] | None = None,
                    pid: int | None = None) -> list[tuple[int, str]]:
    """``listen_fds`` for this process; removes the variables and sets close-on-exec."""
    env = os.environ if environ is None else environ
    source: Mapping[str, str] = env
    if environ is None and "LISTEN_FDS" not in env:
        # Importing twisted.internet.endpoints takes LISTEN_PID and LISTEN_FDS out of
        # os.environ (its systemd: endpoint parser, a class attribute): read them from the
        # environment this process was started with.
        source = {**initial_environment(), **env}
    fds = listen_fds(source, os.getpid() if pid is None else pid)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    for fd, _name in fds:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return fds


def initial_environment(path: str = "/proc/self/environ") -> dict[str, str]:
    """The environment this process was started with (Linux), whatever changed os.environ."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item)
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in pairs}


class _AdoptedUnixPort(unix.Port):
    """A Unix listener made by a socket unit: Twisted's own would chmod the file to its mode
    when it starts and unlink it when it stops, and the next process would adopt a socket no
    client can find; and it would shut the shared socket down. The file, its owner and mode
    stay the socket unit's, and the socket stays open for the next process."""

    def startListening(self) -> None:
        reserve = getattr(tcp, "_reservedFD", None)  # the spare fd for EMFILE (Twisted)
        if reserve is not None:
            reserve.reserve()
        factory: Any = self.factory
        factory.doStart()
        skt: Any = self._preexistingSocket
        self._preexistingSocket = None
        # Never shutdown(2) it when the port closes (Twisted's TCP Port spares an adopted
        # socket the same way): shutting down a listening socket shared with systemd would
        # refuse every connection the next process should have found in its backlog.
        self._shouldShutdown = False
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]  # as Twisted's own Port does
        self.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason) -> None:
        tcp.Port.connectionLost(self, reason)  # not unix.Port's: it unlinks the path


def adopt(reactor, fd: int, factory):
    """Serve ``factory`` on the inherited listening socket ``fd`` (see the module docstring);
    raises ValueError for an fd that is not a listening stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise ValueError(f"file descriptor {fd}: not a socket ({error.strerror})") from None
    try:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                                  socket.SO_ACCEPTCONN):
            raise ValueError(f"file descriptor {fd}: not a listening stream socket "
                             "(ListenStream= in the socket unit)")
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            port = _AdoptedUnixPort._fromListeningDescriptor(reactor, sock.fileno(), factory)
            port.startListening()
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            port = reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
            # Twisted listens again with its backlog of 50: keep the socket unit's (Backlog=,
            # SOMAXCONN by default), where connections wait while the service restarts.
            port.socket.listen(socket.SOMAXCONN)
        else:
            raise ValueError(f"file descriptor {fd}: address family {sock.family} is neither "
                             "TCP nor Unix")
    finally:
        sock.close()  # the port holds its own duplicate
    return port


def describe(port) -> str:
    """Where an adopted port listens, for log lines."""
    address = port.getHost()
    name = getattr(address, "name", None)
    if name is not None:
        return "unix:" + (name.decode("utf-8", "replace") if isinstance(name, bytes) else name)
    return f"{address.type.lower()}:{address.host}:{address.port}"


def endpoint_address(description: str) -> str:
    """A server endpoint string's address in ``describe``'s form ("unix:PATH",
    "tcp:HOST:PORT"), so a configured endpoint can be matched with an adopted socket; "" for
    a form it does not know (never equal to an adopted socket's)."""
    kind, _, rest = description.partition(":")
    words = rest.split(":")
    options = dict(word.split("=", 1) for word in words[1:] if "=" in word)
    if kind == "unix" and words[0]:
        return "unix:" + os.path.abspath(words[0])
    if kind in ("tcp", "tcp6") and words[0].isdigit():
        host = options.get("interface", "0.0.0.0" if kind == "tcp" else "::")
        return f"tcp:{host}:{words[0]}"
    return ""


def adopt_inherited(reactor, inherited: Sequence[tuple[int, str]], factory,
                    milter_factory) -> list:
    """Serve the sockets systemd passed: ``policy`` ones for policy requests, ``milter`` ones
    for the milter; any other name, or a milter socket without ``milter_listen``, stops the
    daemon with a ConfigError (a socket nobody serves would hold Postfix's connections)."""
    ports: list = []
    for fd, name in inherited:
        target = {"policy": factory, "milter": milter_factory}.get(name)
        try:
            if name not in ("policy", "milter"):
                raise ValueError("the daemon serves FileDescriptorName=policy or "
                                 "FileDescriptorName=milter only")
            if target is None:
                raise ValueError("milter_listen is empty, so the milter is off (set it, or "
                                 "stop passing this socket: systemctl mask --now "
                                 "policyd-ipv6-milter.socket)")
            port = adopt(reactor, fd, target)
        except ValueError as error:
            for bound in ports:
                bound.stopListening()
            raise ConfigError(f'socket activation: file descriptor {fd} named "{name}": '
                              f"{error}") from None
        ports.append(port)
        _log.info("listening for {what} on {where} (socket activation, {name})",
                  what="policy requests" if name == "policy" else "the milter",
                  where=describe(port), name=name)
    return ports
