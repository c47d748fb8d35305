"""What the package tests expect of the installed package, written down once.

The paths the package installs its configuration to, and the replies the daemon gives, as
Exchange Online Protection documents them (copied from the specification, not from the code,
so that a changed text in the code fails the tests). Each reply is "CODE ENHANCED text" with
one %s for the address or domain.
"""

from pathlib import Path

ETC = Path("/etc/policyd-ipv6")
CONFIG = ETC / "policyd-ipv6.toml"
OPTIN = ETC / "optin-domains"

NOT_OPTED = "550 5.2.1 Service unavailable, [%s] does not accept email over IPv6."
NO_PTR = "450 4.7.25 Service unavailable, sending IPv6 address [%s] must have reverse DNS record."
NO_AUTH = ("450 4.7.26 Service unavailable, message sent over IPv6 [%s] must pass either SPF "
           "or DKIM validation.")

# Any valid base64 will do for the lab zones' DKIM record: these tests verify no signature.
FAKE_DKIM_KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 300 + "IDAQAB"
