"""The resolver: the daemon's own asynchronous DNS stub, never blocking the reactor.

``wire`` (sans-IO: query encoding, reply matching, the ``Nameserver`` value) -> ``client``
(Twisted UDP with TCP fallback, random IDs and ports, retries over the nameservers) ->
``lookups`` (typed, cached answers for the checks: TXT, PTR, A/AAAA, MX). Nothing outside
this package speaks DNS on the wire. Do not call this package ``dns``: dnspython owns that name.
"""
