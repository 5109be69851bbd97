"""The aggregator's access rules as plain functions: the policy the settings give, whose
credentials a request carries, which requests are cross-origin, where a login may return.

Open only on loopback: an aggregator listening elsewhere needs tokens, a trusted auth
proxy, or the explicit ``API_AUTH=none`` (docs/aggregator.md "Authentication").
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass, field
from enum import IntEnum
from urllib.parse import urlsplit

from mailbeacon.contract.netaddr import normalize_ip
from mailbeacon.contract.settings import Settings

# A token is a password nobody types: 24 characters of `openssl rand -hex 32` are 96 bits.
MIN_TOKEN_LENGTH = 24
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Access(IntEnum):
    NONE = 0
    READ = 1  # GET and HEAD
    FULL = 2  # everything, refresh included


class AuthConfigError(ValueError):
    """The settings leave the aggregator open where it must not be, or contradict each other.
    The message is one line naming the settings, and never a token."""


def _digest(token: str | bytes) -> bytes:
    # Tokens are compared as digests: equal length, so compare_digest leaks nothing, not
    # even a token's length.
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


@dataclass(frozen=True)
class Credential:
    """One configured token and what it may do. ``fingerprint`` names it in session cookies
    without revealing it (an HMAC keyed by the token itself)."""

    token: bytes = field(repr=False)
    access: Access
    digest: bytes = field(init=False, repr=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", _digest(self.token))
        fingerprint = hmac.new(self.token, b"mailbeacon token fingerprint v1", hashlib.sha256).hexdigest()
        object.__setattr__(self, "fingerprint", fingerprint[:16])


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AuthPolicy:
    credentials: tuple[Credential, ...] = ()
    proxy_header: str | None = None
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # API_AUTH=none was asked for: open, and said so in a warning at start.
    opted_out: bool = False

    @property
    def open(self) -> bool:
        """Nobody needs credentials: loopback with nothing configured, or API_AUTH=none."""
        return not self.credentials and self.proxy_header is None

    def credential_for(self, token: str) -> Credential | None:
        """The credential ``token`` is, compared against every one in constant time."""
        given = _digest(token)
        found = None
        for credential in self.credentials:
            if hmac.compare_digest(given, credential.digest):
                found = credential
        return found

    def by_fingerprint(self, fingerprint: str) -> Credential | None:
        for credential in self.credentials:
            if hmac.compare_digest(fingerprint.encode(), credential.fingerprint.encode()):
                return credential
        return None

    def trusts(self, peer: str | None) -> bool:
        """Whether the TCP peer is one of TRUSTED_PROXIES (its headers are believed)."""
        address = normalize_ip(peer or "")
        return address is not None and any(address in network for network in self.trusted_proxies)


def _checked_tokens(name: str, tokens: list[str]) -> list[bytes]:
    checked = []
    for number, token in enumerate(tokens, 1):
        if len(token) < MIN_TOKEN_LENGTH:
            raise AuthConfigError(
                f"MAILBEACON_{name}: token {number} has {len(token)} characters, fewer than "
                f"{MIN_TOKEN_LENGTH} (make one with `openssl rand -hex 32`)"
            )
        if not token.isascii() or not token.isprintable() or " " in token:
            raise AuthConfigError(
                f"MAILBEACON_{name}: token {number} has spaces or characters an HTTP header cannot carry"
            )
        checked.append(token.encode())
    return checked


def policy_from_settings(settings: Settings) -> AuthPolicy:
    """The aggregator's policy, or :class:`AuthConfigError` when it would be open off loopback."""
    full = _checked_tokens("API_TOKENS", [t.get_secret_value() for t in settings.aggregator.api_tokens])
    read = _checked_tokens(
        "API_READ_TOKENS", [t.get_secret_value() for t in settings.aggregator.api_read_tokens]
    )
    if set(full) & set(read):
        raise AuthConfigError("a token is in both MAILBEACON_API_TOKENS and MAILBEACON_API_READ_TOKENS")
    header = settings.aggregator.auth_proxy_header
    if settings.aggregator.api_auth == "none":
        if full or read or header:
            raise AuthConfigError(
                "MAILBEACON_API_AUTH=none contradicts MAILBEACON_API_TOKENS, API_READ_TOKENS and "
                "AUTH_PROXY_HEADER: unset one or the other"
            )
        return AuthPolicy(opted_out=True)
    networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies)
    if header and not networks:
        raise AuthConfigError(
            f"MAILBEACON_AUTH_PROXY_HEADER ({header}) is believed only from MAILBEACON_TRUSTED_PROXIES, "
            "which is empty: set it to the auth proxy's addresses"
        )
    policy = AuthPolicy(
        credentials=tuple(Credential(t, Access.FULL) for t in full)
        + tuple(Credential(t, Access.READ) for t in read),
        proxy_header=header,
        trusted_proxies=networks,
    )
    if policy.open and not settings.listens_on_loopback("aggregator"):
        raise AuthConfigError(
            f"the aggregator listens on {settings.aggregator.listen}, beyond loopback, without "
            "authentication: set MAILBEACON_API_TOKENS (and/or API_READ_TOKENS), or AUTH_PROXY_HEADER "
            "with TRUSTED_PROXIES, or MAILBEACON_API_AUTH=none to serve statistics and recipients to anyone"
        )
    return policy


def needed_access(method: str) -> Access:
    return Access.READ if method.upper() in SAFE_METHODS else Access.FULL


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header ("" when the scheme is Bearer but
    the token is missing); None for no header or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def cross_origin(method: str, origin: str | None, fetch_site: str | None, host: str | None) -> bool:
    """Whether a browser sent this state-changing request from another site.

    ``Sec-Fetch-Site`` first (every current browser sends it, and unlike ``Origin`` it is
    not blanked by the pages' ``Referrer-Policy: no-referrer``, which makes a same-origin
    form post say ``Origin: null``); without it, ``Origin`` must name this host. Requests
    with neither come from no browser (the CLI, curl, the operator) and pass: credentials
    protect those. The same rule as Go's ``http.CrossOriginProtection``.
    """
    if method.upper() in SAFE_METHODS:
        return False
    if fetch_site is not None:
        return fetch_site.strip().lower() not in ("same-origin", "none")
    if origin is None:
        return False
    parts = urlsplit(origin.strip())
    if origin.strip() == "null" or not parts.netloc:
        return True
    return parts.netloc.lower() != (host or "").strip().lower()


def local_path(target: str | None, default: str = "/campaigns/") -> str:
    """``target`` when it is a path on this site, else ``default``: no open redirect.

    Browsers read ``//evil.example`` and ``/\\evil.example`` as other hosts, and drop tabs
    and newlines before parsing, so any backslash, control character or space refuses it.
    """
    if not target or not target.startswith("/") or target.startswith("//"):
        return default
    if any(ch == "\\" or ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target
