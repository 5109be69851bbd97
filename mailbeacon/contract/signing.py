"""Tracking URLs and click-link signatures (docs/architecture.md "Tracking URLs and signing").

A click URL carries an HMAC-SHA256 over the tracking id and the destination, so the
tracker redirects only to destinations the proxy itself put in a message: it is never
an open redirect. Signing uses the first key; verification accepts any configured key,
which lets operators rotate keys without breaking links already in inboxes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from urllib.parse import quote, urlencode

# The destination of the honeypot link the proxy hides in each message: people never see
# it, so a click on it marks a scanner that follows every link. Signed like any link, and
# the tracker answers it without redirecting anywhere.
HONEYPOT_URL = "mailbeacon:honeypot"

_URLSAFE = bytes.maketrans(b"+/", b"-_")
# 128 bits of the MAC: ample against forgery and keeps links short in mail bodies.
_SIGNATURE_BYTES = 16


class NoSigningKey(RuntimeError):
    """Raised when a component that signs or verifies links has no key configured."""


def _mac(key: bytes, tracking_id: str, url: str) -> str:
    # hmac.digest is the one-shot C implementation: same MAC, a fraction of hmac.new's cost.
    digest = hmac.digest(key, f"{tracking_id}\n{url}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(digest[:_SIGNATURE_BYTES]).rstrip(b"=").decode()


def sign_click(keys: Sequence[bytes], tracking_id: str, url: str) -> str:
    if not keys:
        raise NoSigningKey("MAILBEACON_SECRET_KEYS is empty")
    return _mac(keys[0], tracking_id, url)


def verify_click(keys: Sequence[bytes], tracking_id: str, url: str, signature: str) -> bool:
    return ClickVerifier(keys).verify(tracking_id, url, signature)


class ClickVerifier:
    """Checks click signatures against every key, with each key's HMAC prepared once.

    The tracker checks one signature per click; starting from a copy of a keyed HMAC saves
    the key setup (and OpenSSL's algorithm lookup) that a one-shot ``hmac.digest`` repeats.
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        self._keyed = [hmac.new(key, digestmod=hashlib.sha256) for key in keys]

    def verify(self, tracking_id: str, url: str, signature: str) -> bool:
        if not self._keyed or not signature or not signature.isascii():
            return False  # a signature outside base64's alphabet matches no key
        message = f"{tracking_id}\n{url}".encode()
        offered = signature.encode()
        valid = False
        # Compare against every key in constant time so timing does not reveal which key failed.
        for keyed in self._keyed:
            mac = keyed.copy()
            mac.update(message)
            # base64.urlsafe_b64encode, without its two Python-level wrappers.
            expected = binascii.b2a_base64(mac.digest()[:_SIGNATURE_BYTES], newline=False)
            valid |= hmac.compare_digest(expected.translate(_URLSAFE).rstrip(b"="), offered)
        return valid


def pixel_url(site_url: str, tracking_id: str) -> str:
    return f"{site_url}/track/pixel/{tracking_id}/"


def click_url(site_url: str, keys: Sequence[bytes], tracking_id: str, url: str) -> str:
    query = urlencode({"url": url, "sig": sign_click(keys, tracking_id, url)}, quote_via=quote)
    return f"{site_url}/track/click/{tracking_id}/?{query}"


def honeypot_url(site_url: str, keys: Sequence[bytes], tracking_id: str) -> str:
    return click_url(site_url, keys, tracking_id, HONEYPOT_URL)


# The name of the list an unsubscribe link leaves is signed like a click destination, under
# a prefix no destination has (the tracker redirects only to http(s) addresses), so its page
# shows only names the proxy put there and a list signature is never a click signature.
_LIST_PREFIX = "mailbeacon:list:"
MAX_LIST_NAME = 100


def list_name_signed(keys: Sequence[bytes], tracking_id: str, name: str) -> str:
    return sign_click(keys, tracking_id, _LIST_PREFIX + name)


def list_name_verified(verifier: ClickVerifier, tracking_id: str, name: str, signature: str) -> bool:
    return bool(name) and verifier.verify(tracking_id, _LIST_PREFIX + name, signature)


def unsubscribe_url(
    site_url: str, tracking_id: str, keys: Sequence[bytes] = (), list_name: str | None = None
) -> str:
    """The copy's unsubscribe link; with ``list_name`` (and a key) the link carries the name
    of the list it leaves, signed, for the unsubscribe page to show."""
    url = f"{site_url}/track/unsubscribe/{tracking_id}/"
    name = (list_name or "").strip()[:MAX_LIST_NAME]
    if not name or not keys:
        return url
    query = urlencode({"list": name, "sig": list_name_signed(keys, tracking_id, name)}, quote_via=quote)
    return f"{url}?{query}"


def is_tracking_url(site_url: str, url: str) -> bool:
    """True for links that already point at our tracker, so they are never wrapped twice."""
    return url.startswith(f"{site_url}/track/")
