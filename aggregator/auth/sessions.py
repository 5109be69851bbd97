"""Login sessions for the pages, valid on every replica without server-side state.

A session cookie is ``v1.<level>.<expiry>.<nonce>.<fingerprint>.<mac>``: the MAC is an
HMAC keyed by (a key derived from) the token the person logged in with, over everything
before it. Any replica holding that token can check it; removing the token from
API_TOKENS / API_READ_TOKENS ends its sessions; a read-only session cannot claim full
access (the level is signed). The CSRF token of the session's forms is another HMAC of
the same key, so a page can only post with the session it was rendered for.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from aggregator.auth.policy import Access, AuthPolicy, Credential

SESSION_COOKIE = "mailbeacon_session"
SESSION_SECONDS = 12 * 3600
_LEVELS = {Access.FULL: "full", Access.READ: "read"}


def _key(credential: Credential) -> bytes:
    return hmac.new(credential.token, b"mailbeacon session key v1", hashlib.sha256).digest()


def _mac(credential: Credential, payload: str) -> str:
    return hmac.new(_key(credential), payload.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Session:
    credential: Credential
    payload: str  # everything the MAC covers: unique per login (the nonce)
    expires: int

    @property
    def access(self) -> Access:
        return self.credential.access

    def csrf_token(self) -> str:
        return hmac.new(_key(self.credential), b"csrf|" + self.payload.encode(), hashlib.sha256).hexdigest()[
            :32
        ]


def issue(credential: Credential, now: float) -> str:
    """A new session cookie value for someone who showed ``credential``'s token."""
    expires = int(now) + SESSION_SECONDS
    nonce = secrets.token_hex(8)
    payload = f"v1.{_LEVELS[credential.access]}.{expires}.{nonce}.{credential.fingerprint}"
    return f"{payload}.{_mac(credential, payload)}"


def verify(value: str | None, policy: AuthPolicy, now: float) -> Session | None:
    """The session ``value`` proves, or None (malformed, tampered, expired, token removed)."""
    if not value or len(value) > 256:
        return None
    parts = value.split(".")
    if len(parts) != 6 or parts[0] != "v1" or not parts[2].isdigit():
        return None
    _, level, expiry, _, fingerprint, mac = parts
    expires = int(expiry)
    # A cookie signed for longer than a session lasts was not made by issue().
    if not now < expires <= now + SESSION_SECONDS + 60:
        return None
    credential = policy.by_fingerprint(fingerprint)
    if credential is None or _LEVELS.get(credential.access) != level:
        return None
    payload = value.rsplit(".", 1)[0]
    if not hmac.compare_digest(mac.encode(), _mac(credential, payload).encode()):
        return None
    return Session(credential, payload, expires)
