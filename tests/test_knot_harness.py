"""The Knot test harness (tests/lab/knot.py, tests/lab/zones.py) serves exactly what the zones say.

Other tests trust this harness for real-DNS facts, so these tests query it with dnspython (the
library the daemon uses) and check answers, NXDOMAIN and REFUSED, on IPv4 and IPv6 loopback.
"""

import ipaddress

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from lab.knot import KnotError, KnotServer, free_port, require_knot
from lab.zones import (
    Zone,
    dkim_txt_rdata,
    forward_zone,
    reverse_zone,
    reverse_zone_name,
    reverse_zones,
    txt_rdata,
)

SENDER_NET6 = "2001:db8:1::/64"
SENDER_NET4 = "192.0.2.0/24"
WITH_PTR = "2001:db8:1::10"
WITHOUT_PTR = "2001:db8:1::30"
# Long enough to need two TXT strings: the harness must not truncate DKIM keys.
FAKE_KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 300 + "IDAQAB"


def _zones() -> dict:
    forward = forward_zone("sender.test", [
        ("@", "MX", "10 mail"),
        ("@", "TXT", txt_rdata("v=spf1 ip6:2001:db8:1::/64 ip4:192.0.2.0/26 -all")),
        ("mail", "AAAA", WITH_PTR),
        ("mail", "A", "192.0.2.10"),
        ("sel._domainkey", "TXT", dkim_txt_rdata(FAKE_KEY)),
    ])
    zones = {"sender.test": forward}
    zones.update(reverse_zones([SENDER_NET6, SENDER_NET4],
                               {WITH_PTR: "mail.sender.test", "192.0.2.10": "mail.sender.test"}))
    return zones


@pytest.fixture(scope="module")
def knot():
    """One Knot server on 127.0.0.1 and ::1 (a free high port) serving the test zones."""
    require_knot()
    port = free_port()
    with KnotServer(_zones(), [("127.0.0.1", port), ("::1", port)]) as server:
        yield server


def ask(server_address: str, port: int, name: str, rtype: str) -> dns.message.Message:
    """One UDP query to the harness, as the daemon's resolver would send it."""
    query = dns.message.make_query(name, rtype)
    return dns.query.udp(query, server_address, port=port, timeout=2)


def rdata_texts(response: dns.message.Message, rtype: str) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer
                  if rrset.rdtype == dns.rdatatype.from_text(rtype) for rd in rrset)


# -- zone builders (no Knot needed) --------------------------------------------------------

def test_reverse_zone_name_follows_nibbles_and_octets():
    """reverse_zone_name gives the ip6.arpa zone of a /64 and the in-addr.arpa zone of a /24."""
    assert reverse_zone_name("2001:db8:1::/64") == "0.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    assert reverse_zone_name("192.0.2.0/24") == "2.0.192.in-addr.arpa"
    with pytest.raises(ValueError):
        reverse_zone_name("2001:db8::/63")


def test_reverse_zone_holds_only_the_chosen_ptrs():
    """reverse_zone writes a PTR for each chosen address and none for the others."""
    name, text = reverse_zone(SENDER_NET6, {WITH_PTR: ["a.test", "b.test."]})
    owner = ipaddress.ip_address(WITH_PTR).reverse_pointer + "."
    assert "%s PTR a.test." % owner in text and "%s PTR b.test." % owner in text
    assert ipaddress.ip_address(WITHOUT_PTR).reverse_pointer not in text
    with pytest.raises(ValueError):
        reverse_zone(SENDER_NET6, {"2001:db8:2::1": "x.test"})


def test_txt_rdata_splits_at_255_bytes_and_escapes_quotes():
    """txt_rdata splits long values into 255-byte strings and escapes quotes and backslashes."""
    assert txt_rdata('a"b\\c') == '"a\\"b\\\\c"'
    parts = txt_rdata("x" * 600).split(" ")
    assert [len(p) - 2 for p in parts] == [255, 255, 90]


def test_zone_refuses_an_owner_outside_its_origin():
    """Zone.add rejects an absolute owner name that is not inside the zone."""
    with pytest.raises(ValueError):
        Zone("sender.test").add("www.other.test.", "A", "192.0.2.1")


