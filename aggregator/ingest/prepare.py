"""A batch of events made ready for its transaction, without the database.

Everything about a batch that does not depend on stored state is worked out here, before
the transaction starts: repeats dropped, events in event-id order (the order rows are
locked in), the ``events`` rows with every value already in the form the driver takes
(times as SQLite's text, metadata as JSON text), the messages its ``sent``/``failed``
events may create, and which messages and addresses its other events name.

The consumer prepares a batch while the previous one is still in the database, so on
SQLite, whose single writer serializes transactions, this work no longer adds to the
time the write lock is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from typing import Any

from aggregator.ingest.decode import EventFields
from aggregator.store.attribution import event_time
from aggregator.store.bulk import json_text
from aggregator.store.domains import domain_of
from aggregator.store.readers import Reader, reader_of
from aggregator.store.times import sqlite_time
from mailbeacon.contract.events import EventType, utcnow

UNKNOWN_CAMPAIGN = "default/unknown"
_SLICE = 256

# Positions in an events row (the column order of ingest's _EVENT_COLUMNS).
TRACKING_ID, CAMPAIGN, IP, BOUNCE_KIND, APPLIED = 2, 3, 7, 10, 16

_SENT, _FAILED, _BOUNCED, _OPENED = EventType.SENT, EventType.FAILED, EventType.BOUNCED, EventType.OPENED
_VALUE = {t: t.value for t in EventType}  # plain str: drivers bind it without adapting
_by_event_id = attrgetter("event_id")


@dataclass
class Prepared:
    events: list[EventFields]  # the first of each event id, sorted by event id
    repeats: int  # events dropped as repeats within the batch
    rows: list[list[Any]]  # one driver-ready ``events`` row per event, same order
    # A person's open: the client and device of its user agent (aggregator.store.readers); else None
    readers: list[Reader | None]
    creators: dict[str, EventFields]  # tracking id -> the first sent/failed event naming it
    message_rows: list[tuple[Any, ...]]  # the messages those events would create, by tracking id
    domains: dict[str, str]  # tracking id -> the recipient domain of the message it would create
    tracking_ids: list[str]  # messages named by the other events
    addresses: list[tuple[str, datetime]]  # (recipient, attributed time) of address-only events
    address_of: dict[str, tuple[str, datetime]]  # event id -> its entry in ``addresses``
    received_at: datetime
    # Ids among ``events`` already stored, when looked up before the transaction (PostgreSQL).
    stored: set[str] | None = None


def prepare(
    events: Sequence[EventFields], postgres: bool, arrivals: Mapping[str, datetime] | None = None
) -> Prepared:
    """The batch ready for :func:`aggregator.ingest.ingest.apply_prepared` on the given database.

    ``arrivals``: when the stream stored each address-only event (by event id); an event
    missing there arrived now, as far as this aggregator knows.
    """
    steps = _preparing(events, postgres, arrivals)
    while (batch := _next_step(steps)) is None:
        pass
    return batch


async def prepare_yielding(
    events: Sequence[EventFields], postgres: bool, arrivals: Mapping[str, datetime] | None = None
) -> Prepared:
    """:func:`prepare`, letting other tasks run every few hundred events (the consumer
    prepares a batch while the previous one's transaction waits for this loop)."""
    steps = _preparing(events, postgres, arrivals)
    while True:
        batch = _next_step(steps)
        if batch is not None:
            return batch
        await asyncio.sleep(0)


def _next_step(steps: Generator[None, None, Prepared]) -> Prepared | None:
    """Run ``steps`` to its next pause; the prepared batch once it has finished."""
    try:
        next(steps)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    return None


def _preparing(
    events: Sequence[EventFields], postgres: bool, arrivals: Mapping[str, datetime] | None
) -> Generator[None, None, Prepared]:
    """The work of :func:`prepare`, pausing (yielding) every ``_SLICE`` rows."""
    unique: dict[str, EventFields] = {}
    creators: dict[str, EventFields] = {}
    repeats = 0
    for e in events:
        if e.event_id in unique:
            repeats += 1
            continue
        unique[e.event_id] = e
        # The first sent/failed in arrival order creates the message.
        if (e.type is _SENT or e.type is _FAILED) and e.tracking_id is not None:
            creators.setdefault(e.tracking_id, e)
    batch = sorted(unique.values(), key=_by_event_id)
    now = utcnow()
    received: Any = now if postgres else sqlite_time(now)
    rows: list[list[Any]] = []
    readers: list[Reader | None] = []
    tracking_ids: set[str] = set()
    address_of: dict[str, tuple[str, datetime]] = {}
    value = _VALUE
    for n, e in enumerate(batch, 1):
        if n % _SLICE == 0:
            yield
        kind = e.type
        row_received = received
        if kind is not _SENT and kind is not _FAILED:
            if e.tracking_id:
                tracking_ids.add(e.tracking_id)
            elif e.recipient:
                # Attributed by its time, at the latest its arrival (see aggregator.store.attribution);
                # the arrival is stored as its received_at, for when it is claimed parked.
                arrived = min(arrivals.get(e.event_id, now), now) if arrivals else now
                address_of[e.event_id] = (e.recipient, event_time(e.occurred_at, arrived))
                row_received = arrived if postgres else sqlite_time(arrived)
        metadata = e.metadata
        # Parsed here, outside the transaction; cached per distinct user agent.
        readers.append(reader_of(e.user_agent) if kind is _OPENED and not e.machine else None)
        rows.append(
            [
                e.event_id,
                value[kind],
                e.tracking_id,
                e.campaign,
                e.recipient,
                e.occurred_at if postgres else sqlite_time(e.occurred_at),
                row_received,
                e.ip,
                e.user_agent,
                e.url,
                (e.bounce_kind or "hard") if kind is _BOUNCED else None,
                e.reason,
                e.machine,
                e.machine_kind,
                e.source,
                json_text(metadata) if metadata else None,
                False,
            ]
        )
    message_rows = []
    domains = {}
    for tid in sorted(creators):
        e = creators[tid]
        sent_at = e.occurred_at if postgres else sqlite_time(e.occurred_at)
        message_id = str(e.metadata.get("message_id") or "")[:998] or None
        domains[tid] = domain = domain_of(e.recipient)
        message_rows.append(
            (
                tid,
                e.campaign or UNKNOWN_CAMPAIGN,
                e.recipient or "",
                message_id,
                value[e.type],
                sent_at,
                domain,
            )
        )
    return Prepared(
        batch,
        repeats,
        rows,
        readers,
        creators,
        message_rows,
        domains,
        sorted(tracking_ids),
        sorted(set(address_of.values())),
        address_of,
        now,
    )
