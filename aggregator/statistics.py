"""Campaign statistics: the pure math, the O(1) read, and the recount from stored events."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, delete, distinct, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator.db import Database
from aggregator.ingest import BUCKETS, CAMPAIGNS, EVENTS, LINKS, STATS, hour_of, url_hash
from aggregator.models import COUNTER_COLUMNS
from mailbeacon.events import EventType, utcnow

TOP_LINKS = 10
RECENT_EVENTS = 20


def rate(numerator: int, denominator: int) -> float:
    """A percentage with two decimals; 0.00 when there is nothing to divide by."""
    if denominator <= 0:
        return 0.0
    return round(numerator * 100.0 / denominator, 2)


def with_rates(counters: Mapping[str, int]) -> dict[str, Any]:
    c = {name: int(counters.get(name, 0)) for name in COUNTER_COLUMNS}
    return {
        **c,
        "delivery_rate": rate(c["delivered_count"], c["sent_count"]),
        "open_rate": rate(c["unique_opens"], c["delivered_count"]),
        "click_rate": rate(c["unique_clicks"], c["delivered_count"]),
        "human_open_rate": rate(c["human_unique_opens"], c["delivered_count"]),
        "human_click_rate": rate(c["human_unique_clicks"], c["delivered_count"]),
        "bounce_rate": rate(c["bounced_count"], c["sent_count"]),
        "complaint_rate": rate(c["complained_count"], c["delivered_count"]),
    }


def opens_series(buckets: list[tuple[datetime, int, int]], hourly: bool) -> list[dict[str, Any]]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for hour, opens, human in buckets:
        label = hour.strftime("%Y-%m-%dT%H:00:00Z") if hourly else hour.strftime("%Y-%m-%d")
        totals[label][0] += opens
        totals[label][1] += human
    key = "hour" if hourly else "date"
    return [{key: label, "opens": v[0], "human_opens": v[1]} for label, v in sorted(totals.items())]


def _iso(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if moment else None


def describe_event(row: Mapping[str, Any]) -> str:
    kind = row["type"]
    if kind == EventType.CLICKED.value:
        return str(row["url"] or "")
    if kind == EventType.BOUNCED.value:
        return f"{row['bounce_kind'] or ''} {row['reason'] or ''}".strip()
    if kind in (EventType.OPENED.value,) and row["machine"]:
        return f"machine: {row['machine_kind'] or 'automated'}"
    return str(row["reason"] or "")


def event_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "event_id": row["event_id"],
        "type": row["type"],
        "occurred_at": _iso(row["occurred_at"]),
        "tracking_id": row["tracking_id"],
        "recipient": row["recipient"],
        "detail": describe_event(row),
        "machine": bool(row["machine"]),
        "machine_kind": row["machine_kind"],
        "source": row["source"],
    }


async def campaign_exists(db: Database, campaign: str) -> bool:
    async with db.read_engine.connect() as conn:
        found = await conn.scalar(select(CAMPAIGNS.c.key).where(CAMPAIGNS.c.key == campaign))
        if found is None:
            found = await conn.scalar(select(STATS.c.campaign).where(STATS.c.campaign == campaign))
    return found is not None


async def _read(conn: AsyncConnection, campaign: str, hourly: bool) -> dict[str, Any]:
    row = (await conn.execute(select(STATS).where(STATS.c.campaign == campaign))).mappings().first()
    counters = dict(row) if row else {}
    links = await conn.execute(
        select(LINKS.c.url, LINKS.c.total_clicks, LINKS.c.unique_clicks)
        .where(LINKS.c.campaign == campaign)
        .order_by(LINKS.c.total_clicks.desc(), LINKS.c.unique_clicks.desc(), LINKS.c.url)
        .limit(TOP_LINKS)
    )
    buckets = await conn.execute(
        select(BUCKETS.c.hour, BUCKETS.c.opens, BUCKETS.c.human_opens).where(BUCKETS.c.campaign == campaign)
    )
    recent = await conn.execute(
        select(EVENTS)
        .where(and_(EVENTS.c.campaign == campaign, EVENTS.c.applied.is_(True)))
        .order_by(EVENTS.c.occurred_at.desc(), EVENTS.c.id.desc())
        .limit(RECENT_EVENTS)
    )
    return {
        "campaign": campaign,
        **with_rates(counters),
        "top_links": [{"url": u, "total_clicks": t, "unique_clicks": q} for u, t, q in links.all()],
        "opens_over_time": opens_series([(h, o, m) for h, o, m in buckets.all()], hourly),
        "recent_events": [event_summary(dict(r)) for r in recent.mappings().all()],
        "updated_at": _iso(counters.get("updated_at")),
    }


async def read_statistics(db: Database, campaign: str, hourly: bool = False) -> dict[str, Any]:
    async with db.read_engine.connect() as conn:
        return await _read(conn, campaign, hourly)


async def recount(conn: AsyncConnection, campaign: str) -> dict[str, int]:
    """Every counter recomputed from the stored events of the campaign (the definition, literally)."""
    e = EVENTS.c
    applied = and_(e.campaign == campaign, e.applied.is_(True))

    def distinct_messages(kind: EventType, *extra: Any) -> Any:
        return func.count(distinct(case((and_(e.type == kind.value, *extra), e.tracking_id))))

    def count(kind: EventType, *extra: Any) -> Any:
        return func.count(case((and_(e.type == kind.value, *extra), 1)))

    human = e.machine.is_(False)
    query = select(
        distinct_messages(EventType.SENT).label("sent_count"),
        distinct_messages(EventType.FAILED).label("failed_count"),
        func.count(distinct(case((e.type.in_(["sent", "failed"]), e.recipient)))).label("total_recipients"),
        distinct_messages(EventType.DELIVERED).label("delivered_count"),
        distinct_messages(EventType.DEFERRED).label("deferred_count"),
        distinct_messages(EventType.BOUNCED).label("bounced_count"),
        distinct_messages(EventType.BOUNCED, e.bounce_kind == "hard").label("hard_bounced_count"),
        distinct_messages(EventType.COMPLAINED).label("complained_count"),
        distinct_messages(EventType.UNSUBSCRIBED).label("unsubscribed_count"),
        distinct_messages(EventType.OPENED).label("unique_opens"),
        count(EventType.OPENED).label("total_opens"),
        distinct_messages(EventType.OPENED, human).label("human_unique_opens"),
        count(EventType.OPENED, human).label("human_total_opens"),
        distinct_messages(EventType.CLICKED).label("unique_clicks"),
        count(EventType.CLICKED).label("total_clicks"),
        distinct_messages(EventType.CLICKED, human).label("human_unique_clicks"),
        count(EventType.CLICKED, human).label("human_total_clicks"),
    ).where(applied)
    counters = {k: int(v or 0) for k, v in (await conn.execute(query)).mappings().one().items()}
    counters["soft_bounced_count"] = counters["bounced_count"] - counters["hard_bounced_count"]
    return counters


async def refresh(db: Database, campaign: str) -> dict[str, Any]:
    """Recompute the campaign's counters, links and open buckets from stored events and store them.

    The statistics row is locked first: ingest transactions touching this campaign wait,
    so no increment lands between the recount and the write.
    """
    async with db.engine.begin() as conn:
        now = utcnow()
        insert = db.insert
        await conn.execute(
            insert(STATS)
            .values(campaign=campaign, updated_at=now)
            .on_conflict_do_nothing(index_elements=["campaign"])
        )
        lock = select(STATS.c.campaign).where(STATS.c.campaign == campaign)
        await conn.execute(lock.with_for_update() if db.dialect == "postgresql" else lock)
        counters = await recount(conn, campaign)
        await conn.execute(
            STATS.update().where(STATS.c.campaign == campaign).values(updated_at=now, **counters)
        )
        e = EVENTS.c
        clicks = await conn.execute(
            select(e.url, func.count(), func.count(distinct(e.tracking_id)))
            .where(and_(e.campaign == campaign, e.applied.is_(True), e.type == "clicked", e.url.is_not(None)))
            .group_by(e.url)
        )
        await conn.execute(delete(LINKS).where(LINKS.c.campaign == campaign))
        link_rows = [
            {"campaign": campaign, "url_hash": url_hash(u), "url": u, "total_clicks": t, "unique_clicks": q}
            for u, t, q in clicks.all()
        ]
        if link_rows:
            await conn.execute(LINKS.insert(), link_rows)
        opens = await conn.execute(
            select(e.occurred_at, e.machine).where(
                and_(e.campaign == campaign, e.applied.is_(True), e.type == "opened")
            )
        )
        buckets: dict[datetime, list[int]] = defaultdict(lambda: [0, 0])
        for occurred_at, machine in opens.all():
            bucket = buckets[hour_of(occurred_at)]
            bucket[0] += 1
            bucket[1] += 0 if machine else 1
        await conn.execute(delete(BUCKETS).where(BUCKETS.c.campaign == campaign))
        if buckets:
            await conn.execute(
                BUCKETS.insert(),
                [
                    {"campaign": campaign, "hour": h, "opens": o, "human_opens": m}
                    for h, (o, m) in buckets.items()
                ],
            )
    return await read_statistics(db, campaign)


async def list_campaigns(db: Database) -> list[dict[str, Any]]:
    async with db.read_engine.connect() as conn:
        rows = await conn.execute(
            select(CAMPAIGNS.c.key, CAMPAIGNS.c.first_seen_at, STATS)
            .select_from(CAMPAIGNS.outerjoin(STATS, STATS.c.campaign == CAMPAIGNS.c.key))
            .order_by(CAMPAIGNS.c.key)
        )
        result = []
        for row in rows.mappings().all():
            stats = with_rates({k: v for k, v in row.items() if k in COUNTER_COLUMNS and v is not None})
            result.append({"campaign": row["key"], "first_seen_at": _iso(row["first_seen_at"]), **stats})
    return result
