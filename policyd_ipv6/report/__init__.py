"""The impact report: what the decisions in a log did, and whom they hurt or would hurt.

Pipeline: ``lines`` (pure: one log line in, a parsed ``Entry`` or None out) -> ``impact``
(pure: entries in order, totals and tables out, as text or one JSON object). The command
``policyd-ipv6 report`` (``daemon.report_command``) reads the files and prints. Neither module
does I/O or imports Twisted.
"""
