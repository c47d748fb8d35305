"""A coverage-guided fuzz target (atheris) for the policy codec and the address normalisation.

Contract: ``check(data)`` feeds ``data`` to a ``PolicyDecoder`` in slices cut where the input's
first bytes say, and every decoded value (plus the raw input as text) to the normalisation
functions of ``policyd_ipv6.names``; it raises AssertionError (or lets through any other
exception) when an invariant breaks:

- the decoder returns requests (dicts of str, with ``request=smtpd_access_policy``) or raises
  ``PolicyProtocolError``, and nothing else, and is dead after raising;
- ``client_ip``, ``recipient_domain``, ``domain_key``, ``host_name`` and ``helo_domain`` never
  raise; a domain key is lower-case ASCII of at most 253 octets with labels of at most 63;
- ``printable`` gives printable ASCII only, bounded by its limit.

Run it (atheris is not needed by the test suite; tests/fuzz/test_fuzz_target.py runs ``check``
on seed inputs without it):

    pip install atheris
    python3 tests/fuzz/fuzz_policy.py -max_total_time=300 [CORPUS_DIR]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from policyd_ipv6.names import client_ip, domain_key, helo_domain, host_name, recipient_domain
from policyd_ipv6.policy.codec import PolicyDecoder, PolicyProtocolError  # noqa: E402
from policyd_ipv6.text import printable

SEEDS = [
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=2001:db8::25\n"
    b"sender=a@example.net\nrecipient=bob@contoso.com\n\n",
    b"request=smtpd_access_policy\nrecipient=\"a@b\"@[IPv6:2001:db8::1]\n\n",
    b"request=smtpd_access_policy\nsender=\xff\xfe@b\xc3\xbccher.example\n\n",
    b"request=smtpd_access_policy\nhelo_name=" + b"a" * 70 + b".example\n\n",
    b"\x03\x10request=smtpd_access_policy\nfoo\n\n",
    b"request=smtpd_access_policy\nsender=a\x00b\n\n",
]


def _check_names(text: str) -> None:
    client_ip(text)
    domain = recipient_domain(text)
    for name in (text, domain or ""):
        key = domain_key(name)
        if key is not None:
            assert key.isascii() and key == key.lower() and len(key) <= 253, key
            assert all(1 <= len(label) <= 63 for label in key.split(".")), key
        host_name(name)
        helo_domain(name)
    shown = printable(text, 50)
    assert all(0x20 <= ord(ch) < 0x7f for ch in shown), shown
    assert len(shown) <= 50 * 10 + 3, shown  # \U0001xxxx is 10 characters per character


def check(data: bytes) -> None:
    """One fuzz input; see the module docstring."""
    cuts = sorted({b % (len(data) + 1) for b in data[:4]} | {len(data)})
    decoder = PolicyDecoder()
    start = 0
    for end in cuts:
        try:
            requests = decoder.feed(data[start:end])
        except PolicyProtocolError:
            try:
                decoder.feed(b"x")
            except PolicyProtocolError:
                break
            raise AssertionError("the decoder accepted input after its error") from None
        for request in requests:
            assert request.get("request") == "smtpd_access_policy", request
            for key, value in request.items():
                assert isinstance(key, str) and isinstance(value, str)
                assert "\n" not in value and "\0" not in value
                _check_names(value)
        start = end
    _check_names(data.decode("utf-8", "surrogateescape"))


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
