"""policyd-ipv6: a Postfix SMTPD access policy service for anonymous inbound mail over IPv6.

It applies Exchange Online Protection's rules: the recipient domain must have opted in, the
sending IPv6 address must have reverse DNS, and the sender must pass SPF (or DKIM, through the
built-in milter). This module holds only the version.
"""

__version__ = "0.1.0"
