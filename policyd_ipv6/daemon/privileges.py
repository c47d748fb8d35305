"""Least privilege: never serve as root; drop to the configured user after binding.

Contract: ``plan_privileges(user, allow_root)`` is called before anything is bound. It returns
``None`` when nothing is to be done (not root, running as ``user`` or ``user`` empty), or the
``(uid, gid, name)`` to drop to, and raises ``ConfigError`` naming the ``user`` key when root
was given no user to become (unless ``allow_root``), when the user does not exist or is root
(uid 0, whoever starts the daemon), or when a non-root process is asked to become someone
else. ``drop_privileges(plan)`` then switches
groups, gid and uid for good (after the listeners are bound, so a port below 1024 or a socket
in a root-owned directory can still be used) and raises ``OSError`` if any step fails.

``load_lazy_modules()`` imports, before the drop, every module the daemon would otherwise
import on first use: after the drop, a program started from a directory its user cannot read
(a clone in /root, mode 700) could no longer load them, and dnspython, for one, then silently
parses every record of that type as opaque data.
"""

from __future__ import annotations

import importlib
import os
import pwd

from policyd_ipv6.daemon.config import ConfigError

__all__ = ["plan_privileges", "drop_privileges", "load_lazy_modules"]

# Imported on first use by the libraries (each from inside a function).
LAZY_MODULES = (
    "encodings.idna",  # str.encode("idna")
    "idna.core", "idna.idnadata", "idna.intranges", "idna.uts46data",  # idna.uts46_remap
)


def plan_privileges(user: str, allow_root: bool = False, euid: int | None = None):
    euid = os.geteuid() if euid is None else euid
    if user:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f'user = "{user}": no such user') from None
        if entry.pw_uid == 0:  # first: root started with user = "root" must not serve as root
            raise ConfigError(f'user = "{user}": that is root; name an unprivileged user')
        if entry.pw_uid == euid:
            return None
        if euid != 0:
            raise ConfigError(f'user = "{user}": only root can switch to another user '
                              f"(running as uid {euid})")
        return entry.pw_uid, entry.pw_gid, entry.pw_name
    if euid == 0 and not allow_root:
        raise ConfigError('user = "": refusing to run as root; set user = "_policyd-ipv6" (the '
                          "Debian package's account) or another unprivileged account to drop "
                          "privileges after binding, or start the daemon as that user (in a "
                          "disposable test lab: --allow-root)")
    return None


def load_lazy_modules() -> None:
    """Import every module that would otherwise be imported after the privilege drop."""
    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    # dnspython imports the class of each record type the first time one is parsed, and on
    # an ImportError falls back to opaque "generic" data without a word.
    for rdclass in (dns.rdataclass.IN, dns.rdataclass.ANY):
        for rdtype in dns.rdatatype.RdataType:
            dns.rdata.get_rdata_class(rdclass, rdtype)
    for name in LAZY_MODULES:
        importlib.import_module(name)


def drop_privileges(plan) -> None:
    if plan is None:
        return
    uid, gid, name = plan
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:  # pragma: no cover - defensive
        raise OSError(f"could not drop privileges to {name}")
