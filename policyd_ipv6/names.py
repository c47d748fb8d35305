"""Normalisation of the untrusted names and addresses found in a policy request.

Contract: every function here takes text that a remote SMTP client controls (through Postfix)
and returns a normalised value or ``None`` for "not usable"; none of them raises on any input
string. No DNS, no I/O.

- ``client_ip``: the ``client_address`` attribute as an ``ipaddress`` object; an IPv4-mapped
  IPv6 address becomes the IPv4 address (Postfix already converts them:
  sane_sockaddr_to_hostaddr.c).
  Results are memoised (a busy sender's address recurs; the objects are immutable).
- ``recipient_domain``: the domain of an envelope address (what follows the last "@",
  lower-cased, no trailing dot), in Postfix's internal form or as the client wrote it.
- ``domain_key``: the form used to compare domains: A-labels (IDNA 2008, RFC 5891, after the
  UTS #46 non-transitional mapping: ``straße`` is ``xn--strae-oqa``, not ``strasse``), lower
  case, no trailing dot; ``None`` for an address literal or anything that is not a domain
  name (memoised). An ASCII name is only lower-cased.
- ``host_name``: a domain name that can name a host (a PTR target), else ``None``.
- ``helo_domain``: the HELO name if it is a usable SPF identity (RFC 7208 §2.3: a multi-label
  domain name, not an address literal), else ``None``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket

import idna

__all__ = ["client_ip", "recipient_domain", "domain_key", "host_name", "helo_domain", "IPAddress"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 1035 §2.3.4 limits; underscores are allowed because SPF and DKIM names use them.
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
# A whole name of such labels, matched in one call (``\Z``: a newline at the end is no label).
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_MAX_NAME = 253


@functools.lru_cache(maxsize=4096)
def client_ip(text: str) -> IPAddress | None:
    """Parse ``client_address``; IPv4-mapped IPv6 gives the IPv4 address; junk gives None."""
    text = text.split("%", 1)[0].strip()
    address: IPAddress
    try:
        # The C parser first: ipaddress parses text in Python, ten times slower, and every
        # new client (a cold decision) pays it. What inet_pton refuses goes to ipaddress,
        # which decides.
        if ":" in text:
            address = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
        else:
            address = ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def recipient_domain(address: str) -> str | None:
    """The domain part of an envelope address, lower-cased, without a trailing dot.

    The domain is what follows the last "@", as Postfix takes it (smtpd_check.c,
    trivial-rewrite): a domain never contains "@" or '"'. A policy request's ``recipient``
    and ``sender`` are Postfix's unquoted internal form (smtpd.c extract_addr,
    tok822_internalize): ``RCPT TO:<"\\"x\\\\"@contoso.com>`` arrives as
    ``"x\\@contoso.com``, whose domain is contoso.com. The milter's SMFIC_MAIL and
    SMFIC_RCPT arguments keep the client's quotes (``"a@b"@contoso.com``); the same rule
    holds there, and a domain part containing '"' means the last "@" was inside a quoted
    local part with no domain after it (``"a@b"``). No "@", nothing after it (RFC 5321
    allows a bare "Postmaster"), or a quote in the domain part gives None.
    """
    _, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or '"' in domain:
        return None
    domain = domain.strip().rstrip(".").lower()
    return domain or None


@functools.lru_cache(maxsize=16384)
def domain_key(domain: str) -> str | None:
    """The comparable form of a domain name (A-labels, lower case), or None if it is not one."""
    domain = domain.strip().rstrip(".")
    if not domain or domain.startswith("["):
        return None
    try:
        if not domain.isascii():
            domain = _a_labels(domain)
    except (UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
        return None
    domain = domain.lower()
    if len(domain) > _MAX_NAME:
        return None
    if _NAME.match(domain) is None:
        return None
    return domain


def _a_labels(domain: str) -> str:
    """U-labels to A-labels as registries and mail software do today: the UTS #46 mapping
    (non-transitional, so ß and ς stay letters of their own, and full-width dots are dots),
    then IDNA 2008 (RFC 5891) label by label. Python's own "idna" codec is IDNA 2003, which
    maps ß to ss. Raises UnicodeError (idna.IDNAError) for a label IDNA 2008 forbids."""
    mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False)
    return ".".join(label if label.isascii() else idna.alabel(label).decode("ascii")
                    for label in mapped.split("."))


def host_name(name: str) -> str | None:
    """The name if it is a host name (letters, digits, hyphens; not numeric), else None.

    Postfix refuses numeric and malformed PTR targets the same way (myaddrinfo.c).
    """
    key = domain_key(name)
    if key is None or "_" in key or key.rsplit(".", 1)[-1].isdigit():
        return None
    return key


def helo_domain(helo: str) -> str | None:
    """The HELO name if it can be an SPF identity: a host name with at least two labels."""
    key = host_name(helo)
    return key if key is not None and "." in key else None
