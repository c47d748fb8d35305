"""Tests of configuration loading (policyd_ipv6.config) and the shipped sample files."""

import dataclasses
import filecmp
import ipaddress
import os

import pytest

from policyd_ipv6.daemon.cli import SAMPLE_CONFIG
from policyd_ipv6.daemon.config import (
    KEYS,
    RESTART_KEYS,
    Config,
    ConfigError,
    keep_restart_keys,
    load_config,
    parse_config,
)
from policyd_ipv6.resolver.wire import Nameserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults():
    """An empty file gives the documented defaults."""
    config = parse_config("", "/etc/policyd-ipv6")
    assert config.listen == ("tcp:10045:interface=127.0.0.1",)
    assert config.optin_file == "/etc/policyd-ipv6/optin-domains"
    assert config.rdns == "ptr"
    assert config.trusted_networks == (ipaddress.ip_network("127.0.0.0/8"),
                                       ipaddress.ip_network("::1/128"))
    assert config.nameservers == ()
    assert dataclasses.replace(config, source="<defaults>") == Config.defaults()


def test_public_keys_parse():
    """The public-contract keys take the documented forms."""
    config = parse_config('''
listen = ["tcp:10045:interface=127.0.0.1", "unix:/run/p.sock:mode=660"]
optin_file = "domains"
rdns = "fcrdns"
trusted_networks = ["192.0.2.0/24", "2001:db8::/32"]
nameservers = ["192.0.2.53", "127.0.0.1:5353", "2001:db8::53", "[::1]:5353"]
[replies]
not_opted_in = "450 4.2.1 [{domain}] try IPv4"
''', "/srv/conf")
    assert config.optin_file == "/srv/conf/domains"
    assert config.rdns == "fcrdns"
    assert config.nameservers == (Nameserver("192.0.2.53"), Nameserver("127.0.0.1", 5353),
                                  Nameserver("2001:db8::53"), Nameserver("::1", 5353))
    assert config.replies.not_opted_in == "450 4.2.1 [{domain}] try IPv4"


