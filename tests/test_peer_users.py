"""Tests of milter_peer_users at start-up (policyd_ipv6.daemon.wiring.peer_uids): the users who
may connect to the Unix listeners are resolved to uids once, and a bad name stops the daemon."""

import pytest

from policyd_ipv6.daemon.config import ConfigError, parse_config
from policyd_ipv6.daemon.wiring import peer_uids


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