# -- the running server ----------------------------------------------------------------------

@pytest.mark.knot
@pytest.mark.parametrize("family_address", ["127.0.0.1", "::1"])
def test_knot_answers_forward_records(knot, family_address):
    """Knot answers the zone's AAAA, A and MX records authoritatively on both loopbacks."""
    port = knot.listen[0][1]
    aaaa = ask(family_address, port, "mail.sender.test", "AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and aaaa.flags & dns.flags.AA
    assert rdata_texts(aaaa, "AAAA") == [WITH_PTR]
    assert rdata_texts(ask(family_address, port, "mail.sender.test", "A"), "A") == ["192.0.2.10"]
    assert rdata_texts(ask(family_address, port, "sender.test", "MX"), "MX") == [
        "10 mail.sender.test."]


@pytest.mark.knot
def test_knot_serves_spf_and_long_dkim_txt_intact(knot):
    """TXT records come back whole: the SPF policy, and a DKIM key split over several strings."""
    port = knot.listen[0][1]
    spf = ask("127.0.0.1", port, "sender.test", "TXT")
    assert [b"".join(rd.strings) for rrset in spf.answer for rd in rrset] == [
        b"v=spf1 ip6:2001:db8:1::/64 ip4:192.0.2.0/26 -all"]
    dkim = ask("127.0.0.1", port, "sel._domainkey.sender.test", "TXT")
    (key,) = [b"".join(rd.strings) for rrset in dkim.answer for rd in rrset]
    assert key == ("v=DKIM1; k=rsa; p=" + FAKE_KEY).encode()


@pytest.mark.knot
def test_knot_answers_ptr_only_for_chosen_addresses(knot):
    """A chosen address has its PTR (IPv6 and IPv4); another address in the prefix is NXDOMAIN."""
    port = knot.listen[0][1]
    for address in (WITH_PTR, "192.0.2.10"):
        owner = ipaddress.ip_address(address).reverse_pointer
        assert rdata_texts(ask("::1", port, owner, "PTR"), "PTR") == ["mail.sender.test."]
    missing = ask("::1", port, ipaddress.ip_address(WITHOUT_PTR).reverse_pointer, "PTR")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.flags & dns.flags.AA


@pytest.mark.knot
def test_knot_says_nxdomain_and_nodata_for_what_the_zone_lacks(knot):
    """A name not in the zone is NXDOMAIN; a name lacking the asked type is NOERROR, no answer."""
    port = knot.listen[0][1]
    assert ask("127.0.0.1", port, "nothere.sender.test", "A").rcode() == dns.rcode.NXDOMAIN
    nodata = ask("127.0.0.1", port, "sender.test", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer


@pytest.mark.knot
def test_knot_refuses_zones_it_does_not_serve(knot):
    """A name outside every configured zone is REFUSED (what a resolver sees as a server fault)."""
    port = knot.listen[0][1]
    assert ask("127.0.0.1", port, "example.org", "A").rcode() == dns.rcode.REFUSED


@pytest.mark.knot
def test_a_broken_zone_fails_start_with_knots_log():
    """A zone Knot cannot load makes start() raise KnotError quoting knotd's log, and clean up."""
    require_knot()
    server = KnotServer({"broken.test": "$ORIGIN broken.test.\n@ SOA this is not a soa\n"},
                        [("127.0.0.1", free_port())])
    with pytest.raises(KnotError) as raised:
        server.start()
    assert "broken.test" in str(raised.value)
    assert server.process is None and server.directory is None


@pytest.mark.knot
def test_stop_ends_the_process_and_the_answers():
    """After the with-block knotd has exited (by PID) and no longer answers on its port."""
    require_knot()
    port = free_port()
    with KnotServer({"sender.test": forward_zone("sender.test", [("mail", "A", "192.0.2.10")])},
                    [("127.0.0.1", port)]) as server:
        process = server.process
        assert rdata_texts(ask("127.0.0.1", port, "mail.sender.test", "A"), "A") == ["192.0.2.10"]
    assert process.poll() is not None
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query("mail.sender.test", "A"), "127.0.0.1", port=port,
                      timeout=0.5)
