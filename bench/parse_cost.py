"""Cost of parsing DNS replies: dnspython's messages against policyd_ipv6.resolver.reply.

Contract: `python3 bench/parse_cost.py` renders five replies the daemon meets (a PTR of an
ip6.arpa name, an AAAA, an SPF TXT, an MX of two exchanges, a 61 KB TXT record) with
dnspython, checks that both parsers give the same Answer for each, and prints a markdown table
of the best of five timings of `from_wire` + `lookups.interpret` against `parse_reply` +
`lookups.interpret`, in microseconds. No I/O beyond printing; run it with each interpreter.
"""

import os
import sys
import time

import dns.message
import dns.rrset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from policyd_ipv6.resolver.lookups import interpret  # noqa: E402
from policyd_ipv6.resolver.reply import parse_reply  # noqa: E402

PTR = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."
SPF = ['"v=spf1 ip6:2001:db8:1234::/64 include:p7.example -all"',
       '"google-site-verification=abcdefghijklmnopqrstuvwxyz0123456789"']
BIG = [" ".join(f'"{i:03d}{"x" * 247}"' for i in range(245))]


def reply(qname, rrtype, values):
    response = dns.message.make_response(dns.message.make_query(qname, rrtype, use_edns=0))
    response.answer.append(dns.rrset.from_text_list(qname, 300, "IN", rrtype, values))
    return response.to_wire(max_size=65535)


CASES = [("PTR of an ip6.arpa name", "PTR", reply(PTR, "PTR", ["mail.s1234.example."])),
         ("AAAA", "AAAA", reply("mail.s1234.example.", "AAAA", ["2001:db8::25"])),
         ("TXT, an SPF record and one more", "TXT", reply("s1234.example.", "TXT", SPF)),
         ("MX, 2 exchanges", "MX", reply("s1234.example.", "MX",
                                         ["10 mx1.s1234.example.", "20 mx2.s1234.example."])),
         ("TXT, 245 strings of 250 bytes", "TXT", reply("big.example.", "TXT", BIG))]


def best_us(call, repeat):
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            call()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1e6


def main():
    print("| reply | bytes | dnspython µs | reply.py µs | ratio |")
    print("|---|---|---|---|---|")
    for label, rrtype, wire in CASES:
        old = interpret(dns.message.from_wire(wire), rrtype, 3600)
        assert interpret(parse_reply(wire), rrtype, 3600) == old, label
        repeat = 20 if len(wire) > 10_000 else 3000
        a = best_us(lambda w=wire, t=rrtype: interpret(dns.message.from_wire(w), t, 3600), repeat)
        b = best_us(lambda w=wire, t=rrtype: interpret(parse_reply(w), t, 3600), repeat)
        print(f"| {label} | {len(wire):,} | {a:.1f} | {b:.1f} | {a / b:.1f}× |")


if __name__ == "__main__":
    main()
