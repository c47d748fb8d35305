"""SIGHUP's reload: one configuration object is swapped, restart-only keys are kept."""

from __future__ import annotations

from twisted.internet import task

from policyd_ipv6.daemon.config import KEYS, load_config
from policyd_ipv6.daemon.wiring import RELOADED_KEYS, PolicyService


def _config(tmp_path, extra: str = "") -> str:
    (tmp_path / "optin").write_text("contoso.com\n")
    path = tmp_path / "p.toml"
    path.write_text('listen = ["tcp:0"]\noptin_file = "optin"\nnameservers = ["192.0.2.53"]\n'
                    'milter_listen = ["tcp:0"]\n' + extra)
    return str(path)


def test_every_reloadable_key_is_applied_by_reload():
    """Each key that does not need a restart is one reload() hands to the running parts."""
    assert {key.name for key in KEYS if not key.restart} == RELOADED_KEYS


def test_reload_swaps_the_configuration_and_keeps_restart_keys(tmp_path):
    """After reload() live.now.config is the new file's Config with the running restart-only
    keys, and the running parts use its reloadable values."""
    path = _config(tmp_path)
    service = PolicyService(load_config(path), task.Clock())
    before = service.live.now.config
    text = open(path).read().replace('"192.0.2.53"', '"192.0.2.54"').replace(
        'listen = ["tcp:0"]', 'listen = ["tcp:1"]')
    open(path, "w").write(text + 'dns_timeout_seconds = 3.5\nidle_timeout_seconds = 100\n'
                          'rdns = "fcrdns"\nmilter_eom_deadline_seconds = 30\n'
                          'max_connections = 5\nmilter_peer_users = ["postfix"]\n')
    assert service.reload()
    now = service.live.now.config
    assert now is not before and service.config is now
    assert (now.dns_timeout_seconds, now.idle_timeout_seconds, now.rdns) == (3.5, 100, "fcrdns")
    assert now.listen == ("tcp:0",) and now.max_connections == 1000
    assert now.milter_peer_users == ("root", "postfix")
    assert service.client.timeout_seconds == 3.5
    assert service.client.nameservers[0].host == "192.0.2.54"
    assert service.finder.rdns_mode == "fcrdns"
    assert service.factory.idle_timeout_seconds == 100
    assert service.milter_factory.idle_timeout_seconds == 100
    assert service.milter_factory.eom_deadline_seconds == 30


def test_a_file_that_does_not_load_leaves_the_configuration_in_force(tmp_path):
    """reload() of a bad file returns False and live.now is still the same object."""
    path = _config(tmp_path)
    service = PolicyService(load_config(path), task.Clock())
    before = service.live.now
    open(path, "a").write("dns_attempts = 99\n")
    assert not service.reload()
    assert service.live.now is before and service.client.attempts == 2


def test_reload_is_one_assignment_that_every_running_part_reads(tmp_path):
    """Swapping live.now alone (what reload does) changes each part's reloadable values: no
    part keeps a copy of its own once wired."""
    from policyd_ipv6.daemon.wiring import in_force
    from policyd_ipv6.resolver.wire import Nameserver

    path = _config(tmp_path)
    service = PolicyService(load_config(path), task.Clock())
    text = open(path).read() + (
        'dns_timeout_seconds = 4.5\ndns_attempts = 3\ndns_max_ttl_seconds = 60\n'
        'decision_deadline_seconds = 7\nmessage_cache_ttl_seconds = 9\n'
        'idle_timeout_seconds = 11\nmilter_eom_deadline_seconds = 13\n'
        'authserv_id = "mx.example.net"\nlog_decisions = "ipv6"\nmode = "report"\n')
    open(path, "w").write(text)
    service.live.now = in_force(load_config(path), [Nameserver("192.0.2.99")])
    assert (service.client.timeout_seconds, service.client.attempts) == (4.5, 3)
    assert service.client.nameservers == (Nameserver("192.0.2.99"),)
    assert service.lookups.max_ttl_seconds == 60
    assert (service.finder.deadline_seconds, service.finder.message_ttl_seconds) == (7, 9)
    assert service.factory.idle_timeout_seconds == 11
    assert service.milter_factory.eom_deadline_seconds == 13
    assert service.milter_factory.authserv_id == "mx.example.net"
    assert service.engine.log_decisions == "ipv6"
    assert service.engine.policy.mode == "report"
