"""The benchmark's DNS lab: two network namespaces, Knot, the delay relay and unbound.

Contract: `Lab(prefix, workdir)` is a context manager. On entry it removes leftovers of an
earlier run with the same prefix, then builds

    <prefix>-mx namespace                          <prefix>-dns namespace
    servers under test, load generator             delay relay [2001:db8:ffff::1]:53
    unbound 127.0.0.1:53 / [::1]:53  ---veth--->       -> Knot [::1]:53
    (2001:db8:ffff::2)                             2001:db8:dead::/48 arrives here and is
    /etc/netns/<prefix>-mx/resolv.conf -> unbound  dropped (forwarding off): a black hole

On exit (also after an exception) it stops every process it started, by PID, deletes both
namespaces and /etc/netns/<prefix>-mx. It never touches the root namespace's addresses.
`restart_unbound()` gives an empty resolver cache; `set_delay(ms)` restarts the relay with a
new round trip. Processes are started with `ip netns exec` directly, so Popen.pid is the PID of
the daemon itself.

The namespaces, the veth pair and stopping a process by PID are the test lab's
(tests/lab/netns.py, tests/lab/process.py); the Knot and unbound configurations stay here,
tuned for load (worker counts, cache sizes, 30,000 generated zones on disk).
"""

import os
import signal
import subprocess
import sys
import time

import zonegen

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from lab.netns import Namespace, existing_namespaces, veth_pair  # noqa: E402
from lab.process import terminate  # noqa: E402

LINK_DNS = "2001:db8:ffff::1"
LINK_MX = "2001:db8:ffff::2"

KNOT_CONF = """\
server:
    rundir: "{d}/knot-run"
    listen: [ ::1@53, {link}@5300 ]
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: warning
database:
    storage: "{d}/knot-db"
template:
  - id: default
    storage: "{d}"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
    semantic-checks: off
zone:
  - domain: {zone}
    file: example.zone
  - domain: {reverse}
    file: ip6.zone
  - domain: {big}
    file: big.zone
"""

# Debian's unbound with a cache large enough never to evict during a run, no DNSSEC
# validation (the lab zones are unsigned) and its default qname minimisation left on, as a
# production resolver has it. The reverse zone of 2001:db8::/32 is one of unbound's built-in
# RFC 6303 blocking zones, hence `nodefault`.
UNBOUND_CONF = """\
server:
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 1
    interface: 127.0.0.1
    interface: ::1
    port: 53
    access-control: 127.0.0.0/8 allow
    access-control: ::1/128 allow
    outgoing-interface: {mx}
    module-config: "iterator"
    qname-minimisation: yes
    msg-cache-size: 128m
    rrset-cache-size: 256m
    num-queries-per-thread: 4096
    outgoing-range: 8192
    local-zone: "{reverse}" nodefault
stub-zone:
    name: "{zone}"
    stub-addr: {ns}
stub-zone:
    name: "{reverse}"
    stub-addr: {ns}
stub-zone:
    name: "{big}"
    stub-addr: {ns}@5300
"""


