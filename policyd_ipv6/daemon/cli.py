"""The command line: ``policyd-ipv6 serve | check | configtest | report | reload | --version``.

Contract: ``main(argv)`` returns the process exit status (0 success, 2 usage error, 1
configuration error or failure to start; ``check`` 4 or 5 for a refusal) and is the console
script's entry point, also reached with ``python3 -m policyd_ipv6``; a usage error (argparse's
own exit too) is returned, not raised.

- ``serve [--config F | --sample-config] [--log-level L] [--allow-root]`` runs in the
  foreground until SIGTERM/SIGINT; logs go to standard output. As root it needs ``user`` in the
  configuration (it drops to that user after binding) or ``--allow-root``. A bad
  configuration prints ``policyd-ipv6: configuration error: ...`` (naming the key and value)
  to standard error and exits 1.
- ``check [--config F | --sample-config] --client-address A --sender S --recipient R
  [--helo H] [--sasl-username U] [--message FILE]`` decides one request exactly as ``serve``
  would, prints the reply (``action=...``) as its first line and then a trace of each step.
  With ``--message`` the stored message's DKIM signatures are verified too and the decision
  is the one of the policy service plus the built-in milter (SPF or DKIM). ``--requests
  FILE|-`` decides the requests of a file instead (Postfix's format), ``--json`` prints one
  JSON object per request, ``--assume-opted-in`` decides as if the recipients' domains were
  listed, and ``--via unix:PATH|tcp:HOST:PORT`` asks a running daemon (no ``--config``). The
  exit status is that of the most severe reply: 0 DUNNO, 4 a temporary refusal, 5 a
  permanent one (``check_command``).
- ``configtest [--config F]`` loads the configuration and the opt-in source without any DNS
  and exits 0, or 1 printing the error (``configtest_command``).
- ``report [--json] [FILE ...]`` summarises decision and milter log lines
  (``report_command``).
- ``reload [--config F] --pid PID`` sends SIGHUP to the running daemon PID (the unit's
  ``ExecReload=``, so that ``systemctl reload`` needs no ``kill`` binary: minbase + systemd has
  none). With ``--config`` it first checks F as ``configtest`` does (PostgreSQL left alone:
  ``configtest(config, database=False)``) and exits 1 with the error, not signalling, when F
  would not load; it exits 1 naming the PID when there is no such process or it may not be
  signalled.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

from policyd_ipv6 import __version__
from policyd_ipv6.daemon.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from policyd_ipv6.daemon.report_command import add_parser as add_report_parser

__all__ = ["main"]

# The sample files are package data of the top-level package, one directory up.
SAMPLE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample",
                             "policyd-ipv6.toml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyd-ipv6",
        description="Postfix policy service for anonymous inbound mail over IPv6 (EOP's rules).")
    parser.add_argument("--version", action="version", version=f"policyd-ipv6 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_options(sub) -> None:
        group = sub.add_mutually_exclusive_group()
        group.add_argument("--config", metavar="FILE", default=None,
                           help=f"configuration file (default: {DEFAULT_CONFIG_PATH})")
        group.add_argument("--sample-config", action="store_true",
                           help="use the sample configuration shipped with the program "
                                "(127.0.0.1:10045, example.com opted in; started as root, "
                                "serve runs as nobody)")

    serve = commands.add_parser("serve", help="run the policy service in the foreground")
    config_options(serve)
    serve.add_argument("--log-level", choices=["debug", "info", "warn", "error"],
                       default="info", help="least important log level shown (default: info)")
    serve.add_argument("--allow-root", action="store_true",
                       help="keep running as root when the configuration names no user "
                            "(for disposable test labs; never on a mail server)")

    check = commands.add_parser("check", help="decide one request and explain the decision")
    config_options(check)
    check.add_argument("--client-address", help="the SMTP client's IP address")
    check.add_argument("--sender", help='the MAIL FROM address ("" for <>)')
    check.add_argument("--recipient", help="the RCPT TO address")
    check.add_argument("--helo", default="", help="the HELO/EHLO name")
    check.add_argument("--sasl-username", default="", help="the SASL login, if authenticated")
    check.add_argument("--message", metavar="FILE",
                       help="a stored message: also verify its DKIM signatures and decide as "
                            "the policy service and the built-in milter together would")
    check.add_argument("--requests", metavar="FILE",
                       help='policy requests as Postfix sends them, separated by blank lines '
                            '("-": standard input), instead of --client-address, --sender '
                            "and --recipient; one reply each, in order")
    check.add_argument("--json", action="store_true",
                       help="one JSON object per request: reply, rule, outcome, would, trace")
    check.add_argument("--assume-opted-in", action="store_true",
                       help="decide as if the recipient's domain were in the opt-in table")
    check.add_argument("--via", metavar="ENDPOINT",
                       help="ask the running daemon at unix:PATH or tcp:HOST:PORT over the "
                            "policy protocol (its caches, resolver and configuration; no "
                            "--config)")
    configtest = commands.add_parser(
        "configtest", help="load the configuration and the opt-in source (no DNS); exit 0, "
                           "or 1 with the error")
    configtest.add_argument("--config", metavar="FILE", default=None,
                            help=f"configuration file (default: {DEFAULT_CONFIG_PATH})")
    add_report_parser(commands)
    reload = commands.add_parser("reload", help="make the running daemon re-read its "
                                 "configuration and opt-in table (SIGHUP)")
    reload.add_argument("--pid", type=int, required=True,
                        help="the daemon's process id (systemd's $MAINPID)")
    reload.add_argument("--config", metavar="FILE", default=None,
                        help="check this configuration first (as configtest does) and refuse "
                             "to signal when it would not load")
    return parser


def _reload(pid: int) -> int:
    # pid 0 and negative ids would signal process groups, 1 is init: never the daemon.
    if pid <= 1:
        print(f"policyd-ipv6: reload: --pid {pid} is not a daemon's process id", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as error:
        print(f"policyd-ipv6: reload: cannot signal process {pid}: {error.strerror}",
              file=sys.stderr)
        return 1
    return 0


def _config(args):
    if not getattr(args, "sample_config", False):
        return load_config(args.config or DEFAULT_CONFIG_PATH)
    config = load_config(SAMPLE_CONFIG)
    if os.geteuid() == 0 and not config.user:
        # A first try as root on a fresh machine: serve as nobody rather than refuse or stay root.
        config = dataclasses.replace(config, user="nobody")
    return config


# Twisted endpoint types that never use TLS (socket activation passes plain sockets too).
_PLAIN_ENDPOINTS = frozenset({"tcp", "tcp6", "unix"})


def _without_tls(config) -> None:
    """Keep pyOpenSSL out of a serving process whose endpoints are all plain. Twisted's TCP
    transport imports it when it can, with cryptography, service_identity and pyasn1 (about
    9 MB resident), only to offer startTLS, which the daemon never calls. A module that is
    None in ``sys.modules`` fails to import with ImportError, and twisted.internet.tcp then
    builds its transports without TLS. Nothing changes once Twisted's TCP is loaded, or when
    an endpoint is of another type (ssl:, tls:, a plugin's)."""
    endpoints = (*config.listen, *config.milter_listen, *config.metrics_listen)
    if "twisted.internet.tcp" in sys.modules or any(
            e.partition(":")[0].strip().lower() not in _PLAIN_ENDPOINTS for e in endpoints):
        return
    sys.modules.setdefault("OpenSSL", None)  # type: ignore[arg-type]


def _check_usage(args) -> str:
    """Why these ``check`` options do not go together, or ""."""
    if args.via and (args.config or args.sample_config):
        return "--via asks the running daemon, which has its own configuration: no --config"
    if args.via and (args.message or args.assume_opted_in):
        return "--message and --assume-opted-in decide in-process: not with --via"
    if args.requests:
        if args.message:
            return "--message goes with one request, not with --requests"
        if args.client_address or args.sender is not None or args.recipient:
            return "--requests replaces --client-address, --sender and --recipient"
        return ""
    missing = [name for name, value in (("--client-address", args.client_address),
                                        ("--sender", args.sender),
                                        ("--recipient", args.recipient)) if value is None]
    return ("needs " + ", ".join(missing) + " (or --requests FILE)") if missing else ""


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as leaving:  # a usage error (2), or --help and --version (0)
        return leaving.code if isinstance(leaving.code, int) else 2
    if args.command is None:
        _parser().print_help(sys.stderr)
        return 2
    if args.command == "reload":
        if args.config is not None:
            # The unit's ExecReload=: a bad edit fails `systemctl reload` here, visibly,
            # instead of being logged by the daemon, which would keep its old configuration.
            from policyd_ipv6.daemon.configtest_command import configtest

            try:
                # Not waiting on PostgreSQL: systemd's start timeout bounds ExecReload= too.
                configtest(load_config(args.config), database=False)
            except ConfigError as error:
                # Run by systemd (ExecReload=), standard error is the journal: mark the line
                # as an error (sd-daemon prefix) so that journalctl -p err shows it.
                from policyd_ipv6.daemon.logs import journal_stream

                mark = "<3>" if journal_stream(sys.stderr) else ""
                print(f"{mark}policyd-ipv6: reload: configuration error: {error}; the daemon "
                      "was not signalled", file=sys.stderr)
                return 1
        return _reload(args.pid)
    if args.command == "report":
        from policyd_ipv6.daemon.report_command import report

        return report(args)
    if args.command == "check":
        problem = _check_usage(args)
        if problem:
            print(f"policyd-ipv6: check: {problem}", file=sys.stderr)
            return 2
        if args.via:
            from policyd_ipv6.daemon.check_command import check_via

            return check_via(args)
    try:
        config = _config(args)
        if args.command == "serve":
            _without_tls(config)
            from policyd_ipv6.daemon.serve_command import serve

            return serve(config, args.log_level, args.allow_root)
        if args.command == "configtest":
            from policyd_ipv6.daemon.configtest_command import configtest

            return configtest(config)
        from policyd_ipv6.daemon.check_command import check

        return check(config, args)
    except ConfigError as error:
        print(f"policyd-ipv6: configuration error: {error}", file=sys.stderr)
        return 1
