"""Client addresses: which one to believe, and how much of it to keep."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from mailbeacon.netaddr import anonymize_ip, normalize_ip

# Addresses quoted in text (a verdict's evidence, a provider's bounce diagnostic): dotted
# quads, and colon groups with an optional dotted tail. Candidates are checked by parsing,
# so a time of day such as 10:30:00 stays as it is.
_ADDRESS_IN_TEXT = re.compile(
    r"(?<![0-9A-Za-z.:])"
    r"(?:(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
    r"|(?:\d{1,3}\.){3}\d{1,3})"
    r"(?![0-9A-Za-z.:])"
)


def _anonymized_match(match: re.Match[str]) -> str:
    return anonymize_ip(match.group()) or match.group()


def anonymize_text(text: str) -> str:
    """``text`` with every IP address in it anonymized like :func:`anonymize_ip`."""
    if "." not in text and ":" not in text:
        return text
    return _ADDRESS_IN_TEXT.sub(_anonymized_match, text)


def client_ip(
    peer: str | None,
    forwarded_for: str | None,
    trusted_proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str | None:
    """The client's address: ``X-Forwarded-For`` counts only when the peer is a trusted proxy.

    Walk the header from the right, skipping our own proxies, so a client cannot forge
    its address by sending the header itself.
    """
    if peer is None:
        return None
    if not forwarded_for or not trusted_proxies:
        return peer  # nothing to believe beyond the socket's own peer
    chain = [peer]
    if forwarded_for:
        chain = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()] + [peer]
    for hop in reversed(chain):
        ip = normalize_ip(hop)
        if ip is None:
            return hop if hop == peer else None
        if not any(ip in network for network in trusted_proxies):
            return str(ip)
    return chain[0]


# Provider payload keys that hold a client or server address (SendGrid "ip", SES
# "ipAddress"/"sourceIp", Postmark "Geo.IP", Mailgun "ip").
_IP_KEYS = frozenset({"ip", "ipaddress", "ip_address", "sourceip", "client_ip", "clientip", "remote_ip"})


def scrub_ips(value: Any) -> Any:
    """A copy of a provider payload with every address in it anonymized: whole values under
    an IP-like key, and addresses quoted in any other text."""
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