@pytest.mark.parametrize("text, names", [
    ('rdns = "strict"', ['rdns = "strict"', "ptr", "fcrdns"]),
    ('listn = ["tcp:1"]', ["unknown key listn"]),
    ("listen = []", ["listen = []", "at least one"]),
    ('listen = "tcp:10045"', ['listen = "tcp:10045"', "list"]),
    ('trusted_networks = ["10.0.0.300/8"]', ['trusted_networks = "10.0.0.300/8"']),
    ('nameservers = ["localhost"]', ['nameservers = "localhost"']),
    ('nameservers = ["[::1]:99999"]', ['nameservers = "[::1]:99999"']),
    ("decision_deadline_seconds = 0", ["decision_deadline_seconds = 0", "between"]),
    ("decision_deadline_seconds = 120", ["decision_deadline_seconds = 120"]),
    ('dns_timeout_seconds = "2"', ['dns_timeout_seconds = "2"', "number"]),
    ("dns_attempts = 1.5", ["dns_attempts = 1.5", "whole number"]),
    ("max_connections = true", ["max_connections = True"]),
    ('[replies]\ntemporary = "554 5.4.3 no"', ["replies.temporary", "4xx"]),
    ('[replies]\nauth_failed = "450 5.7.26 x"', ["replies.auth_failed", "class"]),
    ('[replies]\nno_reverse_dns = "no code"', ["replies.no_reverse_dns", "4xx or 5xx"]),
    ('[replies]\nnot_opted_in = "550 5.2.1 {nope}"', ["replies.not_opted_in", "{nope}"]),
    ('[replies]\nbogus = "550 5.2.1 x"', ["replies.bogus", "unknown reply"]),
    # A reply that would raise or overrun at every refusal (see test_replies.py)
    ('[replies]\nno_reverse_dns = "450 4.7.25 sending IPv6 address [{address:d}] has no PTR."',
     ["replies.no_reverse_dns", "{address:d}"]),
    ('[replies]\nnot_opted_in = "550 5.2.1 [{domain:{address}}] does not accept IPv6."',
     ["replies.not_opted_in", "{domain:{address}}"]),
    ('[replies]\nnot_opted_in = "550 5.2.1 [{domain:>3000}] does not accept IPv6."',
     ["replies.not_opted_in", "{domain:>3000}"]),
    ('[replies]\nnot_opted_in = "550 5.2.1 [{domain}] [{domain}] does not accept IPv6."',
     ["replies.not_opted_in", "renders to"]),
    ("rdns = ", ["not valid TOML"]),
])
def test_bad_values_name_key_and_value(text, names):
    """Every bad value raises ConfigError whose message names the key and the value."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc", source="/etc/p.toml")
    message = str(info.value)
    assert message.startswith("/etc/p.toml")
    for name in names:
        assert name in message


@pytest.mark.parametrize("key", ["optin_file", "state_directory"])
def test_nul_in_a_path_is_a_config_error_shown_escaped(key):
    """A NUL in a path is refused naming the key, with the NUL shown escaped (open() would
    raise ValueError, a traceback, instead of OSError)."""
    with pytest.raises(ConfigError) as info:
        parse_config(f'{key} = "opt\\u0000in"', "/etc", source="/etc/p.toml")
    message = str(info.value)
    assert f'{key} = "opt\\x00in"' in message and "NUL" in message
    assert "\0" not in message


def test_missing_file_is_a_config_error(tmp_path):
    """A configuration file that cannot be read is reported with its path."""
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(str(tmp_path / "nope.toml"))


def test_every_config_field_carries_its_schema():
    """Each Config field but source is a key with a parser, a doc and a restart flag, in order."""
    fields = [f.name for f in dataclasses.fields(Config) if f.name != "source"]
    assert [k.name for k in KEYS] == fields
    assert all(len(k.doc) > 20 and isinstance(k.restart, bool) for k in KEYS)
    assert RESTART_KEYS == tuple(k.name for k in KEYS if k.restart)


def test_defaults_are_the_parsed_schema_defaults():
    """Config() holds each key's documented TOML default, parsed as the file's value would be."""
    config = Config()
    for key in KEYS:
        assert getattr(config, key.name) == key.parse(key.name, key.default), key.name


def test_new_milter_keys():
    """milter_eom_deadline_seconds (1-240, 60) and milter_peer_users (root, postfix) parse."""
    config = parse_config('milter_eom_deadline_seconds = 30\nmilter_peer_users = ["postfix"]')
    assert config.milter_eom_deadline_seconds == 30
    assert config.milter_peer_users == ("postfix",)
    assert Config.defaults().milter_eom_deadline_seconds == 60.0
    assert Config.defaults().milter_peer_users == ("root", "postfix")
    assert "milter_peer_users" in RESTART_KEYS
    assert "milter_eom_deadline_seconds" not in RESTART_KEYS


@pytest.mark.parametrize("text, names", [
    ("milter_eom_deadline_seconds = 0.5", ["milter_eom_deadline_seconds = 0.5", "between"]),
    ("milter_eom_deadline_seconds = 300", ["milter_eom_deadline_seconds = 300"]),
    ("milter_peer_users = []", ["milter_peer_users = []", "at least one user"]),
    ('milter_peer_users = "postfix"', ['milter_peer_users = "postfix"', "list"]),
    ('milter_peer_users = ["post fix"]', ['milter_peer_users = "post fix"', "user name"]),
    ('milter_peer_users = [""]', ['milter_peer_users = ""', "user name"]),
])
def test_bad_milter_keys_name_key_and_value(text, names):
    """A bad value of a new milter key raises ConfigError naming the file, key and value."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc", source="/etc/p.toml")
    assert str(info.value).startswith("/etc/p.toml: ")
    for name in names:
        assert name in str(info.value)


