"""IP anonymization for campaigns whose spec asks for it (``privacy.anonymizeIp``).

The tracker anonymizes when its own ``ANONYMIZE_IP`` is set; a campaign's spec asks the
aggregator to do it for that campaign's events, at the moment an event is stored or,
for an event parked until its message arrives, at the moment it is applied (only then
is its campaign known).
"""

from __future__ import annotations

from collections.abc import Container

from mailbeacon.netaddr import anonymize_ip

# Campaign keys (``namespace/name``) whose events keep only anonymized addresses.
Anonymized = Container[str]
NOBODY: Anonymized = frozenset()

__all__ = ["NOBODY", "Anonymized", "anonymize_ip"]
