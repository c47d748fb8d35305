"""The PostgreSQL opt-in source without a database: rows to a table, passwords kept out of
every message, the configuration keys, and the driver missing."""

from __future__ import annotations

import sys

import pytest
from twisted.internet import task

from policyd_ipv6.daemon.config import ConfigError, parse_config
from policyd_ipv6.daemon.wiring import PolicyService
from policyd_ipv6.optin.rows import HEADER, conninfo, redact, secrets, table_from_rows
from policyd_ipv6.optin.table import parse_optin


def test_good_rows_make_the_table_the_file_would():
    """Rows (domain, options) give the same entries, with the same options, as the same lines
    of the opt-in file, and the last-good text reads back as that table."""
    loaded = table_from_rows([("example.com", None), (".example.org", "mode=report"),
                              ("Bücher.example", " rdns=fcrdns ")], "optin_query")
    assert loaded.skipped == ()
    assert loaded.table.matches("example.com") and loaded.table.matches("a.example.org")
    assert not loaded.table.matches("example.org")
    assert loaded.table.entry("a.example.org").mode == "report"
    assert loaded.table.entry("xn--bcher-kva.example").rdns == "fcrdns"
    assert loaded.text.startswith(HEADER)
    assert parse_optin(loaded.text) == loaded.table


@pytest.mark.parametrize("row, why", [
    (("not a domain", None), "not a domain name"),
    (("bad..example", None), "not a domain name"),
    (("example.com\n.evil.example", None), "not a domain name"),
    (("example.com", "colour=red"), "unknown option"),
    (("example.com", "mode=maybe"), "must be"),
    (("example.com", "mode=report # x"), "not a domain name"),
    ((None, None), "not text"),
    ((42, None), "not text"),
])
def test_a_bad_row_is_skipped_with_a_message_naming_it(row, why):
    """A row the opt-in file would refuse is left out with a message that names it; the other
    rows stay in the table."""
    loaded = table_from_rows([("good.example", None), row], "optin_query")
    assert loaded.table.matches("good.example") and len(loaded.table) == 1
    (message,) = loaded.skipped
    assert message.startswith("optin_query: row 2 skipped (domain ") and why in message


def test_a_query_with_too_many_columns_is_an_error():
    """A result of three columns is a mistake in optin_query, not rows to skip."""
    with pytest.raises(ValueError, match="3 columns"):
        table_from_rows([("example.com", None, "x")], "optin_query")


@pytest.mark.parametrize("text, shown", [
    ("host=db user=p password=hunter2 dbname=mail", "host=db user=p password=*** dbname=mail"),
    ("host=db password = 'hun ter\\'2'", "host=db password=***"),
    ("postgresql://p:hunter2@db:5433/mail?sslmode=require",
     "postgresql://p:***@db:5433/mail?sslmode=require"),
    ("postgres://p@db/mail?password=hunter2", "postgres://p@db/mail?password=***"),
])
def test_redact_replaces_every_password(text, shown):
    """The shown form of a connection string has *** where each password was."""
    assert redact(text) == shown
    assert all(secret not in redact(text) for secret in secrets(text))


def test_secrets_lists_the_passwords():
    """secrets() gives the passwords of both forms, to scrub from driver messages."""
    assert secrets("host=db password='a b'") == ["a b"]
    assert secrets("postgresql://u:p%40ss@db/x") == ["p@ss"]
    assert secrets("host=db") == []


def test_a_bad_connection_string_is_refused_without_repeating_it():
    """A connection string libpq could not parse stops the daemon naming the key, never the
    value (it may hold a password)."""
    with pytest.raises(ValueError) as error:
        conninfo("optin_postgresql", "host=db password='hunter2")
    assert "optin_postgresql" in str(error.value) and "hunter2" not in str(error.value)
    with pytest.raises(ConfigError, match="optin_postgresql") as error:
        parse_config('optin_postgresql = "password=hunter2 oops"')
    assert "hunter2" not in str(error.value)


def test_optin_file_and_optin_postgresql_both_set_is_an_error():
    """Both sources given explicitly is a configuration error naming both keys; either alone,
    or an empty optin_postgresql beside optin_file, is not."""
    with pytest.raises(ConfigError, match="optin_file .* and optin_postgresql are both set"):
        parse_config('optin_file = "optin"\noptin_postgresql = "host=db"\n')
    assert parse_config('optin_postgresql = "host=db"').optin_postgresql == "host=db"
    assert parse_config('optin_file = "o"\noptin_postgresql = ""').optin_postgresql == ""


def test_the_postgresql_keys_are_checked():
    """The channel, query, timeout and state directory are validated with their key named;
    a relative state directory is taken relative to the configuration file."""
    for text, key in (('optin_notify_channel = ""', "optin_notify_channel"),
                      ('optin_notify_channel = "' + "c" * 64 + '"', "optin_notify_channel"),
                      ('optin_query = " "', "optin_query"),
                      ("optin_connect_timeout_seconds = 0", "optin_connect_timeout_seconds"),
                      ('state_directory = ""', "state_directory")):
        with pytest.raises(ConfigError, match=key):
            parse_config(text)
    assert parse_config('state_directory = "state"', "/etc/p").state_directory == "/etc/p/state"


def test_a_missing_driver_stops_start_up_with_a_clear_message(tmp_path, monkeypatch):
    """optin_postgresql without psycopg installed is a configuration error that says which
    package to install."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now raises ImportError
    config = parse_config('optin_postgresql = "host=db"\nnameservers = ["192.0.2.53"]\n'
                          f'state_directory = "{tmp_path}"\n')
    with pytest.raises(ConfigError, match="optin_postgresql .* python3-psycopg"):
        PolicyService(config, task.Clock())
