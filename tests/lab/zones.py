"""Build zone-file text for the test zones served by Knot (see knot.py).

Contract: pure functions and one small builder class, no I/O.
- `Zone(origin)` collects records (`add(owner, type, rdata)`) and renders a zone file with a
  SOA and an apex NS of its own; owners are relative to the origin unless they end in a dot.
- `txt_rdata(text)` quotes a TXT value, split in strings of at most 255 bytes (RFC 1035
  3.3.14), so long SPF and DKIM records are served intact.
- `dkim_txt_rdata(public_key_b64)` is the RFC 6376 key record text.
- `reverse_zone_name(network)` is the ip6.arpa/in-addr.arpa zone of a network on a nibble
  (IPv6) or octet (IPv4) boundary; `reverse_zone(network, ptrs)` that zone with PTR records
  for the chosen addresses only, so any other address inside the network is NXDOMAIN (not
  REFUSED, which a resolver would see as a server failure). Owners come from
  `ipaddress.ip_address(a).reverse_pointer`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

DEFAULT_TTL = 300
# The apex NS must exist (Knot refuses a zone without one); a name outside every test zone
# needs no glue and is never looked up by the code under test.
DEFAULT_NS = "ns.lab.invalid."


def absolute(name: str) -> str:
    """The fully qualified form of a domain name (exactly one trailing dot)."""
    return name.rstrip(".") + "."


def txt_rdata(text: str) -> str:
    """TXT rdata for `text`: quoted, escaped, split every 255 bytes (RFC 1035 3.3.14)."""
    data = text.encode("utf-8")
    chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    out = []
    for chunk in chunks:
        escaped = "".join(
            "\\" + chr(b) if chr(b) in '"\\' else chr(b) if 0x20 <= b < 0x7f else "\\%03d" % b
            for b in chunk)
        out.append('"%s"' % escaped)
    return " ".join(out)


def dkim_txt_rdata(public_key_b64: str, key_type: str = "rsa") -> str:
    """TXT rdata of a DKIM key record (RFC 6376 3.6.1) for a base64 SubjectPublicKeyInfo."""
    return txt_rdata("v=DKIM1; k=%s; p=%s" % (key_type, "".join(public_key_b64.split())))


class Zone:
    """Records of one zone, rendered as a zone file with SOA and NS at the apex."""

    def __init__(self, origin: str, ttl: int = DEFAULT_TTL, ns: str = DEFAULT_NS, serial: int = 1):
        self.origin = absolute(origin).lower()
        self.ttl = ttl
        self.serial = serial
        self.ns = absolute(ns)
        self.records: list[tuple[str, str, str]] = [("@", "NS", self.ns)]

    def add(self, owner: str, rtype: str, rdata: str) -> Zone:
        """Add one record; `owner` is "@", relative to the origin, or absolute (inside the zone)."""
        if owner.endswith(".") and not (owner.lower() == self.origin
                                        or owner.lower().endswith("." + self.origin)):
            raise ValueError("%s is outside zone %s" % (owner, self.origin))
        self.records.append((owner, rtype.upper(), rdata))
        return self

    def text(self) -> str:
        """The zone file."""
        lines = [
            "$ORIGIN %s" % self.origin,
            "$TTL %d" % self.ttl,
            # Short negative TTL (last field): nothing in a test should outlive a cached NXDOMAIN.
            "@ SOA %s hostmaster.%s %d 3600 600 86400 60" % (self.ns, self.origin, self.serial),
        ]
        lines += ["%s %s %s" % record for record in self.records]
        return "\n".join(lines) + "\n"


def forward_zone(origin: str, records: Iterable[tuple[str, str, str]], **kwargs) -> str:
    """Zone-file text for `origin` with the given (owner, type, rdata) records."""
    zone = Zone(origin, **kwargs)
    for owner, rtype, rdata in records:
        zone.add(owner, rtype, rdata)
    return zone.text()


def reverse_zone_name(network: str | ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """The reverse zone (no trailing dot) of a network on a nibble or octet boundary."""
    net = ipaddress.ip_network(network)
    step = 4 if net.version == 6 else 8
    if net.prefixlen % step:
        raise ValueError("%s is not on a %d-bit boundary" % (net, step))
    labels = net.network_address.reverse_pointer.split(".")
    # reverse_pointer has one label per nibble/octet plus the two suffix labels.
    host_labels = (net.max_prefixlen - net.prefixlen) // step
    return ".".join(labels[host_labels:])


def reverse_zone(network: str, ptrs: Mapping[str, str | Iterable[str]]) -> tuple[str, str]:
    """(zone name, zone text) of `network`'s reverse zone with PTRs for `ptrs` only.

    `ptrs` maps an address inside `network` to one PTR target name or several.
    """
    net = ipaddress.ip_network(network)
    name = reverse_zone_name(net)
    zone = Zone(name)
    for address, targets in ptrs.items():
        ip = ipaddress.ip_address(address)
        if ip not in net:
            raise ValueError("%s is not inside %s" % (ip, net))
        for target in [targets] if isinstance(targets, str) else targets:
            zone.add(ip.reverse_pointer + ".", "PTR", absolute(target))
    return name, zone.text()


def reverse_zones(networks: Iterable[str],
                  ptrs: Mapping[str, str | Iterable[str]]) -> dict[str, str]:
    """Reverse zones {name: text} for each network, each holding the PTRs of its addresses.

    Every address in `ptrs` must lie in one of `networks`.
    """
    nets = [ipaddress.ip_network(n) for n in networks]
    grouped: dict = {net: {} for net in nets}
    for address, targets in ptrs.items():
        ip = ipaddress.ip_address(address)
        owner = next((net for net in nets if ip.version == net.version and ip in net), None)
        if owner is None:
            raise ValueError("%s is in none of %s" % (ip, ", ".join(map(str, nets))))
        grouped[owner][address] = targets
    return dict(reverse_zone(str(net), group) for net, group in grouped.items())
