"""Client addresses as every component compares them."""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=8192)
def normalize_ip(text: str) -> IPAddress | None:
    """The address ``text`` names, or None when it names none.

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack socket reports for
    an IPv4 client) is the IPv4 address it carries, and an IPv6 zone (``%eth0``) is dropped,
    so one client is one address wherever it is compared against networks or anonymized.
    Cached: the same proxies and gateways come back all day.
    """
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_host(host: str) -> bool:
    """True when a listen host is reachable from this machine only (the rule of docs/security.md
    "Security model": open only on loopback). ``localhost`` counts; ``0.0.0.0``, ``::``,
    an empty host (every interface) and any other name or address do not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    address = normalize_ip(host)
    return address is not None and address.is_loopback


@functools.lru_cache(maxsize=8192)
def anonymize_ip(text: str) -> str | None:
    """IPv4 to its /24 and IPv6 to its /48 (host part zeroed), as analytics tools commonly do.

    None for what names no address: it is dropped rather than kept, as it may still
    identify the client. Cached like :func:`normalize_ip`.
    """
    address = normalize_ip(text.strip())
    if address is None:
        return None
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


# Addresses quoted in text (a verdict's evidence, a provider's bounce diagnostic): dotted
# quads, and colon groups with an optional dotted tail. Candidates are checked by parsing,
# so a time of day such as 10:30:00 stays as it is.
_ADDRESS_IN_TEXT = re.compile(
    r"(?<![0-9A-Za-z.:])"
    r"(?:(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
    r"(?![0-9A-Za-z.:])"
    # A dotted quad may be followed by a colon: its port (192.0.2.1:25) or a sentence's.
    r"|(?:\d{1,3}\.){3}\d{1,3}(?![0-9A-Za-z.]))"
)


def _anonymized_match(match: re.Match[str]) -> str:
    return anonymize_ip(match.group()) or match.group()


def anonymize_text(text: str) -> str:
    """``text`` with every IP address in it anonymized like :func:`anonymize_ip`."""
    if "." not in text and ":" not in text:
        return text
    return _ADDRESS_IN_TEXT.sub(_anonymized_match, text)


# Provider payload keys that hold a client or server address (SendGrid "ip", SES
# "ipAddress"/"sourceIp", Postmark "Geo.IP", Mailgun "ip").
_IP_KEYS = frozenset({"ip", "ipaddress", "ip_address", "sourceip", "client_ip", "clientip", "remote_ip"})


def scrub_ips(value: Any) -> Any:
    """A copy of ``value`` (an event's metadata, a provider payload) with every address in
    it anonymized: whole values under an IP-like key, and addresses quoted in any text."""
    if isinstance(value, dict):
        return {
            key: (
                anonymize_ip(item) or item
                if isinstance(item, str) and str(key).lower() in _IP_KEYS
                else scrub_ips(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [scrub_ips(item) for item in value]
    if isinstance(value, str):
        return anonymize_text(value)
    return value
