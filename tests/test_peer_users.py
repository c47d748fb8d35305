"""Tests of milter_peer_users at start-up (policyd_ipv6.daemon.wiring.peer_uids): the users who
may connect to the Unix listeners, configured or passed by systemd, are resolved to uids once,
and a bad name stops the daemon."""

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock

from policyd_ipv6.daemon import wiring
from policyd_ipv6.daemon.config import ConfigError, parse_config
from policyd_ipv6.daemon.wiring import PolicyService, peer_uids


def config(text: str):
    return parse_config(text, "/etc/policyd-ipv6", "test.toml")


def test_unix_listeners_get_the_uids_of_the_peer_users():
    """With a Unix listener (policy or milter), milter_peer_users become their uids."""
    assert peer_uids(config('listen = ["unix:/run/p:mode=660"]\n'
                            'milter_peer_users = ["root"]\n')) == frozenset({0})
    assert peer_uids(config('milter_listen = ["unix:/run/m:mode=660"]\n'
                            'milter_peer_users = ["root"]\n')) == frozenset({0})


def test_tcp_listeners_alone_check_nobody():
    """TCP carries no credentials: without a Unix listener there is nothing to check."""
    assert peer_uids(config('milter_listen = ["tcp:10046:interface=127.0.0.1"]\n')) is None


def test_an_unknown_peer_user_stops_the_daemon_naming_key_and_value():
    """A user that does not exist is a configuration error naming the key and the name."""
    with pytest.raises(ConfigError, match='milter_peer_users = "no-such-user-p6": no such user'):
        peer_uids(config('listen = ["unix:/run/p:mode=660"]\n'
                         'milter_peer_users = ["root", "no-such-user-p6"]\n'))


def test_a_tcp_only_daemon_does_not_need_the_peer_users_to_exist():
    """With TCP listeners only and no Unix socket passed, an unknown user is no error."""
    assert peer_uids(config('milter_peer_users = ["no-such-user-p6"]\n')) is None


def test_a_unix_socket_systemd_passed_gets_the_uids_of_the_peer_users():
    """A Unix socket passed by systemd counts as a Unix listener, whatever the file names."""
    assert peer_uids(config('milter_peer_users = ["root"]\n'), unix_sockets=True) == \
        frozenset({0})


class AdoptedPort:
    """A port adopt_inherited made from a socket systemd passed."""

    def __init__(self, host) -> None:
        self.host = host
        self.listening = True

    def getHost(self):
        return self.host

    def stopListening(self):
        self.listening = False


def _service(tmp_path, monkeypatch, users: str, adopted: list):
    (tmp_path / "optin").write_text("contoso.com\n")
    text = ('listen = ["tcp:10045:interface=127.0.0.1"]\noptin_file = "optin"\n'
            f'nameservers = ["192.0.2.53"]\nmilter_peer_users = {users}\n')
    service = PolicyService(parse_config(text, str(tmp_path), "test.toml"), MemoryReactorClock(),
                            milter_socket=True)
    monkeypatch.setattr(wiring, "adopt_inherited", lambda *args: list(adopted))
    return service


def test_a_unix_socket_systemd_passed_checks_its_peers_with_tcp_in_the_file(tmp_path,
                                                                            monkeypatch):
    """listen() with a passed Unix socket sets the peer uids of the policy and milter
    factories, although listen names TCP alone."""
    service = _service(tmp_path, monkeypatch, '["root"]',
                       [AdoptedPort(UNIXAddress("/run/policyd-ipv6/policy"))])
    assert service.factory.peer_check.uids is None  # TCP in the file: nothing to check yet
    ports = service.listen([(3, "policy")])
    assert isinstance(ports.result, list), ports.result
    assert service.factory.peer_check.uids == frozenset({0})
    assert service.milter_factory.peer_check.uids == frozenset({0})


def test_a_passed_tcp_socket_leaves_the_peers_unchecked(tmp_path, monkeypatch):
    """A passed TCP socket carries no credentials: the peer users are not resolved."""
    service = _service(tmp_path, monkeypatch, '["no-such-user-p6"]',
                       [AdoptedPort(IPv4Address("TCP", "127.0.0.1", 10045))])
    ports = service.listen([(3, "policy")])
    assert isinstance(ports.result, list), ports.result
    assert service.factory.peer_check.uids is None


def test_an_unknown_peer_user_with_a_passed_unix_socket_stops_the_daemon(tmp_path,
                                                                        monkeypatch):
    """With a Unix socket passed, a user that does not exist is a configuration error, and
    the adopted socket is no longer served."""
    port = AdoptedPort(UNIXAddress("/run/policyd-ipv6/milter"))
    service = _service(tmp_path, monkeypatch, '["no-such-user-p6"]', [port])
    failures: list = []
    service.listen([(3, "milter")]).addErrback(failures.append)
    [failure] = failures
    assert failure.check(ConfigError), failure
    assert 'milter_peer_users = "no-such-user-p6": no such user' in str(failure.value)
    assert not port.listening
