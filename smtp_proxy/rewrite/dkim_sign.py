"""DKIM: messages the app already signed, and optional re-signing after rewriting (dkimpy).

Rewriting a body breaks any DKIM signature over it. By default such a message is relayed
with its body untouched (no tracking for that copy); with a configured key the proxy
drops the app's signatures, rewrites, and signs the copy itself.
"""

from __future__ import annotations

from pathlib import Path

import dkim

from smtp_proxy.rewrite import mime


class DkimConfigError(ValueError):
    pass


class DkimSigner:
    def __init__(self, private_key: bytes, selector: str, domain: str) -> None:
        if not selector or not domain:
            raise DkimConfigError("DKIM re-signing needs a selector and a domain")
        if b"PRIVATE KEY" not in private_key:
            raise DkimConfigError("DKIM key must be a PEM private key")
        self._key = private_key
        self.selector = selector
        self.domain = domain

    @classmethod
    def from_file(cls, path: Path, selector: str, domain: str) -> DkimSigner:
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise DkimConfigError(f"cannot read DKIM key {path}: {exc.strerror}") from exc
        return cls(key, selector, domain)

    def sign(self, message: bytes) -> bytes:
        """The ``DKIM-Signature`` field (with its line break) to put on top of ``message``."""
        eol = b"\r\n" if b"\r\n" in message[:4096] else b"\n"
        signature: bytes = dkim.sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self._key,
            canonicalize=(b"relaxed", b"relaxed"),
            linesep=eol,
        )
        return signature


def without_signatures(headers: bytes) -> bytes:
    return mime.remove_headers(headers, {"dkim-signature"})
