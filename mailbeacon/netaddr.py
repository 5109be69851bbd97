"""Client addresses as every component compares them."""

from __future__ import annotations

import functools
import ipaddress

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
