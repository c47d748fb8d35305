"""The milter side: the Sendmail milter protocol (version 6) as Postfix speaks it, for DKIM.

Pipeline: ``codec`` (sans-IO packets and responses) -> ``session`` (sans-IO state machine of
one milter connection, emitting ``events``; ``collect`` keeps each message within its bounds)
-> ``server`` (the Twisted adapter: registers the SMTP session in ``registry`` so the policy
side knows the milter is on the path, runs the DKIM check, answers at end of message with what
``end_of_message`` decides). ``codec``, ``events``, ``session``, ``collect``,
``end_of_message`` and ``registry`` do no I/O and do not import Twisted.
"""
