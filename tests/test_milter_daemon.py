"""The built-in milter as an administrator runs it: ``serve`` with ``milter_listen`` (a real
process, real sockets, a real Knot), ``check --message``, and the configuration around it."""

import os
import socket
import struct
import subprocess
import sys

import pytest
from dkimkeys import DkimKey, message, require_openssl, sign
from lab.knot import KnotServer, free_port, require_knot
from lab.zones import Zone, reverse_zones, txt_rdata
from test_cli import Daemon, ask
from test_milter_server import content
from test_milter_session import cstr, macro, optneg, pkt

from policyd_ipv6.daemon.config import Config, parse_config
from policyd_ipv6.daemon.wiring import PolicyService, authserv_id

pytestmark = pytest.mark.knot
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = "2001:db8:1::10"
NO_AUTH = (f"450 4.7.26 Service unavailable, message sent over IPv6 [{CLIENT}] must pass "
           "either SPF or DKIM validation.")


@pytest.fixture(scope="module")
def key():
    require_openssl()
    return DkimKey.generate(1024)


@pytest.fixture(scope="module")
def knot(key):
    require_knot()
    zone = Zone("sender.test")
    zone.add("pass", "TXT", txt_rdata("v=spf1 ip6:2001:db8:1::/64 -all"))
    zone.add("fail", "TXT", txt_rdata("v=spf1 -all"))
    zone.add("lab._domainkey.fail", "TXT", txt_rdata(key.record()))
    zones = {"sender.test": zone.text(),
             **reverse_zones(["2001:db8:1::/64"], {CLIENT: "mail.sender.test"})}
    port = free_port()
    with KnotServer(zones, [("127.0.0.1", port)]):
        yield port


def write_config(tmp_path, knot_port, extra=""):
    (tmp_path / "optin").write_text("contoso.com\n")
    path = tmp_path / "p.toml"
    path.write_text(f'listen = ["unix:{tmp_path}/policy.sock"]\noptin_file = "optin"\n'
                    f'nameservers = ["127.0.0.1:{knot_port}"]\n' + extra)
    return str(path)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "policyd_ipv6", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def recv_packets(sock, count):
    """Read `count` milter response packets: [(code, payload)]."""
    out, data = [], b""
    while len(out) < count:
        chunk = sock.recv(65536)
        assert chunk, f"milter closed after {out}"
        data += chunk
        while len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
            (length,) = struct.unpack(">I", data[:4])
            out.append((data[4:5], data[5:4 + length]))
            data = data[4 + length:]
    return out


def milter_message(sock, port, sender, raw):
    """What Postfix sends for one SMTP session and message; returns the EOM response codes."""
    sock.sendall(optneg())
    assert recv_packets(sock, 1)[0][0] == b"O"
    sock.sendall(macro(b"C", client_port=str(port), daemon_addr="2001:db8:25::25",
                       daemon_port="25")
                 + pkt(b"C", b"[x]\0" + b"6" + struct.pack(">H", port) + CLIENT.encode() + b"\0"))
    # CONNECT is negotiated no-reply (SMFIP_NR_CONN): the first answer is MAIL's CONTINUE.
    sock.sendall(pkt(b"M", cstr(f"<{sender}>".encode())))
    assert recv_packets(sock, 1) == [(b"c", b"")]


def test_serve_with_milter_listen_serves_both_and_shares_the_session(tmp_path, knot, key):
    """One daemon: the policy answers DUNNO for an SPF failure on a connection its milter is
    on (and 450 4.7.26 for one it is not on); the milter then refuses the unsigned message and
    accepts the signed one with an Authentication-Results header."""
    milter_path = tmp_path / "milter.sock"
    config = write_config(tmp_path, knot, f'milter_listen = ["unix:{milter_path}"]\n'
                          'authserv_id = "mx.contoso.com"\n')
    daemon = Daemon(config)
    try:
        daemon.wait_for("listening for the milter")
        policy = socket.socket(socket.AF_UNIX)
        policy.connect(str(tmp_path / "policy.sock"))
        request = dict(client_address=CLIENT, server_address="2001:db8:25::25",
                       server_port="25", sender="a@fail.sender.test",
                       recipient="b@contoso.com")
        assert ask(policy, client_port="6000", **request).startswith("action=450 4.7.26 ")
        for port, raw, expected in [
                (6001, message("a@fail.sender.test"), [b"y"]),
                (6002, sign(message("a@fail.sender.test"), key, "fail.sender.test", "lab"),
                 [b"i", b"c"])]:
            milter = socket.socket(socket.AF_UNIX)
            milter.connect(str(milter_path))
            milter.settimeout(10)
            milter_message(milter, port, "a@fail.sender.test", raw)
            assert ask(policy, client_port=str(port), **request) == "action=DUNNO"
            milter.sendall(content(raw))
            answer = recv_packets(milter, len(expected))
            assert [code for code, _ in answer] == expected
            if expected == [b"y"]:
                assert answer[0][1] == NO_AUTH.encode() + b"\0"
            else:
                assert b"mx.contoso.com;" in answer[0][1] and b"dkim=pass" in answer[0][1]
            milter.sendall(pkt(b"Q"))
            assert milter.recv(10) == b""
            milter.close()
        policy.close()
        log = daemon.text()
        assert "rule=unsigned" in log and "rule=dkim-pass" in log
        assert "rule=spf-failed-dkim-pending" in log
    finally:
        daemon.stop()


