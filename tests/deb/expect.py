"""What the package tests expect of the installed package, written down once.

The paths the package installs its configuration and README.Debian to, and the replies the
daemon gives, as Exchange Online Protection documents them (copied from the specification,
not from the code, so that a changed text in the code fails the tests). Each reply is
"CODE ENHANCED text" with one %s for the address or domain.
"""

import gzip
from pathlib import Path

ETC = Path("/etc/policyd-ipv6")
CONFIG = ETC / "policyd-ipv6.toml"
OPTIN = ETC / "optin-domains"
# dh_compress gzips documentation over 4 kB, README.Debian included.
README_DEBIAN = Path("/usr/share/doc/policyd-ipv6/README.Debian")

NOT_OPTED = "550 5.2.1 Service unavailable, [%s] does not accept email over IPv6."
NO_PTR = "450 4.7.25 Service unavailable, sending IPv6 address [%s] must have reverse DNS record."
NO_AUTH = ("450 4.7.26 Service unavailable, message sent over IPv6 [%s] must pass either SPF "
           "or DKIM validation.")

# Any valid base64 will do for the lab zones' DKIM record: these tests verify no signature.
FAKE_DKIM_KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 300 + "IDAQAB"


def installed_readme_debian() -> str:
    """The text of the installed README.Debian, compressed or not."""
    packed = README_DEBIAN.with_name(README_DEBIAN.name + ".gz")
    if packed.exists():
        return gzip.decompress(packed.read_bytes()).decode()
    return README_DEBIAN.read_text()
