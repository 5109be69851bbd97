"""The keys the store counts under: a link by the hash of its URL, opens by their hour, the
breakdowns by facet, a copy's first reader.

Ingest writes counters under them, retention keeps pruned events' counts under them and the
read side finds them under them again, so all three take them from here.
"""

from __future__ import annotations

import hashlib
from datetime import datetime


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def hour_of(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


UNKNOWN_MACHINE = "unknown"  # a machine event without machine_kind
# Facets of ``campaign_breakdowns``.
CLIENT, DEVICE, MACHINE = "client", "device", "machine"
# A copy's first person's open: (time, client, device); of two at the same time the one that
# sorts first (code point order, as recounts and the database compare them).
FirstReader = tuple[datetime, str, str]