def test_a_milter_endpoint_that_cannot_be_bound_is_a_config_error(tmp_path, knot):
    """A busy milter_listen port stops start-up with an error naming milter_listen."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        config = write_config(tmp_path, knot,
                              f'milter_listen = ["tcp:{port}:interface=127.0.0.1"]\n')
        result = cli("serve", "--config", config, "--allow-root")
        assert result.returncode == 1
        assert f'milter_listen = "tcp:{port}:interface=127.0.0.1": cannot listen' \
            in result.stderr
    finally:
        busy.close()


def test_sessions_are_wired_only_with_milter_listen(tmp_path, knot):
    """Without milter_listen the engine has no sessions registry (SPF alone); with it, the
    engine and the milter share one."""
    from twisted.internet import task

    plain = PolicyService(parse_config(open(write_config(tmp_path, knot)).read(),
                                       str(tmp_path)), task.Clock())
    assert plain.engine.sessions is None and plain.milter_factory is None
    text = open(write_config(tmp_path, knot, 'milter_listen = ["tcp:0"]\n')).read()
    wired = PolicyService(parse_config(text, str(tmp_path)), task.Clock())
    assert wired.milter_factory.engine is wired.engine and wired.engine.sessions is not None


def test_authserv_id_defaults_to_the_host_name():
    """authserv_id = "" means this host's fully qualified name; a configured one is kept."""
    import dataclasses

    default = Config.defaults()
    assert default.milter_listen == () and default.authserv_id == ""
    assert authserv_id(default) == socket.getfqdn() or authserv_id(default) == "localhost"
    assert authserv_id(dataclasses.replace(default, authserv_id="mx.example")) == "mx.example"


@pytest.mark.parametrize("text, words", [
    ('authserv_id = "mx example"', ["authserv_id", "mx example"]),
    ('authserv_id = "mx;evil"', ["authserv_id"]),
    ("milter_listen = 10046", ["milter_listen", "list of strings"]),
])
def test_bad_milter_keys_are_errors_naming_the_key(text, words):
    """Bad values of the two milter keys are configuration errors naming key and value."""
    from policyd_ipv6.daemon.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse_config(text)
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize("sender, signed, action, trace", [
    ("a@fail.sender.test", True, "action=DUNNO", "end of message: dkim-pass"),
    ("a@fail.sender.test", False, "action=" + NO_AUTH, "DKIM: none"),
    ("a@fail.sender.test", "altered", "action=" + NO_AUTH, "body hash"),
    ("a@pass.sender.test", False, "action=DUNNO", "end of message: spf-pass"),
])
def test_check_message_decides_as_policy_and_milter(tmp_path, knot, key, sender, signed,
                                                    action, trace):
    """check --message verifies the stored message's DKIM through the configured DNS and
    gives the reply policy + milter would: the 4.7.26 text after DATA or DUNNO; with
    milter_listen empty, its note says systemd's milter socket may still turn the milter on."""
    raw = message(sender)
    if signed:
        raw = sign(raw, key, "fail.sender.test", "lab")
    if signed == "altered":
        raw = raw.replace(b"Hello.", b"Hullo.")
    path = tmp_path / "message.eml"
    path.write_bytes(raw.replace(b"\r\n", b"\n"))  # as stored on disk: LF line ends
    result = cli("check", "--config", write_config(tmp_path, knot), "--client-address", CLIENT,
                 "--sender", sender, "--recipient", "b@contoso.com", "--helo",
                 "mail.sender.test", "--message", str(path))
    assert result.returncode == {"D": 0, "4": 4, "5": 5}[action[7]], result.stderr
    first = result.stdout.splitlines()[0]
    assert first == action, result.stdout
    assert trace in result.stdout
    assert ("note: milter_listen is empty in this configuration: the daemon itself would "
            "decide on SPF alone, at RCPT, unless systemd passes it policyd-ipv6-milter.socket "
            "(a socket named milter turns the milter on)") in result.stdout


def test_check_message_that_cannot_be_read(tmp_path, knot):
    """A missing --message file is reported, with exit status 1."""
    result = cli("check", "--config", write_config(tmp_path, knot), "--client-address", CLIENT,
                 "--sender", "a@x.test", "--recipient", "b@contoso.com", "--message",
                 str(tmp_path / "nope.eml"))
    assert result.returncode == 1 and "cannot read --message" in result.stderr


def test_sighup_applies_a_new_authserv_id_and_asks_a_restart_for_milter_listen(tmp_path, knot):
    """reload(): authserv_id takes effect at once; a changed milter_listen waits for a restart
    (its sockets are bound), and the running milter keeps its sessions registry."""
    from twisted.internet import task

    from policyd_ipv6.daemon.config import load_config

    path = write_config(tmp_path, knot, 'milter_listen = ["tcp:0"]\nauthserv_id = "a.example"\n')
    service = PolicyService(load_config(path), task.Clock())
    sessions = service.engine.sessions
    text = open(path).read().replace('"a.example"', '"b.example"').replace(
        '["tcp:0"]', '["tcp:1"]')
    open(path, "w").write(text)
    assert service.reload()
    assert service.milter_factory.authserv_id == "b.example"
    assert service.config.milter_listen == ("tcp:0",) and service.engine.sessions is sessions
