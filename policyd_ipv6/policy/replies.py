"""The reply texts: EOP's wording as defaults, and the checks an override must pass.

Contract: ``Replies`` holds one ``str.format`` template per refusal. ``validate_reply(key,
template, placeholders, temporary)`` raises ``ValueError`` (with a message naming the key and
value) unless the template renders as a valid Postfix access(5) reject action: a 4xx or 5xx
code, an RFC 3463 enhanced status code whose class digit equals the code's first digit
(Postfix would otherwise rewrite it, smtpd_check.c), printable ASCII, one line, at most 400
characters so that Postfix's own decoration stays under the 510-byte reply limit. A temporary
reply must be 4xx: a transient fault never yields a 5xx.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

__all__ = ["Replies", "validate_reply", "PLACEHOLDERS"]

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
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        raise bad(f"bad placeholder syntax ({error})") from None
    for name in fields:
        if name not in allowed:
            raise bad(f"unknown placeholder {{{name}}}; allowed: "
                      + ", ".join("{%s}" % a for a in allowed))
    match = _REPLY.match(template)
    if not match:
        raise bad("must start with a 4xx or 5xx code, an enhanced status code such as 4.7.25,"
                  " and a text")
    if match.group(1) != match.group(2):
        raise bad("the enhanced status class must match the reply code (4xx with 4.x.x,"
                  " 5xx with 5.x.x)")
    if temporary and match.group(1) != "4":
        raise bad("a temporary failure must be answered with a 4xx code, never 5xx")
    return template
