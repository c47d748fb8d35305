#!/usr/bin/python3
"""A trivial Twisted policy server: the ceiling for a Python/Twisted policy service.

Contract: listen on the given Twisted endpoint (default tcp:10046:interface=127.0.0.1); for
every request (name=value lines ended by an empty line, SMTPD_POLICY_README) answer
`action=DUNNO` followed by an empty line, keep the connection open, never send unsolicited
bytes. It does the least any real policy server must do per request: split the buffer into
requests and the request into attributes, so that the benchmark's ratio "policy server /
this server" measures the cost of the policy decision, not of the protocol. No DNS, no state.
A request larger than 64 KiB without an end closes the connection (bounded input).
"""

import argparse
import sys

from twisted.internet import endpoints, protocol, reactor

MAX_BUFFER = 65536
REPLY = b"action=DUNNO\n\n"


class DunnoProtocol(protocol.Protocol):
    def connectionMade(self):
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n\n")
            if end < 0:
                break
            request, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            attributes = dict(line.partition(b"=")[::2] for line in request.split(b"\n"))
            if attributes.get(b"request") != b"smtpd_access_policy":
                self.transport.loseConnection()
                return
            self.transport.write(REPLY)
        if len(self.buffer) > MAX_BUFFER:
            self.transport.loseConnection()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="tcp:10046:interface=127.0.0.1")
    args = parser.parse_args(argv)
    factory = protocol.Factory.forProtocol(DunnoProtocol)
    endpoint = endpoints.serverFromString(reactor, args.listen)
    endpoint.listen(factory).addCallback(
        lambda port: print(f"listening on {args.listen}", flush=True)).addErrback(
        lambda failure: (print(failure.getErrorMessage(), file=sys.stderr), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
