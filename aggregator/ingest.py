"""Applying events to stored state, exactly once.

A batch is one transaction. An event counts only if its ``event_id`` row is new
(``INSERT ... ON CONFLICT DO NOTHING``); each "first time" (first open, first bounce...)
is a conditional ``UPDATE ... WHERE x IS NULL`` whose row count says whether this
transaction made it. Counters move by atomic upserts (``col = col + delta``), so
several aggregator replicas on one database never lose or double an increment.

An event whose message is not known yet (an open before its ``sent``, an address-only
webhook for an unknown recipient) is stored *parked* (``applied = false``) and applied
when the message appears, or by :func:`adopt_parked` which each replica runs now and
then to settle events parked by one replica while another was creating the message.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator.db import Database
from aggregator.models import (
    CampaignRecipient,
    CampaignRow,
    CampaignStats,
    EventRow,
    LinkStats,
    MessageLink,
    MessageRow,
    OpenBucket,
)
from mailbeacon.events import Event, EventType, utcnow

EVENTS = EventRow.__table__  # type: ignore[attr-defined]
MESSAGES = MessageRow.__table__  # type: ignore[attr-defined]
STATS = CampaignStats.__table__  # type: ignore[attr-defined]
CAMPAIGNS = CampaignRow.__table__  # type: ignore[attr-defined]
RECIPIENTS = CampaignRecipient.__table__  # type: ignore[attr-defined]
LINKS = LinkStats.__table__  # type: ignore[attr-defined]
MESSAGE_LINKS = MessageLink.__table__  # type: ignore[attr-defined]
BUCKETS = OpenBucket.__table__  # type: ignore[attr-defined]

# First-seen column and counter for the events that count once per message.
_FIRST_SEEN = {
    EventType.DELIVERED: ("delivered_at", "delivered_count"),
    EventType.DEFERRED: ("deferred_at", "deferred_count"),
    EventType.COMPLAINED: ("complained_at", "complained_count"),
    EventType.UNSUBSCRIBED: ("unsubscribed_at", "unsubscribed_count"),
}


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def hour_of(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    parked: int = 0
    by_type: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))


class _Batch:
    """The work of one transaction; counter changes are summed and written once at the end."""

    def __init__(self, conn: AsyncConnection, insert: Any) -> None:
        self.conn = conn
        self.insert = insert
        self.counters: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.links: dict[tuple[str, str], list[Any]] = {}
        self.buckets: dict[tuple[str, datetime], list[int]] = defaultdict(lambda: [0, 0])
        self.new_campaigns: set[str] = set()
        self.result = BatchResult()

    async def _changed(self, statement: Any) -> bool:
        return bool((await self.conn.execute(statement)).rowcount)

    async def _first(self, tracking_id: str, column: str, moment: datetime, **also: Any) -> bool:
        col = MESSAGES.c[column]
        statement = (
            update(MESSAGES)
            .where(and_(MESSAGES.c.tracking_id == tracking_id, col.is_(None)))
            .values({column: moment, **also})
        )
        return await self._changed(statement)

    async def ingest(self, event: Event) -> None:
        row = {
            "event_id": event.event_id,
            "type": event.type.value,
            "tracking_id": event.tracking_id,
            "campaign": event.campaign,
            "recipient": event.recipient,
            "occurred_at": event.occurred_at,
            "received_at": utcnow(),
            "ip": event.ip,
            "user_agent": event.user_agent,
            "url": event.url,
            "bounce_kind": (event.bounce_kind or "hard") if event.type is EventType.BOUNCED else None,
            "reason": event.reason,
            "machine": event.machine,
            "machine_kind": event.machine_kind,
            "source": event.source,
            "metadata": event.metadata or None,
            "applied": False,
        }
        inserted = await self.conn.execute(
            self.insert(EVENTS).values(row).on_conflict_do_nothing(index_elements=["event_id"])
        )
        if not inserted.rowcount:
            self.result.duplicates += 1
            return
        if event.type in (EventType.SENT, EventType.FAILED):
            if event.tracking_id is None:
                return  # kept for the record; a copy without an id cannot be counted
            await self._record_message(event)
            return
        if not await self._apply_to_message(event.event_id, event):
            self.result.parked += 1

    async def _record_message(self, event: Event) -> None:
        campaign = event.campaign or "default/unknown"
        sent = event.type is EventType.SENT
        created = await self._changed(
            self.insert(MESSAGES)
            .values(
                tracking_id=event.tracking_id,
                campaign=campaign,
                recipient=event.recipient or "",
                message_id=str(event.metadata.get("message_id") or "")[:998] or None,
                status=event.type.value,
                sent_at=event.occurred_at,
            )
            .on_conflict_do_nothing(index_elements=["tracking_id"])
        )
        await self.conn.execute(
            update(EVENTS).where(EVENTS.c.event_id == event.event_id).values(applied=True, campaign=campaign)
        )
        if not created:
            return
        self.new_campaigns.add(campaign)
        self.counters[campaign]["sent_count" if sent else "failed_count"] += 1
        self.result.by_type[(campaign, event.type.value)] += 1
        self.result.applied += 1
        if event.recipient and await self._changed(
            self.insert(RECIPIENTS)
            .values(campaign=campaign, recipient=event.recipient)
            .on_conflict_do_nothing(index_elements=["campaign", "recipient"])
        ):
            self.counters[campaign]["total_recipients"] += 1
        await self.adopt_for(event.tracking_id, event.recipient)

    async def adopt_for(self, tracking_id: str | None, recipient: str | None) -> None:
        """Apply parked events that were waiting for this message (by id, or by address)."""
        conditions = [EVENTS.c.tracking_id == tracking_id]
        if recipient:
            conditions.append(and_(EVENTS.c.tracking_id.is_(None), EVENTS.c.recipient == recipient))
        parked = await self.conn.execute(
            select(EVENTS).where(and_(EVENTS.c.applied.is_(False), or_(*conditions))).order_by(EVENTS.c.id)
        )
        for parked_row in parked.mappings().all():
            event = _event_from_row(parked_row)
            await self._apply_to_message(parked_row["event_id"], event)

    async def _resolve(self, event: Event) -> tuple[str, str] | None:
        if event.tracking_id is not None:
            found = await self.conn.execute(
                select(MESSAGES.c.tracking_id, MESSAGES.c.campaign).where(
                    MESSAGES.c.tracking_id == event.tracking_id
                )
            )
        elif event.recipient:
            found = await self.conn.execute(
                select(MESSAGES.c.tracking_id, MESSAGES.c.campaign)
                .where(MESSAGES.c.recipient == event.recipient)
                .order_by(MESSAGES.c.sent_at.desc())
                .limit(1)
            )
        else:
            return None
        row = found.first()
        return (row[0], row[1]) if row else None

    async def _apply_to_message(self, event_id: str, event: Event) -> bool:
        """Apply a stored, not yet applied event; False when its message is still unknown."""
        target = await self._resolve(event)
        if target is None:
            return False
        tracking_id, campaign = target
        claimed = await self._changed(
            update(EVENTS)
            .where(and_(EVENTS.c.event_id == event_id, EVENTS.c.applied.is_(False)))
            .values(applied=True, tracking_id=tracking_id, campaign=campaign)
        )
        if not claimed:  # another transaction applied it first
            return True
        counters = self.counters[campaign]
        self.result.applied += 1
        self.result.by_type[(campaign, event.type.value)] += 1
        moment = event.occurred_at
        if event.type in _FIRST_SEEN:
            column, counter = _FIRST_SEEN[event.type]
            if await self._first(tracking_id, column, moment):
                counters[counter] += 1
        elif event.type is EventType.BOUNCED:
            kind = event.bounce_kind or "hard"
            if await self._first(tracking_id, "bounced_at", moment, bounce_kind=kind):
                counters["bounced_count"] += 1
                counters[f"{kind}_bounced_count"] += 1
            elif kind == "hard" and await self._changed(
                update(MESSAGES)
                .where(and_(MESSAGES.c.tracking_id == tracking_id, MESSAGES.c.bounce_kind == "soft"))
                .values(bounce_kind="hard")
            ):
                # A later hard bounce settles a message that had only bounced softly.
                counters["soft_bounced_count"] -= 1
                counters["hard_bounced_count"] += 1
        elif event.type is EventType.OPENED:
            await self._engagement(tracking_id, counters, event, "open", "opened", moment)
            bucket = self.buckets[(campaign, hour_of(moment))]
            bucket[0] += 1
            bucket[1] += 0 if event.machine else 1
        elif event.type is EventType.CLICKED:
            await self._engagement(tracking_id, counters, event, "click", "clicked", moment)
            if event.url:
                digest = url_hash(event.url)
                link = self.links.setdefault((campaign, digest), [event.url, 0, 0])
                link[1] += 1
                if await self._changed(
                    self.insert(MESSAGE_LINKS)
                    .values(tracking_id=tracking_id, url_hash=digest)
                    .on_conflict_do_nothing(index_elements=["tracking_id", "url_hash"])
                ):
                    link[2] += 1
        return True

    async def _engagement(
        self, tracking_id: str, counters: dict[str, int], event: Event, noun: str, verb: str, moment: datetime
    ) -> None:
        counters[f"total_{noun}s"] += 1
        await self.conn.execute(
            update(MESSAGES)
            .where(MESSAGES.c.tracking_id == tracking_id)
            .values({f"{noun}_count": MESSAGES.c[f"{noun}_count"] + 1})
        )
        if await self._first(tracking_id, f"first_{verb}_at", moment):
            counters[f"unique_{noun}s"] += 1
        if not event.machine:
            counters[f"human_total_{noun}s"] += 1
            if await self._first(tracking_id, f"first_human_{verb}_at", moment):
                counters[f"human_unique_{noun}s"] += 1

    async def flush(self) -> None:
        """Write the summed counter changes, campaign rows first and in a fixed order (no deadlocks)."""
        now = utcnow()
        for campaign in sorted(self.new_campaigns):
            namespace, _, name = campaign.partition("/")
            await self.conn.execute(
                self.insert(CAMPAIGNS)
                .values(key=campaign, namespace=namespace, name=name, first_seen_at=now)
                .on_conflict_do_nothing(index_elements=["key"])
            )
        for campaign in sorted(self.counters):
            deltas = {col: n for col, n in self.counters[campaign].items() if n}
            statement = self.insert(STATS).values(campaign=campaign, updated_at=now, **deltas)
            await self.conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["campaign"],
                    set_={
                        "updated_at": now,
                        **{col: STATS.c[col] + statement.excluded[col] for col in deltas},
                    },
                )
            )
        for (campaign, digest), (url, total, unique) in sorted(self.links.items()):
            statement = self.insert(LINKS).values(
                campaign=campaign, url_hash=digest, url=url, total_clicks=total, unique_clicks=unique
            )
            await self.conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["campaign", "url_hash"],
                    set_={
                        "total_clicks": LINKS.c.total_clicks + total,
                        "unique_clicks": LINKS.c.unique_clicks + unique,
                    },
                )
            )
        for (campaign, hour), (opens, human) in sorted(self.buckets.items()):
            statement = self.insert(BUCKETS).values(
                campaign=campaign, hour=hour, opens=opens, human_opens=human
            )
            await self.conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["campaign", "hour"],
                    set_={"opens": BUCKETS.c.opens + opens, "human_opens": BUCKETS.c.human_opens + human},
                )
            )


def _event_from_row(row: Any) -> Event:
    return Event(
        event_id=row["event_id"],
        type=row["type"],
        tracking_id=row["tracking_id"],
        campaign=row["campaign"],
        recipient=row["recipient"],
        occurred_at=row["occurred_at"],
        ip=row["ip"],
        user_agent=row["user_agent"],
        url=row["url"],
        bounce_kind=row["bounce_kind"],
        reason=row["reason"],
        machine=bool(row["machine"]),
        machine_kind=row["machine_kind"],
        source=row["source"],
        metadata=row["metadata"] or {},
    )


async def apply_batch(db: Database, events: list[Event]) -> BatchResult:
    async with db.engine.begin() as conn:
        batch = _Batch(conn, db.insert)
        for event in events:
            await batch.ingest(event)
        await batch.flush()
    return batch.result


async def count_parked(db: Database) -> int:
    from sqlalchemy import func

    async with db.read_engine.connect() as conn:
        value = await conn.scalar(select(func.count()).select_from(EVENTS).where(EVENTS.c.applied.is_(False)))
    return int(value or 0)


async def adopt_parked(db: Database, limit: int = 1000) -> BatchResult:
    """Apply parked events whose message has meanwhile been stored (by any replica)."""
    async with db.engine.begin() as conn:
        batch = _Batch(conn, db.insert)
        # Only parked events whose message now exists: orphans never crowd out the rest.
        known_id = exists().where(MESSAGES.c.tracking_id == EVENTS.c.tracking_id)
        known_address = and_(
            EVENTS.c.tracking_id.is_(None), exists().where(MESSAGES.c.recipient == EVENTS.c.recipient)
        )
        parked = await conn.execute(
            select(EVENTS)
            .where(
                and_(
                    EVENTS.c.applied.is_(False),
                    EVENTS.c.type.not_in([EventType.SENT.value, EventType.FAILED.value]),
                    or_(known_id, known_address),
                )
            )
            .order_by(EVENTS.c.id)
            .limit(limit)
        )
        for row in parked.mappings().all():
            await batch._apply_to_message(row["event_id"], _event_from_row(row))
        await batch.flush()
    return batch.result
