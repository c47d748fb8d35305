"""configtest and check in-process: they judge a configuration and a recipient as serve does.

configtest refuses a ``user`` that serve would refuse before binding; ``check
--assume-opted-in`` adds the recipient domain the engine itself will look up. The process
tests (real daemon, real Knot) are in test_check_command.py.
"""

from __future__ import annotations

import os
import pwd

import pytest

from policyd_ipv6.daemon.check_command import assume_opted_in
from policyd_ipv6.daemon.config import ConfigError, load_config
from policyd_ipv6.daemon.configtest_command import configtest
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import Subject

NO_SUCH_USER = "nosuchuser-policyd-ipv6"


def config_with_user(tmp_path, user: str):
    """A configuration naming ``user`` whose opt-in file is missing (configtest stops there)."""
    path = tmp_path / "p.toml"
    path.write_text(f'listen = ["tcp:1:interface=127.0.0.1"]\noptin_file = "missing"\n'
                    f'nameservers = ["192.0.2.1"]\nuser = "{user}"\n')
    return load_config(str(path))


def test_configtest_refuses_a_user_that_does_not_exist(tmp_path):
    """configtest refuses a user naming no account, as serve does at start, naming the key."""
    with pytest.raises(ConfigError) as refused:
        configtest(config_with_user(tmp_path, NO_SUCH_USER))
    assert str(refused.value) == f'user = "{NO_SUCH_USER}": no such user'


def test_configtest_accepts_a_user_it_could_serve_as(tmp_path):
    """A user that exists and that this process could serve as (itself; root: an unprivileged
    account) passes the user check."""
    me = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    with pytest.raises(ConfigError) as refused:  # the missing opt-in file, checked next
        configtest(config_with_user(tmp_path, me))
    assert str(refused.value).startswith("optin_file = "), refused.value


@pytest.mark.parametrize("euid", [0, 1000])
def test_root_as_user_is_refused_whoever_starts_the_daemon(euid):
    """user = "root" is refused even when root itself starts the daemon (it would otherwise
    serve as root without --allow-root), and for anyone else."""
    from policyd_ipv6.daemon.privileges import plan_privileges

    with pytest.raises(ConfigError, match='user = "root": that is root'):
        plan_privileges("root", allow_root=False, euid=euid)
    with pytest.raises(ConfigError, match='user = "root": that is root'):
        plan_privileges("root", allow_root=True, euid=euid)


@pytest.mark.parametrize("recipient", [
    "<bob@contoso.test>", " bob@contoso.test ", "bob@Contoso.Test.", '"a\\@b"@contoso.test',
])
def test_assumed_domain_is_the_one_the_engine_looks_up(recipient):
    """--assume-opted-in adds the recipient domain as the engine takes it (brackets, blanks,
    case and a trailing dot removed), so the decision is the one an opted-in domain gets."""
    request = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
               "client_address": "2001:db8::25", "sender": "a@example.net",
               "recipient": recipient}
    table = assume_opted_in(parse_optin("example.com\n"), [request])
    assert Subject.from_request(request).recipient_domain == "contoso.test"
    assert table.matches("contoso.test")
    assert not table.matches("contoso.test>") and not table.matches("example.net")


def test_no_domain_adds_nothing():
    """A recipient without a domain (a bare Postmaster) leaves the table as it was."""
    request = {"request": "smtpd_access_policy", "recipient": "Postmaster"}
    table = parse_optin("example.com\n")
    assert assume_opted_in(table, [request]).exact == table.exact
