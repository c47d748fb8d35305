"""The unit's system-call filter, address families and W^X rule, applied without systemd.

Contract:
- `allowed_syscalls(unit)` expands the unit's SystemCallFilter= lines as systemd does: an
  allow list starts with @default, each line adds its calls and groups (or, with "~", removes
  them), groups expanded recursively from `systemd-analyze syscall-filter` (the same tables
  systemd uses).
- `address_families(unit)` maps RestrictAddressFamilies= to socket family numbers.
- `filter_argv(unit, command)` returns `command` prefixed by a small /usr/bin/python3 program
  that sets MemoryDenyWriteExecute= (prctl PR_SET_MDWE, kept across execve), loads a seccomp
  filter allowing exactly those system calls - socket() only for those families (else
  EAFNOSUPPORT, as systemd) - with SystemCallErrorNumber='s errno for everything else, on the
  native architecture only (SystemCallArchitectures=native), and execs `command`. It needs
  no_new_privs (set by the caller, setpriv) and the Debian package python3-seccomp;
  `filter_unavailable()` says why it cannot be applied here, or None. With
  `mdwe="seccomp"` MemoryDenyWriteExecute= is enforced as systemd before 254 (Debian 12's
  252) does, by a second seccomp filter: EPERM for mmap() asking PROT_WRITE|PROT_EXEC,
  mprotect() and pkey_mprotect() asking PROT_EXEC, shmat() asking SHM_EXEC.
"""

from __future__ import annotations

import errno
import functools
import json
import socket
import subprocess

# Runs as `python3 -c PROGRAM SPEC -- COMMAND...` under the daemon's user, just before the exec.
PROGRAM = r"""
import ctypes, json, os, sys
import seccomp
spec = json.loads(sys.argv[1])
command = sys.argv[3:]
if spec["mdwe"] == "seccomp":
    import errno, mmap
    w = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    wx, x, shm_exec = mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.PROT_EXEC, 0o100000
    for name, bits in (("mmap", wx), ("mprotect", x), ("pkey_mprotect", x), ("shmat", shm_exec)):
        w.add_rule(seccomp.ERRNO(errno.EPERM), name, seccomp.Arg(2, seccomp.MASKED_EQ, bits, bits))
    w.load()
elif spec["mdwe"]:
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
        sys.exit("PR_SET_MDWE failed: errno %d" % ctypes.get_errno())
f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(spec["errno"]))
for name in spec["allow"]:
    try:
        f.add_rule(seccomp.ALLOW, name)
    except Exception:
        pass  # a call this architecture does not have (e.g. the *32 variants)
for family in spec["families"]:
    f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, family))
f.add_rule(seccomp.ERRNO(spec["family_errno"]), "socket",
           seccomp.Arg(0, seccomp.GT, max(spec["families"])))
for family in range(max(spec["families"])):
    if family not in spec["families"]:
        f.add_rule(seccomp.ERRNO(spec["family_errno"]), "socket",
                   seccomp.Arg(0, seccomp.EQ, family))
f.load()
os.execv(command[0], command)
"""


@functools.lru_cache(maxsize=1)
def _groups() -> dict[str, list[str]]:
    """Every @group of `systemd-analyze syscall-filter` with its members (calls and @groups)."""
    text = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                          text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if not line.startswith(" "):
            current = groups.setdefault(word, []) if word.startswith("@") else None
        elif current is not None:
            current.append(word)
    return groups


def _expand(names: list[str], seen: frozenset = frozenset()) -> set[str]:
    calls: set[str] = set()
    for name in names:
        if name.startswith("@"):
            if name not in seen:
                calls |= _expand(_groups()[name], seen | {name})
        else:
            calls.add(name)
    return calls


def allowed_syscalls(unit) -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow (see the module docstring)."""
    lines = unit.settings.get("SystemCallFilter", [])
    if not lines or lines[0].startswith("~"):
        raise ValueError("only an allow-list SystemCallFilter= is reproduced here")
    allowed = _expand(["@default"])
    for line in lines:
        if line.startswith("~"):
            allowed -= _expand(line[1:].split())
        else:
            allowed |= _expand(line.split())
    return allowed


def address_families(unit) -> list[int]:
    """RestrictAddressFamilies= as socket family numbers."""
    names = unit.one("RestrictAddressFamilies").split()
    return sorted(int(getattr(socket, name)) for name in names)


def filter_unavailable() -> str | None:
    """None when the filter can be applied here, else a sentence saying what is missing."""
    probe = subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], capture_output=True)
    if probe.returncode != 0:
        return "the Debian package python3-seccomp is not installed"
    probe = subprocess.run(["systemd-analyze", "syscall-filter", "@default"], capture_output=True)
    if probe.returncode != 0:
        return "systemd-analyze is not installed (Debian package systemd)"
    return None


def filter_argv(unit, command: list[str], mdwe: str = "prctl") -> list[str]:
    """`command` run under the unit's filter (see the module docstring); `mdwe`: "prctl"
    (systemd 254 and later on Linux 6.3 and later) or "seccomp" (earlier systemd)."""
    if unit.one("SystemCallArchitectures", "") != "native":
        raise ValueError("only SystemCallArchitectures=native is reproduced here")
    if mdwe not in ("prctl", "seccomp"):
        raise ValueError("mdwe: %r is neither \"prctl\" nor \"seccomp\"" % mdwe)
    spec = {
        "allow": sorted(allowed_syscalls(unit) - {"socket"}),
        "families": address_families(unit),
        "errno": getattr(errno, unit.one("SystemCallErrorNumber", "EPERM")),
        "family_errno": errno.EAFNOSUPPORT,
        "mdwe": mdwe if unit.one("MemoryDenyWriteExecute", "no") == "yes" else None,
    }
    return ["/usr/bin/python3", "-c", PROGRAM, json.dumps(spec), "--", *command]
