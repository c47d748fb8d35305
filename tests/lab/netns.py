"""Network namespaces for the lab: create, address, link with a veth pair, run programs, delete.

Contract:
- `Namespace(name).create()` makes a network namespace with loopback up and IPv6 duplicate
  address detection off (`accept_dad=0` for all, default and lo), so addresses are usable at
  once instead of "tentative" for seconds.
- `veth_pair(a, if_a, b, if_b)` creates the pair directly inside the two namespaces (nothing
  ever appears in the host's namespace), turns DAD off on both ends *before* the link goes up
  (else the link-local address stays tentative), and brings them up.
- `ns.add_address(dev, "2001:db8::1/64")` adds with `nodad`; `ns.add_route(prefix, dev)` adds an
  on-link route (needed when several /64s share one link).
- `ns.set_resolv_conf(["2001:db8::53"])` writes /etc/netns/NAME/resolv.conf, which
  `ip netns exec` bind-mounts over /etc/resolv.conf for every program started through it
  afterwards: those programs resolve through the lab's DNS without touching the host's file.
- `ns.argv(cmd)` / `ns.run(cmd)` / `ns.popen(cmd)` run a program inside. `ip netns exec` execs the
  program, so `popen(...).pid` is the program's own PID (never wrap it in a shell).
- `build_link(a, if_a, addrs_a, b, if_b, addrs_b, route, nameservers, addfinalizer)` is the
  two-host lab the tests share: both namespaces, the veth pair, addresses, routes, resolv.conf.
- `ns.delete()` removes /etc/netns/NAME and the namespace (its veth end goes with it). It does
  not stop processes: their owners stop them by PID first. Idempotent.

Only documentation prefixes (2001:db8::/32, 192.0.2.0/24) are meant to be used, and only
inside these namespaces: the host's own interfaces are never touched. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


class NetnsError(RuntimeError):
    """An `ip` command failed; the message quotes the command and its output."""


def netns_unavailable() -> str | None:
    """None when namespaces can be made here, else a sentence saying why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (running as uid %d)" % os.geteuid()
    if not shutil.which("ip"):
        return "iproute2 (the `ip` command) is not installed"
    return None


def _run(argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    result = subprocess.run(argv, **kwargs)
    if check and result.returncode != 0:
        raise NetnsError("%s -> exit %d\n%s%s" % (" ".join(argv), result.returncode,
                                                   result.stdout or "", result.stderr or ""))
    return result


def existing_namespaces() -> list[str]:
    """Names of the network namespaces that exist now."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class Namespace:
    """One named network namespace made by the lab."""

    def __init__(self, name: str):
        if not name or "/" in name or len(name) > 64:
            raise ValueError("bad namespace name %r" % name)
        self.name = name

    def __repr__(self) -> str:
        return "Namespace(%r)" % self.name

    @property
    def etc_dir(self) -> Path:
        return NETNS_ETC / self.name

    # -- running programs ----------------------------------------------------------------
    def argv(self, argv: list[str]) -> list[str]:
        """`argv` prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a program inside and wait for it; raise NetnsError on failure if `check`."""
        return _run(self.argv(argv), check=check, **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start a program inside; the returned process's PID is the program's own."""
        return subprocess.Popen(self.argv(argv), **kwargs)

    def sysctl(self, key: str, value: str) -> None:
        # Per-namespace keys (net.*) written from inside: the host's values stay untouched.
        self.run(["sysctl", "-q", "-w", "%s=%s" % (key, value)])

    # -- life cycle ----------------------------------------------------------------------
    def create(self) -> Namespace:
        """Create the namespace (lo up, DAD off). A leftover one of the same name is replaced."""
        if self.name in existing_namespaces():
            # A run that was killed hard left it behind; the processes still inside (if any)
            # are not ours to stop, but they lose nothing when the name is reused.
            self.delete()
        _run(["ip", "netns", "add", self.name])
        for scope in ("all", "default", "lo"):
            self.sysctl("net.ipv6.conf.%s.accept_dad" % scope, "0")
            self.sysctl("net.ipv6.conf.%s.disable_ipv6" % scope, "0")
        self.run(["ip", "link", "set", "lo", "up"])
        return self

    def delete(self) -> None:
        """Remove /etc/netns/NAME and the namespace. Idempotent; never raises for a missing one."""
        shutil.rmtree(self.etc_dir, ignore_errors=True)
        if self.name in existing_namespaces():
            _run(["ip", "netns", "del", self.name])

    def pids(self) -> list[int]:
        """PIDs of the processes running in this namespace now."""
        out = _run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split()]

    # -- configuration -------------------------------------------------------------------
    def add_address(self, dev: str, cidr: str) -> None:
        """Add an address; IPv6 ones with `nodad` so they are usable at once."""
        extra = ["nodad"] if ":" in cidr else []
        self.run(["ip", "address", "add", cidr, "dev", dev, *extra])

    def add_route(self, prefix: str, dev: str) -> None:
        """An on-link route for `prefix` through `dev` (no gateway)."""
        family = "-6" if ":" in prefix else "-4"
        self.run(["ip", family, "route", "add", prefix, "dev", dev])

    def set_resolv_conf(self, nameservers: list[str]) -> Path:
        """Write /etc/netns/NAME/resolv.conf for programs started inside from now on."""
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        path = self.etc_dir / "resolv.conf"
        # One try, short timeout: the lab's DNS is on the same link; a dead one should show fast.
        lines = ["nameserver %s" % ns for ns in nameservers] + ["options timeout:1 attempts:2"]
        path.write_text("\n".join(lines) + "\n")
        return path


def veth_pair(a: Namespace, if_a: str, b: Namespace, if_b: str) -> None:
    """Join two namespaces with a veth pair (if_a in a, if_b in b), DAD off, links up."""
    for name in (if_a, if_b):
        if len(name) > 15:
            raise ValueError("interface name %r is longer than 15 characters" % name)
    _run(["ip", "link", "add", if_a, "netns", a.name, "type", "veth",
          "peer", "name", if_b, "netns", b.name])
    for ns, dev in ((a, if_a), (b, if_b)):
        # Before "up": the link-local address would otherwise go through DAD too.
        ns.sysctl("net.ipv6.conf.%s.accept_dad" % dev, "0")
        ns.run(["ip", "link", "set", dev, "up"])


def build_link(a: Namespace, if_a: str, a_addresses, b: Namespace, if_b: str, b_addresses,
               route: str, nameservers: list[str], addfinalizer) -> None:
    """The lab's two hosts: create both namespaces (``addfinalizer(ns.delete)`` for each, so
    they go even if a later step fails), join them with a veth pair, add each side's
    addresses, route ``route`` over the link on both sides (the sender's addresses span
    several /64s on one link), and point both resolv.conf at ``nameservers`` before anything
    starts inside."""
    for ns in (a, b):
        addfinalizer(ns.delete)
        ns.create()
    veth_pair(a, if_a, b, if_b)
    for ns, dev, addresses in ((a, if_a, a_addresses), (b, if_b, b_addresses)):
        for cidr in addresses:
            ns.add_address(dev, cidr)
        ns.add_route(route, dev)
        ns.set_resolv_conf(nameservers)
