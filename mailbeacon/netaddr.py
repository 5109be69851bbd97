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
