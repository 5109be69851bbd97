"""Which copy an address-only event may belong to: the time rule, as plain functions.

A provider webhook that names only the recipient's address (no tracking id) belongs to the
latest copy relayed to that address by the time of the event. That time is the one the
event states, but never later than its arrival: when JetStream stored it, a time no
publisher can set. A copy relayed up to :data:`CLOCK_SKEW` after that time still
qualifies (the provider's clock and the proxy's disagree a little), but only when no copy
was relayed by the time itself. A copy relayed later never takes the event: it waits
(parked) and expires, so a list of addresses cannot be poisoned in advance of the mail.

See docs/architecture.md, "Out of order", and docs/aggregator.md, "Parked events".
"""

from __future__ import annotations

from datetime import datetime, timedelta

CLOCK_SKEW = timedelta(minutes=5)


def event_time(occurred_at: datetime, arrived_at: datetime) -> datetime:
    """The time an address-only event is attributed by: as stated, at the latest its arrival."""
    return min(occurred_at, arrived_at)


def latest_relay(moment: datetime) -> datetime:
    """The latest relay time of a copy an event of that (attributed) time may belong to."""
    return moment + CLOCK_SKEW
