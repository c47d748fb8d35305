"""Least privilege: never serve as root; drop to the configured user after binding.

Contract: ``plan_privileges(user, allow_root)`` is called before anything is bound. It returns
``None`` when nothing is to be done (not root, running as ``user`` or ``user`` empty), or the
``(uid, gid, name)`` to drop to, and raises ``ConfigError`` naming the ``user`` key when root
was given no user to become (unless ``allow_root``), when the user does not exist, or when a
non-root process is asked to become someone else. ``drop_privileges(plan)`` then switches
groups, gid and uid for good (after the listeners are bound, so a port below 1024 or a socket
in a root-owned directory can still be used).
"""

from __future__ import annotations

import os
import pwd

from policyd_ipv6.daemon.config import ConfigError

__all__ = ["plan_privileges", "drop_privileges"]


def plan_privileges(user: str, allow_root: bool = False, euid: int | None = None):
    euid = os.geteuid() if euid is None else euid
    if user:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f'user = "{user}": no such user') from None
        if entry.pw_uid == euid:
            return None
        if euid != 0:
            raise ConfigError(f'user = "{user}": only root can switch to another user '
                              f"(running as uid {euid})")
        if entry.pw_uid == 0:
            raise ConfigError(f'user = "{user}": that is root; name an unprivileged user')
        return entry.pw_uid, entry.pw_gid, entry.pw_name
    if euid == 0 and not allow_root:
        raise ConfigError('user = "": refusing to run as root; set user = "policyd-ipv6" (or '
                          "another unprivileged account) to drop privileges after binding, or "
                          "start the daemon as that user (in a disposable test lab: --allow-root)")
    return None


def drop_privileges(plan) -> None:
    if plan is None:
        return
    uid, gid, name = plan
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:  # pragma: no cover - defensive
        raise OSError(f"could not drop privileges to {name}")
