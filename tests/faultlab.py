"""The DNS data of the fault tests (test_dns_faults.py): what Knot serves, what the bad server
of lab/baddns.py does for each name, and the reply each case must get.

- 2001:db8:6::/64 and ``robust.test``: Knot. PTRs plain, behind CNAMEs (RFC 2317 style, in the
  zone and into another zone), behind chains of 11 and 31 CNAMEs and a loop; SPF records that
  loop, need too many lookups, hit the void-lookup limit, are malformed or huge.
- 2001:db8:7::/64 and ``bad.test``: the bad server, one behaviour per name (``bad_table()``).
- 2001:db8:8::/64 and ``dropped.test``: denied by unbound; ``hole.test``: a black-holed stub.

Reply patterns: ``TEMP_RDNS``/``TEMP_SPF`` (451 4.4.3 naming the check), ``NO_PTR`` (450
4.7.25), ``AUTH`` (450 4.7.26), ``DUNNO``.
"""

import ipaddress

from lab.baddns import Behaviour
from lab.zones import Zone, reverse_zone_name, txt_rdata

DUNNO = r"DUNNO"
TEMP_RDNS = r"451 4\.4\.3 .*reverse DNS.*"
TEMP_SPF = r"451 4\.4\.3 .*SPF.*"
NO_PTR = r"450 4\.7\.25 .*"
AUTH = r"450 4\.7\.26 .*"


def knot_ip(n: int) -> str:
    return f"2001:db8:6::{n}"


def bad_ip(n: int) -> str:
    return f"2001:db8:7::{n:x}"


