"""The test DNS data of the lookup tests, served by a real Knot on loopback.

One forward zone (``sender.test``) and one reverse zone (``2001:db8:1::/64``) cover each case
the checks must tell apart; ``silent_udp()`` gives a loopback address/port that receives and
never answers (a black-holed server) for timeout tests.
"""

from __future__ import annotations

import socket

from lab.zones import forward_zone, reverse_zones, txt_rdata

NET = "2001:db8:1::/64"
WITH_PTR = "2001:db8:1::10"         # PTR mail.sender.test, whose AAAA is this address
NOT_BACK = "2001:db8:1::20"         # PTR noback.sender.test, whose AAAA is another address
NO_PTR = "2001:db8:1::30"           # no PTR
TWO_PTRS = "2001:db8:1::40"         # PTRs gone.sender.test (no AAAA) and mail2.sender.test
CNAME_LOOP = "2001:db8:1::50"       # PTR loop1.sender.test, a CNAME loop
NUMERIC = "2001:db8:1::60"          # PTR 192.0.2.1 (not a host name)
OUTSIDE = "2001:db8:2::10"          # outside every SPF range
BIG_TXT = ("v=spf1 " + " ".join(f"ip6:2001:db8:{i:x}::/48" for i in range(3, 90))
           + " ip6:2001:db8:1::/64 -all")


def zones() -> dict[str, str]:
    spf = lambda text: txt_rdata(text)  # noqa: E731
    forward = forward_zone("sender.test", [
        ("mail", "AAAA", WITH_PTR),
        ("mail2", "AAAA", TWO_PTRS),
        ("noback", "AAAA", "2001:db8:1::99"),
        ("loop1", "CNAME", "loop2"),
        ("loop2", "CNAME", "loop1"),
        ("pass", "TXT", spf("v=spf1 ip6:2001:db8:1::/64 -all")),
        ("fail", "TXT", spf("v=spf1 ip6:2001:db8:9::/64 -all")),
        ("softfail", "TXT", spf("v=spf1 ip6:2001:db8:9::/64 ~all")),
        ("neutral", "TXT", spf("v=spf1 ?all")),
        ("nospf", "TXT", spf("just some text")),
        ("permerror", "TXT", spf("v=spf1 ip6:2001:db8:1::/64 frobnicate -all")),
        ("include", "TXT", spf("v=spf1 include:_spf.sender.test -all")),
        ("_spf", "TXT", spf("v=spf1 mx:mx.sender.test -all")),
        ("mx", "MX", "10 mail"),
        ("helo", "TXT", spf("v=spf1 ip6:2001:db8:1::10 -all")),
        ("big", "TXT", spf(BIG_TXT)),
        ("loopinc", "TXT", spf("v=spf1 include:loopinc.sender.test -all")),
        ("voids", "TXT", spf("v=spf1 a:v1.sender.test a:v2.sender.test a:v3.sender.test -all")),
    ])
    result = {"sender.test": forward}
    result.update(reverse_zones([NET], {
        WITH_PTR: "mail.sender.test",
        NOT_BACK: "noback.sender.test",
        TWO_PTRS: ["gone.sender.test", "mail2.sender.test"],
        CNAME_LOOP: "loop1.sender.test",
        NUMERIC: "192.0.2.1",
    }))
    return result


def silent_udp() -> tuple[socket.socket, int]:
    """A bound UDP socket on 127.0.0.1 that nobody reads: queries to it time out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]
