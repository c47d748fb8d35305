"""The end-to-end lab's plan: names, addresses, DNS zones, Postfix listeners, daemon configs.

Pure data and text builders (no I/O); `conftest.py` brings the plan to life. Everything lives
inside the lab's two network namespaces and uses documentation prefixes only.

    sender namespace p6e-snd                      MX namespace p6e-mx
    p6e-snd0  2001:db8:1::10  GOOD   ---veth---   p6e-mx0  2001:db8:25::25  Postfix smtpd
              2001:db8:1::20  GHOST                        2001:db8:25::53  Knot (all zones)
              2001:db8:1::30  NOPTR                        192.0.2.25       Postfix smtpd (IPv4)
              2001:db8:2::40  OUTSIDE                      unix socket      policyd-ipv6 (ptr)
              192.0.2.10      IPV4                         127.0.0.1:10045  policyd-ipv6 (fcrdns)
                                                           127.0.0.1:10047  policyd-ipv6 (dead DNS)

Sender cases (SPF of sender.test: "v=spf1 ip6:2001:db8:1::/64 ip4:192.0.2.0/26 -all"):
    GOOD     PTR mail.sender.test, whose AAAA is GOOD (forward-confirmed); inside SPF
    GHOST    PTR ghost.sender.test, whose AAAA is another address; inside SPF
    NOPTR    no PTR (NXDOMAIN in a served reverse zone); inside SPF
    OUTSIDE  PTR out.sender.test, AAAA back; outside SPF (fail)
    IPV4     192.0.2.10, PTR mail.sender.test
HELO mail.sender.test has its own SPF record ("v=spf1 a -all"), which GOOD passes: the
identity of a null sender.
"""

from __future__ import annotations

from lab.zones import Zone, dkim_txt_rdata, reverse_zones, txt_rdata

MX_NS, SENDER_NS = "p6e-mx", "p6e-snd"
MX_IF, SENDER_IF = "p6e-mx0", "p6e-snd0"

MX6 = "2001:db8:25::25"
DNS6 = "2001:db8:25::53"
# On the link's prefix but assigned to nobody: queries to it are never answered.
DEAD_DNS6 = "2001:db8:25::99"
MX4 = "192.0.2.25"
MX_ADDRESSES = [MX6 + "/64", DNS6 + "/64", MX4 + "/24"]

GOOD = "2001:db8:1::10"
GHOST = "2001:db8:1::20"
NOPTR = "2001:db8:1::30"
OUTSIDE = "2001:db8:2::40"
IPV4 = "192.0.2.10"
SENDER_ADDRESSES = [GOOD + "/64", GHOST + "/64", NOPTR + "/64", OUTSIDE + "/64", IPV4 + "/24"]
GHOST_FORWARD = "2001:db8:1::99"  # where ghost.sender.test points instead of GHOST

SENDER_DOMAIN = "sender.test"
HELO = "mail.sender.test"
SENDER = "alice@sender.test"
DKIM_SELECTOR = "lab"

OPTED_IN = "example.com"     # opted in by postfix-examples/optin-domains itself
NOT_OPTED_IN = "example.net"
ADDED_LATER = "example.org"  # written into the opt-in file while the daemons run
RECIPIENT_DOMAINS = [OPTED_IN, NOT_OPTED_IN, ADDED_LATER]

SMTP_PORT = 25            # policy: main daemon, Unix socket, rdns = "ptr" (fragment as is)
SMTP_PORT_FCRDNS = 2525   # policy: second daemon on TCP, rdns = "fcrdns"
SMTP_PORT_DNS_DOWN = 2626  # policy: third daemon whose nameserver never answers

FRAGMENT_ENDPOINT = "unix:policyd-ipv6/policy"  # relative to Postfix's queue directory
EXAMPLE_QUEUE_DIR = "/var/spool/postfix"  # where postfix-examples/policyd-ipv6.toml listens
FCRDNS_PORT = 10045
DNS_DOWN_PORT = 10047
METRICS_PORT = 9145  # the main daemon's metrics_listen, on the MX side's loopback
UNIX_SOCKET_DIR = "policyd-ipv6"  # inside Postfix's queue directory
UNIX_SOCKET_NAME = "policy"


def zones(dkim_public_key_b64: str) -> dict[str, str]:
    """Every zone the lab's Knot serves: {zone name: zone text}."""
    sender = Zone(SENDER_DOMAIN)
    sender.add("@", "MX", "10 mail")
    sender.add("@", "TXT", txt_rdata("v=spf1 ip6:2001:db8:1::/64 ip4:192.0.2.0/26 -all"))
    sender.add("mail", "AAAA", GOOD)
    sender.add("mail", "A", IPV4)
    sender.add("mail", "TXT", txt_rdata("v=spf1 a -all"))
    sender.add("ghost", "AAAA", GHOST_FORWARD)
    sender.add("out", "AAAA", OUTSIDE)
    sender.add("%s._domainkey" % DKIM_SELECTOR, "TXT", dkim_txt_rdata(dkim_public_key_b64))

    mx = Zone(OPTED_IN)
    mx.add("@", "MX", "10 mx")
    mx.add("mx", "AAAA", MX6)
    mx.add("mx", "A", MX4)

    result = {SENDER_DOMAIN: sender.text(), OPTED_IN: mx.text()}
    result.update(reverse_zones(
        ["2001:db8:1::/64", "2001:db8:2::/64", "2001:db8:25::/64", "192.0.2.0/24"],
        {GOOD: "mail.sender.test", GHOST: "ghost.sender.test", OUTSIDE: "out.sender.test",
         IPV4: "mail.sender.test", MX6: "mx.example.com", MX4: "mx.example.com"}))
    return result