def ptr_name(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer


KNOT_REV = reverse_zone_name("2001:db8:6::/64")
BAD_REV = reverse_zone_name("2001:db8:7::/64")
DROPPED_REV = reverse_zone_name("2001:db8:8::/64")
HUGE_SPF = ("v=spf1 " + " ".join(f"ip6:2001:db8:{i:x}::/48" for i in range(0x100, 0x400))
            + " ip6:2001:db8:6::/64 ip6:2001:db8:7::/64 -all")
LONG_LOCAL = "x" * 63  # %{l} five times: a name over 255 octets

SPF_RECORDS = {
    "pass": "v=spf1 ip6:2001:db8:6::/64 ip6:2001:db8:7::/64 -all",
    "selfloop": "v=spf1 include:selfloop.robust.test -all",
    "loopa": "v=spf1 include:loopb.robust.test -all",
    "loopb": "v=spf1 include:loopa.robust.test -all",
    "eleven": "v=spf1 " + " ".join(f"a:h{i}.robust.test" for i in range(11))
              + " ip6:2001:db8:6::/64 -all",
    "voids": "v=spf1 a:v1.robust.test a:v2.robust.test a:v3.robust.test ip6:2001:db8:6::/64 -all",
    "unknownmech": "v=spf1 frobnicate:x.robust.test ip6:2001:db8:6::/64 -all",
    "nonascii": "v=spf1 ip6:2001:db8:6::/64 a:bücher.robust.test -all",
    "macro": "v=spf1 exists:%{l}.%{l}.%{l}.%{l}.%{l}.robust.test ip6:2001:db8:6::/64 -all",
    "huge": HUGE_SPF,
}
# (sender domain under robust.test, client address, SPF result, reply)
SPF_KNOT_CASES = [
    ("pass", knot_ip(10), "pass", DUNNO),
    ("selfloop", knot_ip(10), "permerror", AUTH),       # include loop
    ("loopa", knot_ip(10), "permerror", AUTH),          # include loop over two records
    ("eleven", knot_ip(10), "permerror", AUTH),         # 11 DNS-querying terms
    ("voids", knot_ip(10), "permerror", AUTH),          # 3 void lookups
    ("unknownmech", knot_ip(10), "permerror", AUTH),
    ("nonascii", knot_ip(10), "permerror", AUTH),       # UTF-8 in the record
    ("latin1", knot_ip(10), "permerror", AUTH),         # not even UTF-8
    ("lf", knot_ip(10), "fail", AUTH),                  # ip4:1.2.3.4\010 (pyspf#15)
    ("two", knot_ip(10), "permerror", AUTH),            # two SPF records
    ("macro", knot_ip(10), "pass", DUNNO),              # a macro name over 255 octets
    ("huge", knot_ip(10), "pass", DUNNO),               # ~8 KB TXT: TCP fallback
    ("nothere", knot_ip(10), "none", AUTH),
]


def knot_zones() -> dict[str, str]:
    forward = Zone("robust.test")
    forward.add("mail", "AAAA", knot_ip(10))
    for i in range(11):
        forward.add(f"h{i}", "AAAA", knot_ip(200 + i))
    for name, text in SPF_RECORDS.items():
        forward.add(name, "TXT", txt_rdata(text))
    forward.add("lf", "TXT", '"v=spf1 ip4:1.2.3.4\\010 -all"')
    forward.add("latin1", "TXT", '"v=spf1 ip6:2001:db8:6::/64 a:b\\252cher.robust.test -all"')
    forward.add("two", "TXT", txt_rdata(SPF_RECORDS["pass"]))
    forward.add("two", "TXT", txt_rdata("v=spf1 -all"))
    forward.add("13.ptr", "PTR", "mail.robust.test.")
    rev = Zone(KNOT_REV)
    rev.add(ptr_name(knot_ip(10)) + ".", "PTR", "mail.robust.test.")
    # RFC 2317 style: the ip6.arpa owner is itself a CNAME (in the zone, and into another zone).
    rev.add(ptr_name(knot_ip(12)) + ".", "CNAME", f"12.sub.{KNOT_REV}.")
    rev.add(f"12.sub.{KNOT_REV}.", "PTR", "mail.robust.test.")
    rev.add(ptr_name(knot_ip(13)) + ".", "CNAME", "13.ptr.robust.test.")
    # A chain of 11 CNAMEs (a resolver follows it), one of 31 (no resolver does), a loop.
    rev.add(ptr_name(knot_ip(14)) + ".", "CNAME", f"c1.chain.{KNOT_REV}.")
    for i in range(1, 10):
        rev.add(f"c{i}.chain.{KNOT_REV}.", "CNAME", f"c{i + 1}.chain.{KNOT_REV}.")
    rev.add(f"c10.chain.{KNOT_REV}.", "PTR", "mail.robust.test.")
    rev.add(ptr_name(knot_ip(15)) + ".", "CNAME", f"l1.long.{KNOT_REV}.")
    for i in range(1, 30):
        rev.add(f"l{i}.long.{KNOT_REV}.", "CNAME", f"l{i + 1}.long.{KNOT_REV}.")
    rev.add(f"l30.long.{KNOT_REV}.", "PTR", "mail.robust.test.")
    rev.add(ptr_name(knot_ip(16)) + ".", "CNAME", f"a.loop.{KNOT_REV}.")
    rev.add(f"a.loop.{KNOT_REV}.", "CNAME", f"b.loop.{KNOT_REV}.")
    rev.add(f"b.loop.{KNOT_REV}.", "CNAME", f"a.loop.{KNOT_REV}.")
    return {"robust.test": forward.text(), KNOT_REV: rev.text()}


GOOD_PTR = (("PTR", "mail.bad.test."),)
# PTR behaviours of the bad server, by host number in 2001:db8:7::/64.
BAD_PTRS = {
    0x1: Behaviour("servfail"),
    0x2: Behaviour("refused"),
    0x3: Behaviour("silent"),
    0x4: Behaviour("garbage"),
    0x5: Behaviour("garbage", GOOD_PTR, then_answer=True),
    0x6: Behaviour("wrong-id", GOOD_PTR),
    0x7: Behaviour("wrong-id", GOOD_PTR, then_answer=True),
    0x8: Behaviour("truncate", GOOD_PTR, tcp="close"),
    0x9: Behaviour("truncate", GOOD_PTR, tcp="answer"),
    0xa: Behaviour("answer", GOOD_PTR, delay_ms=150),
    0xb: Behaviour("truncate", GOOD_PTR, tcp="garbage"),
    0xc: Behaviour("truncate", GOOD_PTR, tcp="silent"),
    0x100: Behaviour("answer", GOOD_PTR),
}
PASS_BAD = (("TXT", txt_rdata(SPF_RECORDS["pass"])),)
BAD_NAMES = {
    "pass.bad.test": Behaviour(records=PASS_BAD),
    "servfail.bad.test": Behaviour("servfail"),
    "refused.bad.test": Behaviour("refused"),
    "silent.bad.test": Behaviour("silent"),
    "garbage.bad.test": Behaviour("garbage"),
    "truncate.bad.test": Behaviour("truncate", PASS_BAD, tcp="close"),
    "huge.bad.test": Behaviour(records=(("TXT", txt_rdata(HUGE_SPF)),)),
    "incfail.bad.test": Behaviour(records=(("TXT", txt_rdata(
        "v=spf1 include:servfail.bad.test ip6:2001:db8:7::/64 -all")),)),
    "asilent.bad.test": Behaviour(records=(("TXT", txt_rdata(
        "v=spf1 a:silent.bad.test ip6:2001:db8:7::/64 -all")),)),
}


def bad_table() -> dict:
    table = {ptr_name(bad_ip(n)): b for n, b in BAD_PTRS.items()}
    table.update(BAD_NAMES)
    return table
