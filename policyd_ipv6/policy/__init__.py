"""The policy side: Postfix's SMTPD access policy protocol in, one ``action=`` reply out.

Pipeline: ``codec`` (sans-IO: bytes to attribute dictionaries and replies to bytes) ->
``engine`` (asks ``decision`` what it needs, gathers those facts through ``checks.gather``,
decides again, writes the decision log line) -> ``server`` (the thin Twisted adapter: one
protocol instance per Postfix connection, replies in request order). ``decision`` is the pure
ordered rule table and ``replies`` the reply texts; neither does I/O. Only ``engine`` and
``server`` import Twisted.
"""