def postfix_settings(fragment_restrictions: str, fcrdns_endpoint: str) -> dict[str, str]:
    """main.cf settings of the lab (the fragment itself is appended verbatim after these).

    `fragment_restrictions` is the fragment's smtpd_recipient_restrictions value; the variant
    listeners use it with only the policy endpoint changed, so they test the same wiring:
    `fcrdns_endpoint` (a Postfix endpoint such as "inet:127.0.0.1:10045") for the fcrdns one.
    """
    if fragment_restrictions.count(FRAGMENT_ENDPOINT) != 1:
        raise ValueError("the fragment no longer names %s once: %s"
                         % (FRAGMENT_ENDPOINT, fragment_restrictions))
    return {
        "myhostname": "mx.example.com",
        "mydomain": "example.com",
        "inet_protocols": "all",
        "mynetworks": "127.0.0.0/8 [::1]/128",
        "virtual_mailbox_domains": " ".join(RECIPIENT_DOMAINS),
        "smtpd_banner": "$myhostname ESMTP lab",
        "lab_fcrdns_restrictions": fragment_restrictions.replace(
            FRAGMENT_ENDPOINT, fcrdns_endpoint),
        "lab_dns_down_restrictions": fragment_restrictions.replace(
            FRAGMENT_ENDPOINT, "inet:127.0.0.1:%d" % DNS_DOWN_PORT),
    }


def postfix_services() -> list[str]:
    """The lab's smtpd listeners (master.cf lines), chroot off."""
    smtpd = "inet  n       -       n       -       -       smtpd"
    return [
        "[%s]:%d %s" % (MX6, SMTP_PORT, smtpd),
        "%s:%d %s" % (MX4, SMTP_PORT, smtpd),
        "[%s]:%d %s\n  -o smtpd_recipient_restrictions=$lab_fcrdns_restrictions"
        % (MX6, SMTP_PORT_FCRDNS, smtpd),
        "[%s]:%d %s\n  -o smtpd_recipient_restrictions=$lab_dns_down_restrictions"
        % (MX6, SMTP_PORT_DNS_DOWN, smtpd),
    ]


def in_queue_dir(endpoints: list[str], queue_dir: str) -> list[str]:
    """The example's Unix-socket endpoints moved from /var/spool/postfix to `queue_dir`."""
    prefix = "unix:%s/" % EXAMPLE_QUEUE_DIR
    moved = ["unix:%s/%s" % (queue_dir, e[len(prefix):]) if e.startswith(prefix) else e
             for e in endpoints]
    if moved == list(endpoints):
        raise ValueError("no endpoint below %s: %s" % (EXAMPLE_QUEUE_DIR, endpoints))
    return moved


def daemon_overrides(optin_file: str, example: dict, queue_dir: str) -> dict[str, dict]:
    """Per daemon name, the keys changed from postfix-examples/policyd-ipv6.toml (`example`,
    parsed); its sockets move into the lab Postfix's `queue_dir` (only their paths change)."""
    common = {
        # Started as root like a system service; it binds, then drops to this account. The lab
        # creates no account on the host: "nobody" exists everywhere and owns nothing here.
        "user": "nobody",
        "optin_file": optin_file,
        # Lab-fast: the opt-in test waits for the poll; DNS answers come from the same link.
        "optin_reload_interval_seconds": 0.2,
        "dns_timeout_seconds": 1.0,
        "decision_deadline_seconds": 5.0,
    }
    return {
        # The example's listeners, moved into the queue directory: the fragment's endpoint
        # must reach `listen`; the milter listens (lock file and all) though Postfix ignores it.
        "main": dict(common, listen=in_queue_dir(example["listen"], queue_dir),
                     milter_listen=in_queue_dir(example["milter_listen"], queue_dir),
                     metrics_listen=["tcp:%d:interface=127.0.0.1" % METRICS_PORT]),
        # A TCP listener, so that TCP stays tested end to end.
        "fcrdns": dict(common, rdns="fcrdns", milter_listen=[],
                       listen=["tcp:%d:interface=127.0.0.1" % FCRDNS_PORT]),
        # Under the deadline the only possible outcome is a temporary failure.
        "dns_down": dict(common, listen=["tcp:%d:interface=127.0.0.1" % DNS_DOWN_PORT],
                         milter_listen=[], nameservers=["[%s]:53" % DEAD_DNS6],
                         decision_deadline_seconds=3.0),
    }
