"""Tests of the built-in milter's Twisted adapter (policyd_ipv6.milter_server) together with the
policy side, as Postfix drives them: policy requests and milter packets of the same SMTP
sessions, a fake transport and clock, the DNS fake, keys made by openssl, dkimpy signatures."""

import io
import ipaddress
import struct

import dns.name
import pytest
from dkimkeys import DkimKey, message, require_openssl, sign
from fakes import FakeDnsClient
from lab.zones import txt_rdata
from test_milter_session import cstr, macro, optneg, pkt
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from policyd_ipv6.checks.dkim import INLINE_WORK_BYTES
from policyd_ipv6.checks.gather import FactFinder
from policyd_ipv6.daemon.logs import _LineObserver
from policyd_ipv6.milter import end_of_message
from policyd_ipv6.milter import server as milter_server
from policyd_ipv6.milter.registry import Sessions
from policyd_ipv6.milter.server import MilterFactory
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import Policy
from policyd_ipv6.policy.engine import PolicyEngine
from policyd_ipv6.policy.replies import Replies
from policyd_ipv6.policy.server import PolicyFactory
from policyd_ipv6.report.lines import parse_line
from policyd_ipv6.resolver.lookups import Lookups

ADDR = "2001:db8:1::10"
SERVER = "2001:db8:25::25"
AUTHSERV = "mx.contoso.com"
PTR = ipaddress.ip_address(ADDR).reverse_pointer
TRUSTED = "2001:db8:ffff::1"
NO_AUTH = (f"450 4.7.26 Service unavailable, message sent over IPv6 [{ADDR}] must pass either "
           "SPF or DKIM validation.")
TEMP_DKIM = (f"451 4.4.3 Service unavailable, temporary DNS failure while checking DKIM for IPv6"
             f" address [{ADDR}], please try again later.")


@pytest.fixture(scope="module")
def key():
    require_openssl()
    return DkimKey.generate(1024)


def records(key):
    return {(PTR, "PTR"): ["mail.sender.test."],
            ("pass.test", "TXT"): ['"v=spf1 ip6:2001:db8:1::/64 -all"'],
            ("fail.test", "TXT"): ['"v=spf1 -all"'],
            ("lab._domainkey.fail.test", "TXT"): [txt_rdata(key.record())]}


class InProcessPool:
    """A dkim_pool.DkimPool stand-in: runs the worker's job in this process, records sizes."""

    def __init__(self, sizes):
        self.sizes = sizes

    def submit(self, request, data):
        from policyd_ipv6.checks import dkim_verify

        self.sizes.append(len(data))
        return defer.maybeDeferred(dkim_verify._handle, [request, data[:request["body_start"]],
                                                         data[request["body_start"]:]])


class Harness:
    """One daemon's policy and milter sides sharing a sessions registry, on a fake clock."""

    def __init__(self, key, broken=(), max_sessions=100, dns_delay=0.0, max_connections=10,
                 dkim_pool=None, eom_deadline=60.0, peer_uids=None):
        self.clock = task.Clock()
        self.fake = FakeDnsClient(records(key), broken=set(broken), clock=self.clock,
                                  delay=dns_delay)
        self.lookups = Lookups(self.fake, self.clock)
        finder = FactFinder(self.lookups, self.clock, "ptr", 5.0)
        table = parse_optin("contoso.com\n")
        self.sessions = Sessions(self.clock, max_sessions, 3600.0)
        policy = Policy((ipaddress.ip_network("2001:db8:ffff::/48"),), Replies())
        self.engine = PolicyEngine(policy, lambda: table, finder, self.clock, self.sessions)
        self.policy_factory = PolicyFactory(self.engine, self.clock, 10, 600.0,
                                            peer_uids=peer_uids)
        self.pooled = []
        self.milter_factory = MilterFactory(self.engine, self.lookups, self.clock, AUTHSERV,
                                            max_connections, 600.0,
                                            dkim_pool or InProcessPool(self.pooled),
                                            eom_deadline_seconds=eom_deadline,
                                            peer_uids=peer_uids)

    def policy(self):
        return Connection(self.policy_factory)

    def milter(self):
        return Connection(self.milter_factory)


