"""The reply texts: EOP's wording as defaults, and the checks an override must pass.

Contract: ``Replies`` holds one ``str.format`` template per refusal. ``validate_reply(key,
template, placeholders, temporary)`` raises ``ValueError`` (with a message naming the key and
value) unless the template renders as a valid Postfix access(5) reject action: a 4xx or 5xx
code, an RFC 3463 enhanced status code whose class digit equals the code's first digit
(Postfix would otherwise rewrite it, smtpd_check.c), printable ASCII, one line, at most 400
characters so that Postfix's own decoration stays under the 510-byte reply limit. A temporary
reply must be 4xx: a transient fault never yields a 5xx.

A placeholder is a bare name (``{address}``): a format spec, a conversion, an index or an
attribute (``{address:d}``, ``{domain!r}``, ``{domain:>3000}``, ``{domain[0]}``) is refused,
since it could raise at every refusal or stretch the reply past the limit. The 400
characters bound the reply as rendered with the longest values the daemon fills in
(``LONGEST``), not only the template: a refusal checked here renders without error and within
the bound for any request.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

__all__ = ["Replies", "validate_reply", "PLACEHOLDERS", "CHECKS", "LONGEST"]

# Exchange Online Protection's texts (learn.microsoft.com, "Support for anonymous inbound email
# messages over IPv6"); 4.4.3 is RFC 3463 "Directory server failure" (a DNS fault).
NOT_OPTED_IN = "550 5.2.1 Service unavailable, [{domain}] does not accept email over IPv6."
NO_REVERSE_DNS = (
    "450 4.7.25 Service unavailable, sending IPv6 address [{address}] must have reverse DNS record."
)
AUTH_FAILED = (
    "450 4.7.26 Service unavailable, message sent over IPv6 [{address}] must pass either SPF or"
    " DKIM validation."
)
TEMPORARY = (
    "451 4.4.3 Service unavailable, temporary DNS failure while checking {check} for IPv6 address"
    " [{address}], please try again later."
)

# Which placeholders each template may use.
PLACEHOLDERS = {
    "not_opted_in": ("domain",),
    "no_reverse_dns": ("address",),
    "auth_failed": ("address",),
    "temporary": ("address", "check"),
}

# The {check} values the decision (reverse DNS, SPF) and the milter (DKIM) fill in.
CHECKS = ("reverse DNS", "SPF", "DKIM")
# The longest text each placeholder can receive. {address}: an IPv6 address is at most 39
# characters, but the fallback for a client_address that does not parse is
# text.printable(client_address, 64), up to 64 characters and "...". {domain}: the recipient
# domain as text.printable(domain, 255) gives it, up to 255 characters and "..." (RFC 1035: a
# domain name is at most 255 octets).
LONGEST = {"address": "f" * 64 + "...", "domain": "d" * 255 + "...",
           "check": max(CHECKS, key=len)}

_REPLY = re.compile(r"^([45])[0-9]{2} ([45])\.[0-9]{1,3}\.[0-9]{1,3} \S")
MAX_TEMPLATE = 400


@dataclass(frozen=True)
class Replies:
    not_opted_in: str = NOT_OPTED_IN
    no_reverse_dns: str = NO_REVERSE_DNS
    auth_failed: str = AUTH_FAILED
    temporary: str = TEMPORARY


def validate_reply(key: str, template: object, temporary: bool = False) -> str:
    """Return ``template`` if it is a usable reply template for ``key``; else raise ValueError.

    ``key`` is the reply's name (``auth_failed``), optionally behind its table
    (``replies.auth_failed``); the error message names it as given.
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"{key} = {template!r}: {why}")

    if not isinstance(template, str):
        raise bad("must be a string")
    if len(template) > MAX_TEMPLATE:
        raise bad(f"longer than {MAX_TEMPLATE} characters")
    if not template.isascii() or not template.isprintable():
        raise bad("must be one line of printable ASCII")
    allowed = PLACEHOLDERS[key.rsplit(".", 1)[-1]]
    try:
        fields = [(f, spec, conversion) for _, f, spec, conversion
                  in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        raise bad(f"bad placeholder syntax ({error}); write a literal brace as {{{{ or }}}}"
                  ) from None
    for name, spec, conversion in fields:
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base not in allowed:
            raise bad(f"unknown placeholder {{{name}}}; allowed: "
                      + ", ".join("{%s}" % a for a in allowed))
        if spec or conversion is not None or name != base:
            raise bad(f"placeholder {{{name}{'!' + conversion if conversion else ''}"
                      f"{':' + spec if spec else ''}}} must be a bare name such as {{{base}}}"
                      " (no format spec, conversion, index or attribute)")
    match = _REPLY.match(template)
    if not match:
        raise bad("must start with a 4xx or 5xx code, an enhanced status code such as 4.7.25,"
                  " and a text")
    if match.group(1) != match.group(2):
        raise bad("the enhanced status class must match the reply code (4xx with 4.x.x,"
                  " 5xx with 5.x.x)")
    if temporary and match.group(1) != "4":
        raise bad("a temporary failure must be answered with a 4xx code, never 5xx")
    rendered = template.format(**{name: LONGEST[name] for name in allowed})
    if len(rendered) > MAX_TEMPLATE:
        used = sorted({name for name, _, _ in fields})
        raise bad(f"renders to {len(rendered)} characters with the longest values ("
                  + ", ".join(f"{{{name}}} {len(LONGEST[name])}" for name in used)
                  + f"); at most {MAX_TEMPLATE}")
    return template
