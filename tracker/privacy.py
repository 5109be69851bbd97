"""Client addresses: which one to believe, and how much of it to keep."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Any


@functools.lru_cache(maxsize=8192)
def anonymize_ip(address: str) -> str:
    """IPv4 to its /24 and IPv6 to its /48 (host part zeroed), as analytics tools commonly do.

    Cached: the same mail proxies and gateways come back all day, and parsing costs more than
    everything else a pixel load does.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


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
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return hop if hop == peer else None
        if not any(ip in network for network in trusted_proxies):
            return str(ip)
    return chain[0]


# Provider payload keys that hold a client or server address (SendGrid "ip", SES
# "ipAddress"/"sourceIp", Postmark "Geo.IP", Mailgun "ip").
_IP_KEYS = frozenset({"ip", "ipaddress", "ip_address", "sourceip", "client_ip", "clientip", "remote_ip"})


def scrub_ips(value: Any) -> Any:
    """A copy of a provider payload with every address under an IP-like key anonymized."""
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
    return value
