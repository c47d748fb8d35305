"""End-to-end tests: real Postfix, Knot, swaks and policyd-ipv6 in network namespaces."""
