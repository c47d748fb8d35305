"""DKIM keys and signed messages for tests: keys made by openssl, messages signed by dkimpy.

Contract: ``DkimKey.generate(bits)`` makes an RSA key pair with ``openssl genrsa`` (PKCS#1,
which both dkimpy 1.1.4 and 1.1.8 read) and holds the private key (PEM) and the public key
as the base64 text of a DKIM key record's ``p=``; ``key.record()`` is that TXT record's text.
``sign(message, key, domain, selector)`` prepends a DKIM-Signature made by dkimpy itself, as
a real signer would. ``require_openssl()`` skips a test loudly when openssl is missing, and
fails it under CI=true.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import dkim


def require_openssl() -> None:
    import pytest

    if shutil.which("openssl"):
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but openssl is not installed (Debian package openssl)",
                    pytrace=False)
    pytest.skip("NOT TESTED: openssl is not installed (Debian package openssl), no DKIM keys")


@dataclass(frozen=True)
class DkimKey:
    private_pem: bytes
    public_b64: str

    @classmethod
    def generate(cls, bits: int = 1024) -> DkimKey:
        with tempfile.TemporaryDirectory(prefix="dkimkey-") as directory:
            path = os.path.join(directory, "key.pem")
            subprocess.run(["openssl", "genrsa", "-traditional", "-out", path, str(bits)],
                           check=True, capture_output=True)
            der = subprocess.run(["openssl", "rsa", "-in", path, "-pubout", "-outform", "DER"],
                                 check=True, capture_output=True).stdout
            with open(path, "rb") as handle:
                private = handle.read()
        return cls(private, base64.b64encode(der).decode("ascii"))

    def record(self) -> str:
        """The key record (RFC 6376 §3.6.1) to publish at selector._domainkey.domain."""
        return "v=DKIM1; k=rsa; p=" + self.public_b64


def sign(message: bytes, key: DkimKey, domain: str, selector: str,
         headers=(b"from", b"to", b"subject", b"date", b"message-id")) -> bytes:
    """``message`` (CRLF line ends) with a relaxed/relaxed DKIM-Signature on top."""
    signature = dkim.sign(message, selector.encode(), domain.encode(), key.private_pem,
                          canonicalize=(b"relaxed", b"relaxed"), include_headers=list(headers))
    return signature + message


def message(sender: str = "alice@sender.test", recipient: str = "bob@example.com",
            subject: str = "test", body: bytes = b"Hello.\r\n", extra: bytes = b"") -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n"
            "Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash((sender, subject)))}@sender.test>\r\n").encode()
    return head + extra + b"\r\n" + body
