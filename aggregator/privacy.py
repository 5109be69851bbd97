"""IP anonymization for campaigns whose spec asks for it (``privacy.anonymizeIp``).

The tracker anonymizes when its own ``ANONYMIZE_IP`` is set; a campaign's spec asks the
aggregator to do it for that campaign's events, at the moment an event is stored or,
for an event parked until its message arrives, at the moment it is applied (only then
is its campaign known).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container

# Campaign keys (``namespace/name``) whose events keep only anonymized addresses.
Anonymized = Container[str]
NOBODY: Anonymized = frozenset()


def anonymize_ip(address: str) -> str | None:
    """IPv4 to its /24 and IPv6 to its /48 (host part zeroed); None for what is no address.

    Something that does not parse as an address is dropped rather than kept: it may
    still identify the client.
    """
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)