def run(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def stop_process(proc, grace=3.0):
    """SIGTERM one process we started, then SIGKILL it if it lingers."""
    terminate(proc, grace)


class Lab:
    def __init__(self, prefix, workdir, delay_ms=0.0, cold=20000, warm=50, slow=3000,
                 python="/usr/bin/python3"):
        self.ns_dns, self.ns_mx = f"{prefix}-dns", f"{prefix}-mx"
        self.dns, self.mx = Namespace(self.ns_dns), Namespace(self.ns_mx)
        self.veth_dns, self.veth_mx = f"{prefix}-d0", f"{prefix}-m0"
        self.dir = os.path.abspath(workdir)
        self.delay_ms = delay_ms
        self.sizes = dict(cold=cold, warm=warm, slow=slow)
        self.python = python
        self.knot = self.relay = self.unbound = None
        self.population = None

    # -- namespaces -------------------------------------------------------------------------
    def cleanup(self):
        for name in ("relay", "unbound", "knot"):
            stop_process(getattr(self, name))
            setattr(self, name, None)
        for ns in (self.mx, self.dns):
            # Leftovers of a crashed run in OUR namespaces: their PIDs are ours to end.
            for pid in ns.pids() if ns.name in existing_namespaces() else ():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ns.delete()

    def build_network(self):
        # Both namespaces with DAD off (addresses usable at once), joined by a veth pair.
        for ns in (self.dns, self.mx):
            ns.create()
        veth_pair(self.dns, self.veth_dns, self.mx, self.veth_mx)
        self.dns.add_address(self.veth_dns, f"{LINK_DNS}/64")
        self.mx.add_address(self.veth_mx, f"{LINK_MX}/64")
        # The dead nameservers: routed to the DNS side, which does not forward, so every
        # query to them vanishes without an ICMP error, like a server that never answers.
        self.dns.sysctl("net.ipv6.conf.all.forwarding", "0")
        self.mx.run(["ip", "-6", "route", "add", f"{zonegen.DEAD_PREFIX}::/48", "via", LINK_DNS])
        # Not Namespace.set_resolv_conf: policyd-spf resolves through this file, and the
        # benchmark measures it with the resolver's default timeouts, as it runs in production.
        self.mx.etc_dir.mkdir(parents=True, exist_ok=True)
        (self.mx.etc_dir / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    # -- daemons ----------------------------------------------------------------------------
    def spawn(self, ns, argv, log):
        with open(os.path.join(self.dir, log), "ab") as out:
            return Namespace(ns).popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)

    def wait_for_answer(self, ns, server, name, rtype, deadline_s=10.0):
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            res = run("ip", "netns", "exec", ns, "dig", "+short", "+time=1", "+tries=1",
                      f"@{server}", name, rtype, check=False)
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout.strip()
            time.sleep(0.1)
        raise RuntimeError(f"no answer for {name} {rtype} from {server} in {ns}")

    def start_knot(self):
        conf = os.path.join(self.dir, "knot.conf")
        with open(conf, "w") as out:
            out.write(KNOT_CONF.format(d=self.dir, zone=zonegen.ZONE, reverse=zonegen.REVERSE_ZONE,
                                       big=zonegen.BIG_ZONE, link=LINK_DNS))
        for sub in ("knot-run", "knot-db"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        run("knotc", "-c", conf, "conf-check")
        self.knot = self.spawn(self.ns_dns, ["knotd", "-c", conf], "knot.log")
        self.wait_for_answer(self.ns_dns, "::1", "ns.example", "AAAA", 60.0)

    def set_delay(self, delay_ms):
        stop_process(self.relay)
        self.delay_ms = delay_ms
        self.relay = self.spawn(self.ns_dns, [
            self.python, os.path.join(HERE, "delay_relay.py"), "--listen", f"[{LINK_DNS}]:53",
            "--upstream", "[::1]:53", "--delay-ms", str(delay_ms)], "relay.log")
        self.wait_for_answer(self.ns_dns, LINK_DNS, "ns.example", "AAAA")

    def restart_unbound(self):
        """Start (or restart) unbound with an empty cache and wait until it resolves."""
        stop_process(self.unbound)
        conf = os.path.join(self.dir, "unbound.conf")
        with open(conf, "w") as out:
            out.write(UNBOUND_CONF.format(d=self.dir, mx=LINK_MX, ns=LINK_DNS,
                                          zone=zonegen.ZONE, reverse=zonegen.REVERSE_ZONE,
                                          big=zonegen.BIG_ZONE))
        self.unbound = self.spawn(self.ns_mx, ["unbound", "-d", "-c", conf], "unbound.log")
        # A name no scenario uses, so the cache stays cold for everything measured.
        self.wait_for_answer(self.ns_mx, "127.0.0.1", "ns.example", "AAAA")

    def lab_pids(self):
        return {name: getattr(self, name).pid for name in ("knot", "relay", "unbound")
                if getattr(self, name) is not None}

    def exec_argv(self, argv):
        """argv prefixed to run inside the namespace of the servers under test."""
        return self.mx.argv(argv)

    def __enter__(self):
        self.cleanup()
        try:
            os.makedirs(self.dir, exist_ok=True)
            self.population = zonegen.generate(self.dir, **self.sizes)
            self.build_network()
            self.start_knot()
            self.set_delay(self.delay_ms)
            self.restart_unbound()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False
