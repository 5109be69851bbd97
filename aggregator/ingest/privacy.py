"""IP anonymization for campaigns whose spec asks for it (``privacy.anonymizeIp``).

The tracker anonymizes when its own ``ANONYMIZE_IP`` is set; a campaign's spec asks the
aggregator to do it for that campaign's events, at the moment an event is stored or,
for an event parked until its message arrives, at the moment it is applied (only then
is its campaign known).
"""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any

from aggregator.store.bulk import json_text
from mailbeacon.contract.netaddr import anonymize_ip, anonymize_text, scrub_ips

# Campaign keys (``namespace/name``) whose events keep only anonymized addresses.
Anonymized = Container[str]
NOBODY: Anonymized = frozenset()

# Positions in an events row (the column order of ingest's _EVENT_COLUMNS).
IP, USER_AGENT, REASON, METADATA = 7, 8, 11, 15


def anonymize_row(row: list[Any]) -> None:
    """Every address an ``events`` row holds, anonymized in place: the ``ip`` column, and
    addresses quoted in the user agent, the reason and the metadata (classification
    evidence, the provider's raw payload), where the tracker's own setting would have
    caught them too."""
    if row[IP]:
        row[IP] = anonymize_ip(row[IP])
    for column in (USER_AGENT, REASON):
        if row[column]:
            row[column] = anonymize_text(row[column])
    if row[METADATA]:
        row[METADATA] = json_text(scrub_ips(json.loads(row[METADATA])))


def anonymized_details(
    ip: str | None, user_agent: str | None, reason: str | None, metadata: Any
) -> tuple[Any, ...]:
    """The same for a stored (parked) event's columns, as they are written back."""
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    return (
        anonymize_ip(ip) if ip else ip,
        anonymize_text(user_agent) if user_agent else user_agent,
        anonymize_text(reason) if reason else reason,
        scrub_ips(metadata) if metadata else metadata,
    )


__all__ = ["NOBODY", "Anonymized", "anonymize_ip", "anonymize_row", "anonymized_details"]