class UnixTransport(StringTransport):
    """A StringTransport whose handle is one end of a real Unix socket pair (SO_PEERCRED)."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle

    def getHandle(self):
        return self.handle


class Connection:
    def __init__(self, factory, transport=None):
        self.proto = factory.buildProtocol(None)
        self.transport = transport or StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        """Feed bytes; return (and clear) what was written back."""
        self.proto.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def advance(clock, seconds: float, step: float = 1.0) -> None:
    """Advance the fake clock a step at a time, so calls scheduled meanwhile run too."""
    for _ in range(int(seconds / step)):
        clock.advance(step)


def packets(data: bytes) -> list[tuple[bytes, bytes]]:
    """(code, payload) of each response packet."""
    out = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        out.append((data[4:5], data[5:4 + length]))
        data = data[4 + length:]
    return out


def ask(policy: Connection, sender: str, port: int, recipient="bob@contoso.com",
        address=ADDR, server=True, **extra) -> str:
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": address, "client_port": str(port), "client_name": "unknown",
             "reverse_client_name": "unknown", "helo_name": "mail.sender.test",
             "sender": sender, "recipient": recipient, "instance": f"i{port}.{sender}"}
    if server:
        attrs.update(server_address=SERVER, server_port="25")
    attrs.update(extra)
    reply = policy.send(b"".join(f"{k}={v}\n".encode() for k, v in attrs.items()) + b"\n")
    return reply.decode().strip().removeprefix("action=")


def connect(milter: Connection, port: int, address=ADDR) -> bytes:
    """OPTNEG, then CONNECT with the macros Postfix sends (we asked for them)."""
    milter.send(optneg())
    family = b"6" if ":" in address else b"4"
    return milter.send(macro(b"C", j="mx", daemon_addr=SERVER, daemon_port="25",
                             client_addr="IPv6:" + address, client_port=str(port))
                       + pkt(b"C", b"[x]\0" + family + struct.pack(">H", port)
                             + address.encode() + b"\0"))


def mail(milter: Connection, sender: str, **macros) -> bytes:
    return milter.send(macro(b"M", i="", mail_addr=sender, **macros)
                       + pkt(b"M", cstr(f"<{sender}>".encode(), b"SIZE=100")))


def content(raw: bytes) -> bytes:
    """RCPT, DATA, the message as header/body packets, end of message (Postfix's order)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    headers: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1] += b"\n" + line  # Postfix joins folded lines with a bare LF
        else:
            name, _, value = line.partition(b":")
            headers.append([name, value])
    out = pkt(b"R", cstr(b"<bob@contoso.com>")) + pkt(b"T")
    out += b"".join(pkt(b"L", cstr(name, value)) for name, value in headers)
    return out + pkt(b"N") + pkt(b"B", body) + macro(b"E", i="4ABC") + pkt(b"E")


def session(h, port=4000, sender="alice@fail.test", raw=None, policy=None, address=ADDR,
            policy_sender=None, **mail_macros):
    """One message through milter and policy; returns (policy reply, EOM packets, milter).
    CONNECT gets no reply; MAIL gets CONTINUE (then the policy is asked), whoever the client."""
    milter = h.milter()
    assert connect(milter, port, address) == b""
    assert packets(mail(milter, sender, **mail_macros)) == [(b"c", b"")]
    reply = ask(policy or h.policy(), policy_sender or sender, port, address=address)
    out = milter.send(content(raw if raw is not None else message(sender)))
    return reply, packets(out), milter


# -- end of message ------------------------------------------------------------------------

def test_spf_failed_but_validly_signed_is_accepted_with_authentication_results(key):
    """SPF fail at RCPT gives DUNNO (the milter is on the connection); a valid DKIM signature
    then passes at end of message, and our Authentication-Results is inserted."""
    h = Harness(key)
    raw = sign(message("alice@fail.test"), key, "fail.test", "lab")
    reply, eom, _ = session(h, raw=raw)
    assert reply == "DUNNO"
    assert [code for code, _ in eom] == [b"i", b"c"]
    index, name, value = eom[0][1][:4], *eom[0][1][4:-1].split(b"\0")
    assert struct.unpack(">I", index) == (1,) and name == b"Authentication-Results"
    text = value.decode()
    assert text.startswith(f" {AUTHSERV};\n\tiprev=pass policy.iprev={ADDR} (mail.sender.test);")
    assert "spf=fail smtp.mailfrom=alice@fail.test;" in text
    assert "dkim=pass header.d=fail.test header.s=lab header.b=" in text


def test_spf_failed_and_unsigned_gets_the_4_7_26_reply_verbatim(key):
    """Unsigned: the milter replies with the configured auth_failed text, exactly."""
    h = Harness(key)
    reply, eom, _ = session(h)
    assert reply == "DUNNO"
    assert eom == [(b"y", NO_AUTH.encode() + b"\0")]


def test_spf_failed_and_body_altered_after_signing_gets_4_7_26(key):
    """A signature broken by a changed body is no better than none."""
    h = Harness(key)
    raw = sign(message("alice@fail.test", body=b"Pay 10 EUR.\r\n"), key, "fail.test", "lab")
    _, eom, _ = session(h, raw=raw.replace(b"10 EUR", b"99 EUR"))
    assert eom == [(b"y", NO_AUTH.encode() + b"\0")]


def test_a_key_lookup_failing_temporarily_gives_451_4_4_3_never_5xx(key):
    """SERVFAIL for the key: 451 4.4.3 with check "DKIM" (the configured temporary reply)."""
    h = Harness(key, broken=["lab._domainkey.fail.test"])
    raw = sign(message("alice@fail.test"), key, "fail.test", "lab")
    _, eom, _ = session(h, raw=raw)
    assert eom == [(b"y", TEMP_DKIM.encode() + b"\0")]


def test_spf_pass_gets_our_header_and_forgeries_of_our_authserv_id_are_deleted(key):
    """SPF pass: continue with our A-R; incoming A-R claiming our authserv-id (any case, with
    a comment or a version) are deleted highest index first; another server's A-R stays."""
    h = Harness(key)
    extra = (f"Authentication-Results: {AUTHSERV}; spf=pass smtp.mailfrom=x@pass.test\r\n"
             "Authentication-Results: other.example; dkim=pass\r\n"
             f"Authentication-Results: (forged) {AUTHSERV.upper()} 1;\r\n dkim=pass\r\n").encode()
    reply, eom, _ = session(h, sender="alice@pass.test",
                            raw=message("alice@pass.test", extra=extra))
    assert reply == "DUNNO"
    assert [code for code, _ in eom] == [b"m", b"m", b"i", b"c"]
    deleted = [(struct.unpack(">I", p[:4])[0], p[4:]) for _, p in eom[:2]]
    assert deleted == [(3, b"Authentication-Results\0\0"), (1, b"Authentication-Results\0\0")]
    assert b"spf=pass smtp.mailfrom=alice@pass.test;\n\tdkim=none" in eom[2][1]


FORGERIES = [rb"(a\) b)mx.contoso.com; dkim=pass header.d=bank.example",
             rb"(a \( b)mx.contoso.com; dkim=pass header.d=bank.example",
             b"((((((x))))))mx.contoso.com; dkim=pass header.d=bank.example"]


def forged_message(sender: str, *values: bytes) -> bytes:
    extra = b"".join(b"Authentication-Results: " + v + b"\r\n" for v in values)
    return message(sender, extra=extra + b"Authentication-Results: other.example; spf=pass\r\n")


def deletions(eom) -> list[int]:
    assert all(p[4:] == b"Authentication-Results\0\0" for c, p in eom if c == b"m")
    return [struct.unpack(">I", p[:4])[0] for c, p in eom if c == b"m"]


@pytest.mark.parametrize("address, port", [("192.0.2.10", 4001), (TRUSTED, 4002)])
def test_ipv4_and_trusted_clients_stay_on_the_milter_unregistered_and_lose_forgeries(
        key, address, port):
    """IPv4 and trusted_networks: no reply at CONNECT (the milter stays on the session), no
    registry entry, and at end of message the three forged forms are deleted (highest index
    first), another server's header stays, none of ours is added."""
    h = Harness(key)
    reply, eom, _ = session(h, port, "alice@fail.test", address=address,
                            raw=forged_message("alice@fail.test", *FORGERIES))
    assert reply == "DUNNO" and len(h.sessions) == 0
    assert [c for c, _ in eom] == [b"m", b"m", b"m", b"a"] and deletions(eom) == [3, 2, 1]


def test_authenticated_message_loses_forgeries_and_policy_enforces_nothing(key):
    """{auth_authen} at MAIL: the policy side gets no open message for it, and its forged
    Authentication-Results are deleted at end of message all the same."""
    h = Harness(key)
    milter = h.milter()
    connect(milter, 4003)
    assert packets(mail(milter, "alice@fail.test", auth_authen="alice")) == [(b"c", b"")]
    assert h.sessions.message_for({"client_address": ADDR, "client_port": "4003",
                                   "server_address": SERVER, "server_port": "25",
                                   "sender": "alice@fail.test"}) is None
    eom = packets(milter.send(content(forged_message("alice@fail.test", FORGERIES[0]))))
    assert [c for c, _ in eom] == [b"m", b"a"] and deletions(eom) == [1]


def test_spf_pass_ipv6_message_loses_each_forged_form_and_gets_ours(key):
    """SPF pass from IPv6: the three forged forms are deleted and our header inserted."""
    h = Harness(key)
    _, eom, _ = session(h, 4019, "alice@pass.test",
                        raw=forged_message("alice@pass.test", *FORGERIES))
    assert [c for c, _ in eom] == [b"m", b"m", b"m", b"i", b"c"] and deletions(eom) == [3, 2, 1]


def test_a_quoted_local_part_is_rescued_by_dkim(key):
    """Postfix gives the milter '<"john smith"@fail.test>' and the policy 'john
    smith@fail.test': they are the same sender, so the SPF failure waits for DKIM, which
    passes, and our header is added."""
    h = Harness(key)
    quoted = '"john smith"@fail.test'
    raw = sign(message(quoted), key, "fail.test", "lab")
    reply, eom, _ = session(h, 4020, quoted, raw=raw, policy_sender="john smith@fail.test")
    assert reply == "DUNNO"
    assert [c for c, _ in eom] == [b"i", b"c"] and b"dkim=pass" in eom[0][1]


def test_a_hostile_selector_stays_inside_the_dkim_field_of_the_log_line(key):
    """A passing signature whose s= holds spaces, "=" and ")" (the sender's own zone publishes
    the key there) is logged inside a quoted dkim= field: the line parses back to the
    message's own rule and outcome, not to the rule= and reply= the selector spells."""
    h = Harness(key)
    selector = "x) rule=dkim-failed reply=450 y"
    # The DNS fake keys records by presentation form (a space is \032).
    h.fake.add(dns.name.from_text(f"{selector}._domainkey.fail.test").to_text(True), "TXT",
               txt_rdata(key.record()))
    stream = io.StringIO()
    observer = _LineObserver(stream, "info", None, False)
    globalLogPublisher.addObserver(observer)
    try:
        reply, eom, _ = session(h, 4021, raw=sign(message("alice@fail.test"), key, "fail.test",
                                                  selector))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert reply == "DUNNO" and [c for c, _ in eom] == [b"i", b"c"]
    [line] = [x for x in stream.getvalue().splitlines() if x.startswith("info milter ")]
    assert f' dkim="pass(d=fail.test s={selector})" rule=dkim-pass ' in line
    entry = parse_line(line)
    assert entry is not None and (entry.rule, entry.outcome) == ("dkim-pass", "accept")
    assert entry.get("dkim") == f"pass(d=fail.test s={selector})"


def test_quit_after_connect_and_quit_nc_then_a_new_session(key):
    """QUIT_NC after CONNECT starts a new session on the same connection (registered anew);
    QUIT closes without a warning."""
    h = Harness(key)
    milter = h.milter()
    connect(milter, 4021)
    assert milter.send(pkt(b"K")) == b"" and len(h.sessions) == 0 and not milter.closed
    assert milter.send(macro(b"C", client_port="4022") + pkt(
        b"C", b"[x]\0" + b"6" + struct.pack(">H", 4022) + b"IPv6:" + ADDR.encode() + b"\0")) == b""
    assert len(h.sessions) == 1
    assert milter.send(pkt(b"Q")) == b"" and milter.closed and len(h.sessions) == 0


def test_too_many_forged_headers_tempfail(key, monkeypatch):
    """More forged headers than the session keeps: TEMPFAIL, even from IPv4."""
    monkeypatch.setattr(milter_server, "MilterSession",
                        lambda **kw: milter_server_session(max_marked=2, **kw))
    h = Harness(key)
    _, eom, _ = session(h, 4023, "alice@fail.test", address="192.0.2.10",
                        raw=forged_message("alice@fail.test", *FORGERIES))
    assert eom == [(b"t", b"")]


# -- fail-safe and correlation ----------------------------------------------------------------

def test_no_milter_on_the_connection_means_spf_alone_at_rcpt(key):
    """A policy request for a connection the milter never registered: 450 4.7.26 at RCPT."""
    h = Harness(key)
    assert ask(h.policy(), "alice@fail.test", 5000).startswith("450 4.7.26 ")


def test_milter_closed_connection_falls_back_to_spf_alone(key):
    """After the milter's QUIT the same client port gets SPF-only enforcement again."""
    h = Harness(key)
    milter = h.milter()
    connect(milter, 4004)
    mail(milter, "alice@fail.test")
    milter.send(pkt(b"Q"))
    assert milter.closed and len(h.sessions) == 0
    assert ask(h.policy(), "alice@fail.test", 4004).startswith("450 4.7.26 ")


def test_connection_lost_while_the_policy_looks_up_makes_the_verdict_spf_only(key):
    """If the milter's message ends while SPF is being looked up, nobody will check DKIM at
    end of message, so the policy refuses at RCPT."""
    h = Harness(key, dns_delay=1.0)
    milter, policy = h.milter(), h.policy()
    connect(milter, 4005)
    mail(milter, "alice@fail.test")
    policy.proto.dataReceived(b"".join(f"{k}={v}\n".encode() for k, v in {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "client_address": ADDR,
        "client_port": "4005", "server_address": SERVER, "server_port": "25",
        "helo_name": "mail.sender.test", "sender": "alice@fail.test",
        "recipient": "bob@contoso.com", "instance": "lost"}.items()) + b"\n")
    milter.proto.connectionLost(None)
    h.clock.advance(2)
    assert policy.take().decode().startswith("action=450 4.7.26 ")


def test_a_sender_other_than_the_milters_mail_from_is_enforced_at_rcpt(key):
    """The policy request's sender must be the MAIL FROM the milter saw; otherwise SPF only."""
    h = Harness(key)
    milter = h.milter()
    connect(milter, 4006)
    mail(milter, "someone@fail.test")
    assert ask(h.policy(), "alice@fail.test", 4006).startswith("450 4.7.26 ")


def test_rset_leaves_no_state_that_a_later_message_could_use(key):
    """Message 1 passes SPF and is recorded; RSET (ABORT); message 2 from an SPF-failing,
    unsigned sender gets no benefit: refused at end of message; and a policy request before
    the next MAIL FROM finds no open message (SPF alone)."""
    h = Harness(key)
    milter, policy = h.milter(), h.policy()
    connect(milter, 4007)
    mail(milter, "alice@pass.test")
    assert ask(policy, "alice@pass.test", 4007) == "DUNNO"
    assert milter.send(pkt(b"A")) == b""
    assert ask(policy, "alice@pass.test", 4007) == "DUNNO"  # SPF pass needs no milter
    assert ask(policy, "alice@fail.test", 4007).startswith("450 4.7.26 ")
    mail(milter, "alice@fail.test")
    assert ask(policy, "alice@fail.test", 4007) == "DUNNO"
    eom = packets(milter.send(content(message("alice@fail.test"))))
    assert eom == [(b"y", NO_AUTH.encode() + b"\0")]


def test_several_messages_in_one_session_each_decided_on_its_own(key):
    """Two messages on one connection: an SPF-pass one gets A-R, then an unsigned SPF-fail
    one is refused, then a signed SPF-fail one passes."""
    h = Harness(key)
    milter, policy = h.milter(), h.policy()
    connect(milter, 4008)
    for sender, raw, codes in [
            ("alice@pass.test", message("alice@pass.test"), [b"i", b"c"]),
            ("alice@fail.test", message("alice@fail.test"), [b"y"]),
            ("alice@fail.test", sign(message("alice@fail.test"), key, "fail.test", "lab"),
             [b"i", b"c"])]:
        mail(milter, sender)
        assert ask(policy, sender, 4008) == "DUNNO"
        assert [c for c, _ in packets(milter.send(content(raw)))] == codes


def test_two_smtpd_processes_at_once_are_kept_apart(key):
    """Two SMTP sessions from the same address (two client ports) interleaved: each message
    gets the verdict recorded for its own session."""
    h = Harness(key)
    one, two = h.milter(), h.milter()
    connect(one, 4010)
    connect(two, 4011)
    mail(one, "alice@pass.test")
    mail(two, "alice@fail.test")
    assert ask(h.policy(), "alice@fail.test", 4011) == "DUNNO"
    assert ask(h.policy(), "alice@pass.test", 4010) == "DUNNO"
    assert packets(two.send(content(message("alice@fail.test")))) == [
        (b"y", NO_AUTH.encode() + b"\0")]
    assert [c for c, _ in packets(one.send(content(message("alice@pass.test"))))] == [b"i", b"c"]


def test_a_policy_connection_reopened_mid_message_still_reaches_the_message(key):
    """Postfix may close its policy connection and open another for the next recipient: the
    record is per SMTP session, not per policy connection."""
    h = Harness(key)
    milter = h.milter()
    connect(milter, 4012)
    mail(milter, "alice@fail.test")
    first = h.policy()
    assert ask(first, "alice@fail.test", 4012) == "DUNNO"
    first.proto.connectionLost(None)
    assert ask(h.policy(), "alice@fail.test", 4012, recipient="carol@contoso.com") == "DUNNO"
    eom = packets(milter.send(content(message("alice@fail.test"))))
    assert eom == [(b"y", NO_AUTH.encode() + b"\0")]


def test_a_policy_request_without_server_attributes_matches_a_milter_without_them(key):
    """Key without the server part on both sides (Postfix 3.0/3.1) still correlates."""
    h = Harness(key)
    milter = h.milter()
    milter.send(optneg())
    milter.send(macro(b"C", client_port="4013") + pkt(
        b"C", b"[x]\0" + b"6" + struct.pack(">H", 4013) + ADDR.encode() + b"\0"))
    mail(milter, "alice@fail.test")
    assert ask(h.policy(), "alice@fail.test", 4013, server=False) == "DUNNO"


# -- bounds, errors, threads ------------------------------------------------------------------

def test_too_large_message_needing_dkim_is_refused_and_one_passing_spf_is_untouched(key,
                                                                                     monkeypatch):
    """Over the collection bound: DKIM cannot be checked, so an SPF failure gets 4.7.26; an
    SPF pass is accepted without our header but its forged one (past the bound) deleted."""
    monkeypatch.setattr(milter_server, "MilterSession",
                        lambda **kw: milter_server_session(max_message_bytes=100, **kw))
    h = Harness(key)
    big = message("alice@fail.test", body=b"x" * 200 + b"\r\n")
    _, eom, _ = session(h, raw=sign(big, key, "fail.test", "lab"))
    assert eom == [(b"y", NO_AUTH.encode() + b"\0")]
    _, eom, _ = session(h, port=4014, sender="alice@pass.test",
                        raw=message("alice@pass.test", body=b"x" * 200 + b"\r\n"))
    assert eom == [(b"a", b"")]
    forged = forged_message("alice@pass.test", *FORGERIES[:1]).replace(
        b"\r\n\r\n", b"\r\n" + b"X-Pad: " + b"p" * 120 + b"\r\n" + b"Authentication-Results: "
        + FORGERIES[1] + b"\r\n\r\n", 1)
    _, eom, _ = session(h, port=4024, sender="alice@pass.test", raw=forged)
    assert [c for c, _ in eom] == [b"m", b"m", b"a"] and deletions(eom) == [3, 1]


def milter_server_session(**kwargs):
    from policyd_ipv6.milter.session import MilterSession

    return MilterSession(**kwargs)


def test_large_messages_are_verified_through_the_worker_pool(key):
    """Above dkim.INLINE_WORK_BYTES the verification goes to the worker pool; small ones do not."""
    h = Harness(key)
    body = b"z" * 76 + b"\r\n"
    big = sign(message("alice@fail.test", body=body * 1000), key, "fail.test", "lab")
    _, eom, _ = session(h, raw=big)
    assert [c for c, _ in eom] == [b"i", b"c"]
    assert h.pooled and h.pooled[0] > INLINE_WORK_BYTES
    _, eom, _ = session(h, port=4015, raw=sign(message("alice@fail.test"), key, "fail.test",
                                                "lab"))
    assert len(h.pooled) == 1


def test_an_internal_error_at_end_of_message_tempfails_a_message_needing_dkim(key, monkeypatch):
    """A bug while deciding never lets unauthenticated mail in: TEMPFAIL, logged."""
    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(milter_server, "decide_end", broken)
    h = Harness(key)
    _, eom, milter = session(h)
    assert eom == [(b"t", b"")]
    assert not milter.closed


def test_a_protocol_error_closes_without_reply_and_unregisters(key):
    """Bytes Postfix would not send: the connection is dropped and its entry removed."""
    h = Harness(key)
    milter = h.milter()
    connect(milter, 4016)
    assert len(h.sessions) == 1
    assert milter.send(b"\x00\x00\x00\x01Z") == b""
    assert milter.closed and len(h.sessions) == 0


def test_connections_over_the_limit_are_closed(key):
    """More than max_connections milter connections: the extra one is closed at once."""
    h = Harness(key, max_connections=1)
    first, second = h.milter(), h.milter()
    assert not first.closed and second.closed


def test_idle_connections_are_closed_but_not_while_we_are_deciding(key):
    """An idle milter connection is closed after idle_timeout_seconds; one waiting for our own
    end-of-message verdict (slow DNS) is kept."""
    h = Harness(key, eom_deadline=1000.0)
    idle = h.milter()
    connect(idle, 4017)
    busy = h.milter()
    connect(busy, 4018)
    mail(busy, "alice@fail.test")
    assert ask(h.policy(), "alice@fail.test", 4018) == "DUNNO"
    h.fake.delay = 700.0  # the key lookup answers after the idle timeout
    busy.proto.dataReceived(content(sign(message("alice@fail.test"), key, "fail.test", "lab")))
    h.clock.advance(601)
    assert idle.closed and not busy.closed and b"y" not in [c for c, _ in packets(busy.take())]
    h.clock.advance(100)
    assert [c for c, _ in packets(busy.take()) if c != b"p"] == [b"i", b"c"]


def test_a_long_pause_inside_a_transaction_never_closes_the_connection(key):
    """Postfix is silent while the client uploads DATA: from MAIL to end of message the idle
    timer does not close the connection, so the message still gets our verdict (not
    milter_default_action); after the transaction the idle timeout applies again."""
    h = Harness(key)
    milter = h.milter()
    connect(milter, 4019)
    mail(milter, "alice@fail.test")
    assert ask(h.policy(), "alice@fail.test", 4019) == "DUNNO"
    for _ in range(10):  # 3000 s of DATA upload, far beyond idle_timeout_seconds (600)
        h.clock.advance(300)
    assert not milter.closed
    assert packets(milter.send(content(message("alice@fail.test")))) == [
        (b"y", NO_AUTH.encode() + b"\0")]
    h.clock.advance(601)
    assert milter.closed


def test_an_aborted_transaction_lets_the_idle_timeout_apply_again(key):
    """ABORT (RSET) ends the transaction: the connection is then closed when idle."""
    h = Harness(key)
    milter = h.milter()
    connect(milter, 4020)
    mail(milter, "alice@fail.test")
    milter.send(pkt(b"A"))
    h.clock.advance(601)
    assert milter.closed


def test_dkim_not_settled_by_the_deadline_gets_451_and_progress_meanwhile(key):
    """A DKIM check still running eom_deadline_seconds after end of message answers the
    temporary reply (451 4.4.3), never accept; SMFIR_PROGRESS keeps Postfix waiting until
    then, and the late DKIM result writes nothing."""
    h = Harness(key, eom_deadline=60.0)
    milter = h.milter()
    connect(milter, 4021)
    mail(milter, "alice@fail.test")
    assert ask(h.policy(), "alice@fail.test", 4021) == "DUNNO"
    h.fake.delay = 500.0
    assert milter.send(content(sign(message("alice@fail.test"), key, "fail.test", "lab"))) == b""
    h.clock.advance(10)
    assert packets(milter.take()) == [(b"p", b"")]
    advance(h.clock, 45)
    assert packets(milter.take()) == [(b"p", b"")] * 4
    h.clock.advance(5)
    assert packets(milter.take()) == [(b"y", TEMP_DKIM.encode() + b"\0")]
    advance(h.clock, 500)  # the key lookup answers at 500 s: nothing more is written
    assert milter.take() == b"" and not milter.closed


def test_an_spf_pass_message_past_the_deadline_is_refused_temporarily_too(key):
    """The deadline never accepts: a message that passed SPF but whose DKIM check is stuck
    also gets 451 4.4.3 (its headers would otherwise go out unjudged)."""
    h = Harness(key, eom_deadline=30.0)
    milter = h.milter()
    connect(milter, 4022)
    mail(milter, "alice@pass.test")
    assert ask(h.policy(), "alice@pass.test", 4022) == "DUNNO"
    h.fake.delay = 500.0
    milter.send(content(sign(message("alice@pass.test"), key, "fail.test", "lab")))
    advance(h.clock, 30)
    assert [c for c, _ in packets(milter.take())] == [b"p", b"p", b"y"]


def test_unix_socket_peers_must_be_in_peer_uids(key):
    """On a Unix socket, a peer whose uid (SO_PEERCRED) is not in peer_uids is closed at
    once, on both the milter and the policy listener; an allowed uid is served; TCP-like
    transports (no Unix handle) are not checked."""
    import os
    import socket

    mine = os.getuid()
    for uids, refused in ((frozenset({mine + 1}), True), (frozenset({mine}), False)):
        h = Harness(key, peer_uids=uids)
        ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            milter = Connection(h.milter_factory, UnixTransport(ends[0]))
            policy = Connection(h.policy_factory, UnixTransport(ends[0]))
            assert milter.closed is refused and policy.closed is refused
        finally:
            for end in ends:
                end.close()
        assert not h.milter().closed and not h.policy().closed  # no Unix handle


def test_the_authentication_results_header_value_is_valid_on_the_wire(key):
    """The inserted value is accepted by the codec's header checks (folded with LF + tab)."""
    h = Harness(key)
    raw = sign(message("alice@fail.test"), key, "fail.test", "lab")
    _, eom, _ = session(h, raw=raw)
    value = eom[0][1][4:-1].split(b"\0")[1]
    assert b"\r" not in value and all(line.startswith(b"\t") for line in value.split(b"\n")[1:])
    assert end_of_message.claims_authserv_id(value, AUTHSERV)
