"""Generate the benchmark's DNS data: zone files for Knot and the sender population.

Contract: `generate(directory, cold=N, warm=W, slow=S, seed=...)` writes two zone files
(`example.zone`, `ip6.zone`) and `population.json`, and returns the population. Everything is
under documentation names and prefixes (`example.`, 2001:db8::/32). Deterministic for a seed.

What the zones hold (issue 7: "thousands of generated sender domains ... reverse zones ... one
zone whose nameserver never answers"):
- sender domains `cN.example` (cold pool), `wN.example` (warm set), each with an SPF record of
  one of these shapes (shares in SPF_SHAPES): `ip6:` of the client's /64; `include:` of a
  provider record (`_spf.pK.example`, shared by many senders, like a mail provider's); `mx`
  (MX host whose AAAA is the client); a heavier `a mx include ip6` record; a record the client
  fails; no SPF record at all.
- client addresses, one /64 per sender, reverse-mapped in the /32 reverse zone
  `8.b.d.0.1.0.0.2.ip6.arpa.` (shares in PTR_SHAPES): PTR to `mta.<domain>` whose AAAA is the
  client (forward-confirmed); no PTR; a PTR whose name has no AAAA (does not resolve back).
- slow senders `sN.dead.example`: each is delegated to its own nameserver address in
  2001:db8:dead::/48, which the lab routes into a black hole. One address per name, because
  unbound marks a single dead address down after a few timeouts and then answers SERVFAIL at
  once, which would hide the slowness the slow-mix scenario is about.

- hostile senders `hN.example` (issue 12): an SPF record of 10 `include:`s, each of a name
  `iK.hN.big.example` that the wildcard `*.big.example` answers with about 62 KB of TXT (245
  strings of 250 bytes: over UDP truncated, then over TCP), unique per sender so that no
  cache helps; the client address is in an `ip6:` after the includes. `big.example` is its
  own zone (`big.zone`), reached by unbound straight from Knot's TCP-capable listener.

Each population entry is what Postfix's smtpd would know about that client when it asks the
policy service: [client_address, client_name, reverse_client_name, helo_name, sender_domain,
ptr_shape, spf_shape]. client_name/reverse_client_name follow smtpd_peer.c: `unknown` when the
lookup fails, client_name `unknown` when the PTR name does not resolve back.
"""

import ipaddress
import json
import os
import random

ZONE = "example."
REVERSE_ZONE = "8.b.d.0.1.0.0.2.ip6.arpa."
NS_ADDRESS = "2001:db8:ffff::1"      # the delay relay, which unbound takes for the authority
DEAD_PREFIX = "2001:db8:dead"        # /48 black-holed by the lab
BIG_ZONE = "big.example."           # the wildcard of ~62 KB TXT answers (hostile senders)
BIG_STRINGS, BIG_STRING_BYTES = 245, 250
HOSTILE_INCLUDES = 10
OPTIN_DOMAIN = "optin.example"       # recipient domain in the opt-in file
OTHER_DOMAIN = "other.example"       # recipient domain not opted in
PROVIDERS = 20
TTL = 3600

SPF_SHAPES = [("ip6", 35), ("include", 25), ("mx", 15), ("heavy", 10), ("fail", 8), ("none", 7)]
PTR_SHAPES = [("fcrdns", 85), ("noptr", 8), ("notback", 7)]
# Second hextet of the client's /64 per pool and SPF shape; the provider records cover the
# "include" hextets so that those clients pass through the include.
POOL_BASE = {"c": 0x1000, "w": 0x6000, "s": 0x7000, "h": 0x8000}
SHAPE_OFFSET = {"ip6": 0, "include": 0x100, "mx": 0x200, "heavy": 0x300, "fail": 0x400,
                "none": 0x500, "hostile": 0x600}


def pick(rng, shapes):
    roll = rng.randrange(sum(weight for _, weight in shapes))
    for name, weight in shapes:
        if roll < weight:
            return name
        roll -= weight
    raise AssertionError("unreachable")


def client_prefix(pool, shape, index):
    return f"2001:db8:{POOL_BASE[pool] + SHAPE_OFFSET[shape]:x}:{index:x}"


