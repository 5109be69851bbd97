"""Recipient domains and the mailbox providers they belong to (docs/aggregator.md "Insights": mailbox providers).

Pure functions. A copy's domain is what follows the last ``@`` of its recipient (already
lower-cased by the event contract). Providers are a small, fixed mapping, so the
Prometheus label ``domain`` has at most :data:`PROVIDERS` values:

- ``gmail``: gmail.com, googlemail.com
- ``outlook``: outlook.com, hotmail.com, live.com, msn.com, windowslive.com, passport.com,
  and hotmail/live/outlook under a country domain (hotmail.co.uk, live.fr, outlook.de)
- ``yahoo``: yahoo.com, ymail.com, rocketmail.com and yahoo under a country domain; AOL
  (aol.com, aim.com, aol under a country domain), whose mail runs on Yahoo's platform
  (same servers, same postmaster rules)
- ``apple``: icloud.com, me.com, mac.com
- ``other``: everything else, also a recipient without a domain.

Domains of ``other`` that contain a dot are also counted one by one, for the top
:data:`TOP_DOMAINS` by messages sent.
"""

from __future__ import annotations

import re
from functools import lru_cache

PROVIDERS: tuple[str, ...] = ("gmail", "outlook", "yahoo", "apple", "other")
OTHER = "other"
TOP_DOMAINS = 10

_EXACT: dict[str, str] = {
    "gmail.com": "gmail",
    "googlemail.com": "gmail",
    "outlook.com": "outlook",
    "hotmail.com": "outlook",
    "live.com": "outlook",
    "msn.com": "outlook",
    "windowslive.com": "outlook",
    "passport.com": "outlook",
    "yahoo.com": "yahoo",
    "ymail.com": "yahoo",
    "rocketmail.com": "yahoo",
    "aol.com": "yahoo",
    "aim.com": "yahoo",
    "icloud.com": "apple",
    "me.com": "apple",
    "mac.com": "apple",
}
# A brand under a country domain: hotmail.fr, live.co.uk, yahoo.com.br, aol.de.
_COUNTRY = r"\.(?:[a-z]{2}|co\.[a-z]{2}|com\.[a-z]{2})"
_FAMILIES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"(?:hotmail|live|outlook){_COUNTRY}"), "outlook"),
    (re.compile(rf"(?:yahoo|aol){_COUNTRY}"), "yahoo"),
)


def domain_of(recipient: str | None) -> str:
    """What follows the last ``@`` of the address; empty when there is no ``@``."""
    if not recipient or "@" not in recipient:
        return ""
    return recipient.rpartition("@")[2]


def provider_of(domain: str) -> str:
    """The provider group of a domain (one of :data:`PROVIDERS`)."""
    found = _EXACT.get(domain)
    if found is not None:
        return found
    for pattern, provider in _FAMILIES:
        if pattern.fullmatch(domain):
            return provider
    return OTHER


def counted_domain(domain: str) -> str | None:
    """The domain when it is counted on its own (an ``other`` domain with a dot), else None.

    Provider names have no dot, so they never collide with a domain counted on its own.
    """
    if "." in domain and provider_of(domain) == OTHER:
        return domain
    return None


@lru_cache(maxsize=4096)
def rows_of(domain: str) -> tuple[str, ...]:
    """The ``domain_stats`` rows a copy to ``domain`` counts in: its provider, and the
    domain itself when it is counted on its own."""
    provider = provider_of(domain)
    if provider == OTHER and "." in domain:
        return (OTHER, domain)
    return (provider,)
