"""The checks that gather a message's facts: reverse DNS, SPF and DKIM.

``rdns`` (rule 2: a PTR for the client address, optionally forward-confirmed), ``spf`` (RFC
7208 with pyspf, driven from answers the daemon fetched itself), ``dkim`` (RFC 6376 with dkimpy,
keys fetched first) and ``gather`` (per message: starts the lookups a decision needs once,
shares them between recipients, bounds them by a deadline). Every check takes its lookups as
an argument and returns a Deferred that always fires with a fact from ``policyd_ipv6.facts``;
none of them raises a DNS error into its caller.
"""