def test_keep_restart_keys_keeps_the_running_ones_and_names_the_changed():
    """A reload's new Config keeps the running restart-only keys and lists those that differ."""
    running = parse_config('listen = ["tcp:1"]\ndns_attempts = 1')
    new = parse_config('listen = ["tcp:2"]\ndns_attempts = 3\nmilter_peer_users = ["root"]')
    merged, changed = keep_restart_keys(running, new)
    assert merged.listen == ("tcp:1",) and merged.milter_peer_users == ("root", "postfix")
    assert merged.dns_attempts == 3
    assert changed == ("listen", "milter_peer_users")


def test_fifo_is_refused_without_blocking(tmp_path):
    """A FIFO as configuration file is refused at once, naming its path (a read would block)."""
    path = tmp_path / "policyd-ipv6.toml"
    os.mkfifo(path)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: not a regular file"


def test_directory_is_refused(tmp_path):
    """A directory as configuration file is refused, naming its path."""
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(str(tmp_path))


def test_sample_config_loads_and_listens_on_loopback_tcp():
    """The embedded sample (the quick start, no Postfix needed) loads and listens on loopback
    TCP without a milter; postfix-examples/ carries the same opt-in table."""
    config = load_config(SAMPLE_CONFIG)
    assert config.listen == ("tcp:10045:interface=127.0.0.1",)
    assert config.milter_listen == ()
    assert os.path.exists(config.optin_file)
    assert filecmp.cmp(os.path.join(os.path.dirname(SAMPLE_CONFIG), "optin-domains"),
                       os.path.join(ROOT, "postfix-examples", "optin-domains"), shallow=False)


def test_packaged_example_puts_both_listeners_on_unix_sockets_only_postfix_reaches():
    """postfix-examples/policyd-ipv6.toml (installed by the Debian package) differs from the
    sample only in its listeners: policy and milter on Unix sockets in
    /var/spool/postfix/policyd-ipv6, mode 660, with a lock file that clears a crash's socket."""
    example = load_config(os.path.join(ROOT, "postfix-examples", "policyd-ipv6.toml"))
    sample = load_config(SAMPLE_CONFIG)
    spool = "unix:/var/spool/postfix/policyd-ipv6/"
    assert example.listen == (spool + "policy:mode=660:lockfile=1",)
    assert example.milter_listen == (spool + "milter:mode=660:lockfile=1",)
    same = {"listen": sample.listen, "milter_listen": sample.milter_listen,
            "optin_file": sample.optin_file, "source": sample.source}  # paths: their own dirs
    assert dataclasses.replace(example, **same) == sample


def test_descriptor_budget_keeps_room_for_dns():
    """max_connections is capped below the open-files limit, leaving room for DNS sockets."""
    from policyd_ipv6.daemon.limits import descriptor_budget

    assert descriptor_budget(1_048_576, 1000) == (1000, 262_112)
    connections, dns = descriptor_budget(256, 1000)
    assert connections == 192 and dns == 32 and connections + dns < 256


def test_descriptor_budget_is_shared_with_the_milter():
    """With the milter on, policy and milter connections share what DNS leaves."""
    from policyd_ipv6.daemon.limits import descriptor_budget

    connections, dns = descriptor_budget(1024, 1000, listeners=2)
    assert connections == 384 and 2 * connections + dns < 1024


def test_descriptor_budget_reserves_the_metrics_connections():
    """The metrics listener's bounded connections come out of the policy and milter share,
    so that all three kinds held at once still leave the DNS sockets their quarter."""
    from policyd_ipv6.daemon.limits import descriptor_budget
    from policyd_ipv6.daemon.metrics_http import MAX_CONNECTIONS

    connections, dns = descriptor_budget(512, 1000, listeners=2, reserved=MAX_CONNECTIONS)
    assert connections == (384 - MAX_CONNECTIONS) // 2
    assert 2 * connections + MAX_CONNECTIONS + dns < 512
