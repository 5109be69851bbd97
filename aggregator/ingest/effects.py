"""What a set of events does to messages and counters: pure functions, no database.

Ingest resolves each new event to its message, then asks :func:`plan` what to write:
the earliest time per message for every first-seen column (its empty-to-set transition
decides the unique counters), per-message open and click counts, and the deltas that
never depend on stored state (total opens and clicks, links, open buckets).

The database answers which first-seen columns were still empty: one conditional UPDATE
per batch fills them and returns a :class:`Seen` bit mask per message, computed in the
same statement from the row as it was before; :func:`count_transitions` turns those
masks into unique-counter deltas.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntFlag
from typing import Any, NamedTuple

from aggregator.store.domains import rows_of
from aggregator.store.keys import CLIENT, DEVICE, MACHINE, UNKNOWN_MACHINE, hour_of, url_hash
from aggregator.store.models import DOMAIN_COUNTERS
from aggregator.store.readers import OTHER, UNKNOWN_DEVICE, Reader
from mailbeacon.contract.events import EventType
from mailbeacon.contract.signing import HONEYPOT_URL


class Seen(IntFlag):
    """The first-seen columns an UPDATE filled (bits of ``messages.newly_seen``)."""

    DELIVERED = 1
    DEFERRED = 2
    BOUNCED = 4
    HARD_BOUNCE = 8  # the message's bounce became hard (first bounce hard, or soft then hard)
    COMPLAINED = 16
    UNSUBSCRIBED = 32
    OPENED = 64
    HUMAN_OPENED = 128
    CLICKED = 256
    HUMAN_CLICKED = 512
    READER = 1024  # the client and device of the copy's first person's open were set or replaced


# First-seen column of ``messages`` -> its bit and the counter that counts messages having it.
FIRST_SEEN: dict[str, tuple[Seen, str]] = {
    "delivered_at": (Seen.DELIVERED, "delivered_count"),
    "deferred_at": (Seen.DEFERRED, "deferred_count"),
    "complained_at": (Seen.COMPLAINED, "complained_count"),
    "unsubscribed_at": (Seen.UNSUBSCRIBED, "unsubscribed_count"),
    "first_opened_at": (Seen.OPENED, "unique_opens"),
    "first_human_opened_at": (Seen.HUMAN_OPENED, "human_unique_opens"),
    "first_clicked_at": (Seen.CLICKED, "unique_clicks"),
    "first_human_clicked_at": (Seen.HUMAN_CLICKED, "human_unique_clicks"),
}
_ONCE_PER_MESSAGE = {
    EventType.DELIVERED: "delivered_at",
    EventType.DEFERRED: "deferred_at",
    EventType.COMPLAINED: "complained_at",
    EventType.UNSUBSCRIBED: "unsubscribed_at",
}


def counts_as_link(url: str | None) -> bool:
    """Clicks on the honeypot count as (machine) clicks but the pseudo-URL is not a link."""
    return bool(url) and url != HONEYPOT_URL


class Applied(NamedTuple):
    """An event being applied to its (resolved) message in this transaction."""

    type: EventType
    tracking_id: str
    campaign: str
    occurred_at: datetime
    machine: bool = False
    bounce_kind: str | None = None
    url: str | None = None
    machine_kind: str | None = None
    reader: Reader | None = None  # a person's open: its client and device (aggregator.store.readers)


UNKNOWN_READER = Reader(OTHER, UNKNOWN_DEVICE)


def _counter_map() -> defaultdict[str, int]:
    return defaultdict(int)


@dataclass
class Plan:
    campaign_of: dict[str, str] = field(default_factory=dict)
    first_seen: dict[str, dict[str, datetime]] = field(default_factory=lambda: defaultdict(dict))
    # tracking id -> (earliest bounce, "hard" when any bounce of the batch was hard)
    bounces: dict[str, tuple[datetime, str]] = field(default_factory=dict)
    engagement: dict[str, list[int]] = field(default_factory=dict)  # tracking id -> [opens, clicks]
    counters: dict[str, defaultdict[str, int]] = field(default_factory=lambda: defaultdict(_counter_map))
    link_urls: dict[str, str] = field(default_factory=dict)  # url hash -> url
    message_links: set[tuple[str, str]] = field(default_factory=set)  # (tracking id, url hash)
    link_clicks: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    # (campaign, hour) -> [opens, human opens, clicks, human clicks]
    buckets: dict[tuple[str, datetime], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0, 0, 0])
    )
    by_type: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    # tracking id -> its batch's first person's open: (time, client and device)
    readers: dict[str, tuple[datetime, Reader]] = field(default_factory=dict)
    # (campaign, facet, name) -> [unique opens, opens, clicks] deltas
    facets: dict[tuple[str, str, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0, 0])
    )
    # (campaign, provider or domain) -> deltas of DOMAIN_COUNTERS (sent is counted at creation)
    domains: dict[tuple[str, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0] * len(DOMAIN_COUNTERS))
    )


_VALUE = {t: t.value for t in EventType}
_OPENED, _CLICKED, _BOUNCED = EventType.OPENED, EventType.CLICKED, EventType.BOUNCED


def _earliest(seen: dict[str, datetime], tracking_id: str, moment: datetime) -> None:
    earlier = seen.get(tracking_id)
    if earlier is None or moment < earlier:
        seen[tracking_id] = moment


def plan(events: Iterable[Applied], into: Plan | None = None) -> Plan:
    """What ``events`` do; added to ``into`` when given (every part of a plan sums, takes the
    earliest, collects a set or maps a key to the same value every time, so planning in
    parts gives the same plan as planning at once)."""
    # A hot loop (once per applied event): names are bound locally on purpose.
    p = Plan() if into is None else into
    campaign_of, by_type, engagement, first_seen = p.campaign_of, p.by_type, p.engagement, p.first_seen
    opened, human_opened = first_seen["first_opened_at"], first_seen["first_human_opened_at"]
    clicked, human_clicked = first_seen["first_clicked_at"], first_seen["first_human_clicked_at"]
    readers, facets = p.readers, p.facets
    for e in events:
        tid, moment, campaign, kind = e.tracking_id, e.occurred_at, e.campaign, e.type
        campaign_of[tid] = campaign
        by_type[(campaign, _VALUE[kind])] += 1
        if kind is _OPENED:
            counters = p.counters[campaign]
            counters["total_opens"] += 1
            counts = engagement.get(tid)
            if counts is None:
                engagement[tid] = [1, 0]
            else:
                counts[0] += 1
            _earliest(opened, tid, moment)
            bucket = p.buckets[(campaign, hour_of(moment))]
            bucket[0] += 1
            if not e.machine:
                counters["human_total_opens"] += 1
                _earliest(human_opened, tid, moment)
                bucket[1] += 1
                reader = e.reader or UNKNOWN_READER
                facets[(campaign, CLIENT, reader[0])][1] += 1
                first = readers.get(tid)
                if first is None or moment < first[0] or (moment == first[0] and reader < first[1]):
                    readers[tid] = (moment, reader)
            else:
                facets[(campaign, MACHINE, e.machine_kind or UNKNOWN_MACHINE)][1] += 1
        elif kind is _CLICKED:
            counters = p.counters[campaign]
            counters["total_clicks"] += 1
            counts = engagement.get(tid)
            if counts is None:
                engagement[tid] = [0, 1]
            else:
                counts[1] += 1
            _earliest(clicked, tid, moment)
            bucket = p.buckets[(campaign, hour_of(moment))]
            bucket[2] += 1
            if not e.machine:
                counters["human_total_clicks"] += 1
                _earliest(human_clicked, tid, moment)
                bucket[3] += 1
            else:
                facets[(campaign, MACHINE, e.machine_kind or UNKNOWN_MACHINE)][2] += 1
            if e.url is not None and counts_as_link(e.url):
                digest = url_hash(e.url)
                p.link_urls[digest] = e.url
                p.message_links.add((tid, digest))
                p.link_clicks[(campaign, digest)] += 1
        elif kind is _BOUNCED:
            bounce = e.bounce_kind or "hard"
            earlier = p.bounces.get(tid)
            if earlier is None:
                p.bounces[tid] = (moment, bounce)
            else:
                p.bounces[tid] = (
                    min(earlier[0], moment),
                    "hard" if "hard" in (bounce, earlier[1]) else "soft",
                )
        elif kind in _ONCE_PER_MESSAGE:
            _earliest(first_seen[_ONCE_PER_MESSAGE[kind]], tid, moment)
    return p


MessageChange = tuple[Any, ...]
CHANGE_COLUMNS: tuple[str, ...] = (
    *FIRST_SEEN,
    "bounced_at",
    "bounce_kind",
    "opens",
    "clicks",
    "client",
    "device",
)


def message_changes(p: Plan, time_value: Callable[[datetime], Any] | None = None) -> list[MessageChange]:
    """One row per touched message, sorted: ``tracking_id`` then the values of CHANGE_COLUMNS.

    ``time_value`` turns the times into what the database driver takes (SQLite: text).
    """
    columns = [p.first_seen[column] for column in FIRST_SEEN]
    rows = []
    for tid in sorted(p.campaign_of):
        bounce = p.bounces.get(tid)
        opens, clicks = p.engagement.get(tid, (0, 0))
        times = [seen.get(tid) for seen in columns]
        times.append(bounce[0] if bounce else None)
        if time_value is not None:
            times = [None if t is None else time_value(t) for t in times]
        first = p.readers.get(tid)
        rows.append(
            (
                tid,
                *times,
                bounce[1] if bounce else None,
                opens,
                clicks,
                first[1].client if first else None,
                first[1].device if first else None,
            )
        )
    return rows


# What the messages UPDATE returns for a message (aggregator.ingest.tally), in this order: its tracking
# id, ``newly_seen`` (Seen bits), its domain, and the client and device of its first person's
# open after the update and before it. Plain rows, unpacked where they are counted.
TRANSITION_COLUMNS = (
    "tracking_id",
    "newly_seen",
    "domain",
    "human_client",
    "human_device",
    "replaced_client",
    "replaced_device",
)
Transition = Sequence[Any]


_TRANSITIONS = [(int(bit), counter) for bit, counter in FIRST_SEEN.values()]
_BOUNCED_BIT, _HARD_BIT, _READER_BIT = int(Seen.BOUNCED), int(Seen.HARD_BOUNCE), int(Seen.READER)
# Seen bit -> position in DOMAIN_COUNTERS.
_DOMAIN_BITS = [
    (int(bit), DOMAIN_COUNTERS.index(name))
    for bit, name in (
        (Seen.DELIVERED, "delivered"),
        (Seen.BOUNCED, "bounced"),
        (Seen.COMPLAINED, "complained"),
        (Seen.OPENED, "unique_opens"),
        (Seen.HUMAN_OPENED, "human_unique_opens"),
    )
]
_DOMAIN_MASK = sum(bit for bit, _ in _DOMAIN_BITS)


def count_transitions(p: Plan, transitions: Iterable[Transition]) -> None:
    """Counter, breakdown and domain deltas from the rows the messages UPDATE returned
    (:data:`TRANSITION_COLUMNS`; the mask holds :class:`Seen` bits)."""
    facets = p.facets
    for tid, mask, domain, client, device, old_client, old_device in transitions:
        campaign = p.campaign_of[tid]
        counters = p.counters[campaign]
        for bit, counter in _TRANSITIONS:
            if mask & bit:
                counters[counter] += 1
        if mask & _BOUNCED_BIT:
            counters["bounced_count"] += 1
            counters["hard_bounced_count" if mask & _HARD_BIT else "soft_bounced_count"] += 1
        elif mask & _HARD_BIT:  # bounced softly before, hard now
            counters["soft_bounced_count"] -= 1
            counters["hard_bounced_count"] += 1
        if mask & _DOMAIN_MASK:
            for row in rows_of(domain or ""):
                deltas = p.domains[(campaign, row)]
                for bit, i in _DOMAIN_BITS:
                    if mask & bit:
                        deltas[i] += 1
        if mask & _READER_BIT and (client != old_client or device != old_device):
            if old_client is not None:
                facets[(campaign, CLIENT, old_client)][0] -= 1
                facets[(campaign, DEVICE, old_device or UNKNOWN_DEVICE)][0] -= 1
            facets[(campaign, CLIENT, client or OTHER)][0] += 1
            facets[(campaign, DEVICE, device or UNKNOWN_DEVICE)][0] += 1
