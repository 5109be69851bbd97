"""Client addresses: which one to believe (how much of it to keep: :mod:`mailbeacon.contract.netaddr`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from mailbeacon.contract.netaddr import normalize_ip


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
