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
  sends; ``extend_timeout(seconds, status)`` is ``EXTEND_TIMEOUT_USEC`` (systemd 236 and
  later): the start in progress may take ``seconds`` more from now, whatever
  ``TimeoutStartSec=`` says (an extension never shortens it). Without ``NOTIFY_SOCKET`` every
  call does nothing and returns False.
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
  given no milter factory (the service turns the milter on for one: ``serve`` builds it so),
  or an fd that is not a listening stream socket raises ``ConfigError`` naming the fd (the
  ports already adopted are closed first).
- ``endpoint_address(description)`` (pure) is where a configured server endpoint string
  listens, read by Twisted's own rules (``serverFromString``: backslash escapes, the default
  interface 0.0.0.0 of ``tcp:PORT`` and :: of ``tcp6:PORT``), as ``"tcp:HOST:PORT"`` (HOST an
  IP address in its canonical form) or ``"unix:ABSOLUTE-PATH"``; "" for anything else (a
  host name as interface, ssl:, a string that does not parse). ``served_addresses(port)`` is
  the set of such addresses an adopted port serves: its own, and for a dual-stack socket on
  the IPv6 wildcard ([::] with IPV6_V6ONLY off, Linux's default, as ``ListenStream=PORT``
  makes it) also ``tcp:0.0.0.0:PORT``, which a second listener could not bind. A configured
  endpoint whose address is in that set is served already; nothing else matches (a specific
  address under an adopted wildcard, or a configured :: beside an adopted 0.0.0.0, is bound
  and fails with EADDRINUSE, naming the endpoint).
"""

from __future__ import annotations

import fcntl
import ipaddress
import math
import os
import re
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from twisted.internet import task, tcp, unix
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.logger import Logger

from policyd_ipv6.daemon.config import ConfigError

__all__ = ["notify_message", "notify_address", "Notifier", "watchdog_seconds",
           "start_watchdog", "listen_fds", "take_listen_fds", "adopt", "adopt_inherited",
           "endpoint_address", "served_addresses", "LISTEN_FDS_START"]

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

    def extend_timeout(self, seconds: float, status: str = "") -> bool:
        # sd_notify(3): the service must send READY=1 (or another extension) within this many
        # microseconds from now, once past TimeoutStartSec=.
        usec = max(1, math.ceil(seconds * 1_000_000))
        return self.send({"EXTEND_TIMEOUT_USEC": str(usec),
                          **({"STATUS": status} if status else {})})

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
    """Where the server endpoint string ``description`` listens, in ``served_addresses``'
    form ("tcp:HOST:PORT", "unix:PATH"); "" for a form it does not match (see the module
    docstring)."""
    try:
        # The parse alone (no reactor is used before listen()): Twisted's escapes and its
        # default interfaces, exactly as the daemon's own listen() will read the string.
        endpoint = serverFromString(None, description)
    except Exception:
        return ""  # listen() reports it, naming the key
    if isinstance(endpoint, UNIXServerEndpoint):
        path = getattr(endpoint, "_address", "")
        return "unix:" + os.path.abspath(path) if isinstance(path, str) and path else ""
    if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        # tcp:PORT has the interface "" (INADDR_ANY); tcp6:PORT has "::".
        return _tcp_address(getattr(endpoint, "_interface", None) or "0.0.0.0",
                            getattr(endpoint, "_port", None))
    return ""


def _tcp_address(host, port) -> str:
    if not isinstance(host, str) or not isinstance(port, int):
        return ""
    try:
        return f"tcp:{ipaddress.ip_address(host)}:{port}"
    except ValueError:
        return ""  # a host name: never taken for an adopted socket's address


def served_addresses(port) -> frozenset[str]:
    """The addresses an adopted ``port`` serves, in ``endpoint_address``'s form (see the
    module docstring)."""
    address = port.getHost()
    name = getattr(address, "name", None)
    if name is not None:
        path = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        return frozenset({"unix:" + path})
    own = _tcp_address(address.host, address.port)
    served = {own}
    if own == _tcp_address("::", address.port) and not _v6only(port):
        # A dual-stack [::] socket accepts IPv4 too: 0.0.0.0:PORT is taken (bind(2) gives
        # EADDRINUSE), and what a configured tcp:PORT would serve is served already.
        served.add(f"tcp:0.0.0.0:{address.port}")
    return frozenset(served - {""})


def _v6only(port) -> bool:
    sock = getattr(port, "socket", None)
    if sock is None:
        return True  # unknown: no IPv4 claimed
    try:
        return bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    except OSError:
        return True


def adopt_inherited(reactor, inherited: Sequence[tuple[int, str]], factory,
                    milter_factory) -> list:
    """Serve the sockets systemd passed: ``policy`` ones for policy requests, ``milter`` ones
    for the milter; any other name, or a milter socket while ``milter_factory`` is None,
    stops the daemon with a ConfigError (a socket nobody serves would hold Postfix's
    connections)."""
    ports: list = []
    for fd, name in inherited:
        target = {"policy": factory, "milter": milter_factory}.get(name)
        try:
            if name not in ("policy", "milter"):
                raise ValueError("the daemon serves FileDescriptorName=policy or "
                                 "FileDescriptorName=milter only")
            if target is None:
                # Not from serve, which turns the milter on for a socket named milter
                # whatever milter_listen says: a caller that built the service without it.
                raise ValueError("the milter is off in this service, so nothing would serve "
                                 "this socket (stop passing it: systemctl mask --now "
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