def sender(rng, pool, index, records, ptrs, domain=None, spf_shape=None, ptr_shape=None):
    """Add one sender's records; return its population entry."""
    label = f"{pool}{index}"
    domain = domain or f"{label}.example"
    spf_shape = spf_shape or pick(rng, SPF_SHAPES)
    ptr_shape = ptr_shape or pick(rng, PTR_SHAPES)
    net = ipaddress.IPv6Network(client_prefix(pool, spf_shape, index) + "::/64")
    # Canonical text, as Postfix sends client_address (inet_ntop) and as records are written.
    address = str(net[0x25])
    provider = f"_spf.p{index % PROVIDERS}.example"
    spf = {
        "ip6": f"v=spf1 ip6:{net} -all",
        "include": f"v=spf1 include:{provider} -all",
        "mx": "v=spf1 mx -all",
        "heavy": f"v=spf1 a mx include:{provider} ip6:{net} -all",
        "fail": "v=spf1 ip6:2001:db8:ffff:ffff::/64 -all",
        "hostile": "v=spf1 " + " ".join(f"include:i{k}.{label}.{BIG_ZONE.rstrip('.')}"
                                        for k in range(HOSTILE_INCLUDES)) + f" ip6:{net} -all",
        "none": None,
    }[spf_shape]
    if spf is not None and not domain.endswith(".dead.example"):
        records.append(f'{domain}. TXT "{spf}"')
    if spf_shape in ("mx", "heavy"):
        records.append(f"{domain}. MX 10 mx.{label}.example.")
        records.append(f"mx.{label}.example. AAAA {address}")
    if spf_shape == "heavy":
        records.append(f"{domain}. AAAA {net[0x80]}")  # the `a` term: a web server, no match
    # smtpd's view of the client (PF smtpd_peer.c), and the records that produce it.
    host = f"mta.{label}.example"
    reverse = ipaddress.ip_address(address).reverse_pointer + "."
    if ptr_shape == "fcrdns":
        ptrs.append(f"{reverse} PTR {host}.")
        records.append(f"{host}. AAAA {address}")
        names = (host, host)
    elif ptr_shape == "notback":
        ptrs.append(f"{reverse} PTR {host}.")
        names = ("unknown", host)
    else:
        names = ("unknown", "unknown")
    return [address, names[0], names[1], host, domain, ptr_shape, spf_shape]


def header(origin):
    return [f"$ORIGIN {origin}", f"$TTL {TTL}",
            f"@ SOA ns.example. hostmaster.example. 1 3600 600 86400 {TTL}",
            "@ NS ns.example."]


def big_zone():
    """The zone of ~62 KB TXT answers: one wildcard, distinct strings (a set drops repeats)."""
    strings = " ".join(f'"{i:03d}' + "x" * (BIG_STRING_BYTES - 3) + '"'
                       for i in range(BIG_STRINGS))
    return header(BIG_ZONE) + [f"* TXT {strings}"]


def generate(directory, cold=20000, warm=50, slow=3000, seed=7, hostile=None):
    """Write example.zone, ip6.zone, big.zone and population.json into directory; return the
    population (``hostile`` senders: a tenth of the cold pool unless given)."""
    hostile = cold // 10 if hostile is None else hostile
    if max(cold, warm, slow, hostile) > 0xFFFF:
        raise ValueError("at most 65535 senders per pool (one hextet of the address)")
    rng = random.Random(seed)
    records, ptrs = header(ZONE), header(REVERSE_ZONE)
    records.append(f"ns.example. AAAA {NS_ADDRESS}")
    include_ranges = " ".join(f"ip6:2001:db8:{base + SHAPE_OFFSET['include']:x}::/48"
                              for base in POOL_BASE.values())
    for k in range(PROVIDERS):
        records.append(f'_spf.p{k}.example. TXT "v=spf1 {include_ranges} -all"')
    population = {
        "cold": [sender(rng, "c", i, records, ptrs) for i in range(cold)],
        "warm": [sender(rng, "w", i, records, ptrs, spf_shape=pick(rng, SPF_SHAPES[:4]))
                 for i in range(warm)],
        "slow": [],
        "hostile": [sender(rng, "h", i, records, ptrs, spf_shape="hostile", ptr_shape="fcrdns")
                    for i in range(hostile)],
        "optin_domain": OPTIN_DOMAIN,
        "other_domain": OTHER_DOMAIN,
    }
    for i in range(slow):
        domain = f"s{i}.dead.example"
        # A good PTR, so that only the SPF lookup (under the dead zone) decides.
        entry = sender(rng, "s", i, records, ptrs, domain=domain, spf_shape="ip6",
                       ptr_shape="fcrdns")
        records.append(f"{domain}. NS ns.{domain}.")
        records.append(f"ns.{domain}. AAAA {DEAD_PREFIX}::{i + 1:x}")
        population["slow"].append(entry)
    os.makedirs(directory, exist_ok=True)
    for name, lines in (("example.zone", records), ("ip6.zone", ptrs),
                        ("big.zone", big_zone())):
        with open(os.path.join(directory, name), "w") as out:
            out.write("\n".join(lines) + "\n")
    with open(os.path.join(directory, "population.json"), "w") as out:
        json.dump(population, out)
    return population


if __name__ == "__main__":
    import sys
    pop = generate(sys.argv[1] if len(sys.argv) > 1 else "/tmp/p6b-zones")
    print({k: len(v) for k, v in pop.items() if isinstance(v, list)})
