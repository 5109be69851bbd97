"""Campaign statistics: the pure math, the O(1) read, and the recount from stored events."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any

from sqlalchemy import and_, case, delete, distinct, func, literal, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator.read import breakdowns
from aggregator.read.queries import event_json, with_message_recipient
from aggregator.read.series import MAX_DAYS, Bucket, activity_series, heatmap, window_start
from aggregator.store.db import Database
from aggregator.store.domains import PROVIDERS
from aggregator.store.keys import url_hash
from aggregator.store.models import (
    BUCKETS,
    CAMPAIGNS,
    COUNTER_COLUMNS,
    DOMAIN_COUNTERS,
    DOMAINS,
    EVENTS,
    LINKS,
    PRUNED,
    STATS,
)
from aggregator.store.times import as_utc, iso_utc
from mailbeacon.contract.events import EventType, utcnow
from mailbeacon.contract.signing import HONEYPOT_URL

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


async def campaign_exists(db: Database, campaign: str) -> bool:
    async with db.read_engine.connect() as conn:
        found = await conn.scalar(select(CAMPAIGNS.c.key).where(CAMPAIGNS.c.key == campaign))
        if found is None:
            found = await conn.scalar(select(STATS.c.campaign).where(STATS.c.campaign == campaign))
    return found is not None


async def _buckets(conn: AsyncConnection, campaign: str) -> list[Bucket]:
    """The campaign's hourly buckets of the most recent days a read shows (aggregator.read.series):
    newest first, at most as many as that window has hours, then cut to the window."""
    b = BUCKETS.c
    rows = (
        await conn.execute(
            select(b.hour, b.opens, b.human_opens, b.clicks, b.human_clicks)
            .where(b.campaign == campaign)
            .order_by(b.hour.desc())
            .limit(MAX_DAYS * 24)
        )
    ).all()
    if not rows:
        return []
    start = window_start(as_utc(rows[0][0]))
    buckets = [Bucket(as_utc(h), o, ho, c, hc) for h, o, ho, c, hc in rows]
    return [bucket for bucket in buckets if bucket.hour >= start]


async def _read(conn: AsyncConnection, campaign: str, hourly: bool, zone: tzinfo) -> dict[str, Any]:
    row = (await conn.execute(select(STATS).where(STATS.c.campaign == campaign))).mappings().first()
    counters = dict(row) if row else {}
    links = await conn.execute(
        select(LINKS.c.url, LINKS.c.total_clicks, LINKS.c.unique_clicks)
        .where(LINKS.c.campaign == campaign)
        .order_by(LINKS.c.total_clicks.desc(), LINKS.c.unique_clicks.desc(), LINKS.c.url)
        .limit(TOP_LINKS)
    )
    buckets = await _buckets(conn, campaign)
    insights = await breakdowns.read_breakdowns(conn, campaign, int(counters.get("human_unique_opens") or 0))
    recent = await conn.execute(
        with_message_recipient(select(EVENTS))
        .where(EVENTS.c.campaign == campaign, EVENTS.c.applied.is_(True))
        .order_by(EVENTS.c.occurred_at.desc(), EVENTS.c.id.desc())
        .limit(RECENT_EVENTS)
    )
    return {
        "campaign": campaign,
        **with_rates(counters),
        "top_links": [{"url": u, "total_clicks": t, "unique_clicks": q} for u, t, q in links.all()],
        **activity_series(buckets, hourly),
        **insights,
        "engagement_heatmap": heatmap(buckets, zone),
        "timezone": str(zone),
        "recent_events": [event_json(dict(r)) for r in recent.mappings().all()],
        "updated_at": iso_utc(counters.get("updated_at")),
    }


async def read_statistics(
    db: Database, campaign: str, hourly: bool = False, zone: tzinfo = UTC
) -> dict[str, Any]:
    """The campaign's statistics; ``zone`` is the time zone of ``engagement_heatmap``."""
    async with db.read_engine.connect() as conn:
        return await _read(conn, campaign, hourly, zone)


def _facts(campaign: str) -> Any:
    """The campaign's applied events, one row each, plus pruned events weighted by their count."""
    e, p = EVENTS.c, PRUNED.c
    live = select(
        e.type,
        e.tracking_id,
        e.recipient,
        e.machine,
        e.bounce_kind,
        e.url,
        e.occurred_at.label("at"),
        literal(1).label("n"),
    ).where(e.campaign == campaign, e.applied.is_(True))
    pruned = select(p.type, p.tracking_id, p.recipient, p.machine, p.bounce_kind, p.url, p.hour, p.n).where(
        p.campaign == campaign
    )
    return union_all(live, pruned).subquery("facts")


async def recount(conn: AsyncConnection, campaign: str) -> dict[str, int]:
    """Every counter recomputed from the stored events of the campaign (the definition, literally)."""
    f = _facts(campaign).c

    def messages_with(kind: EventType, *extra: Any) -> Any:
        return func.count(distinct(case((and_(f.type == kind.value, *extra), f.tracking_id))))

    def events_of(kind: EventType, *extra: Any) -> Any:
        return func.coalesce(func.sum(case((and_(f.type == kind.value, *extra), f.n), else_=0)), 0)

    human = f.machine.is_(False)
    has_recipient = and_(f.type.in_(["sent", "failed"]), f.recipient.is_not(None), f.recipient != "")
    query = select(
        messages_with(EventType.SENT).label("sent_count"),
        messages_with(EventType.FAILED).label("failed_count"),
        func.count(distinct(case((has_recipient, f.recipient)))).label("total_recipients"),
        messages_with(EventType.DELIVERED).label("delivered_count"),
        messages_with(EventType.DEFERRED).label("deferred_count"),
        messages_with(EventType.BOUNCED).label("bounced_count"),
        messages_with(EventType.BOUNCED, f.bounce_kind == "hard").label("hard_bounced_count"),
        messages_with(EventType.COMPLAINED).label("complained_count"),
        messages_with(EventType.UNSUBSCRIBED).label("unsubscribed_count"),
        messages_with(EventType.OPENED).label("unique_opens"),
        events_of(EventType.OPENED).label("total_opens"),
        messages_with(EventType.OPENED, human).label("human_unique_opens"),
        events_of(EventType.OPENED, human).label("human_total_opens"),
        messages_with(EventType.CLICKED).label("unique_clicks"),
        events_of(EventType.CLICKED).label("total_clicks"),
        messages_with(EventType.CLICKED, human).label("human_unique_clicks"),
        events_of(EventType.CLICKED, human).label("human_total_clicks"),
    )
    counters = {k: int(v or 0) for k, v in (await conn.execute(query)).mappings().one().items()}
    counters["soft_bounced_count"] = counters["bounced_count"] - counters["hard_bounced_count"]
    return counters


async def recount_links(conn: AsyncConnection, campaign: str) -> list[tuple[str, int, int]]:
    """``(url, total clicks, unique clicks)`` per link; the honeypot is no link."""
    f = _facts(campaign).c
    rows = await conn.execute(
        select(f.url, func.sum(f.n), func.count(distinct(f.tracking_id)))
        .where(f.type == EventType.CLICKED.value, f.url.is_not(None), f.url != HONEYPOT_URL)
        .group_by(f.url)
    )
    return [(url, int(total), int(unique)) for url, total, unique in rows.all()]


def _hour(dialect: str, column: Any) -> Any:
    if dialect == "postgresql":
        return func.date_trunc("hour", column)
    return func.strftime("%Y-%m-%d %H:00:00", column)


async def recount_buckets(conn: AsyncConnection, dialect: str, campaign: str) -> dict[datetime, list[int]]:
    """Opens, people's opens, clicks and people's clicks per UTC hour."""
    f = _facts(campaign).c
    hour = _hour(dialect, f.at).label("hour")
    human = f.machine.is_(False)
    opened, clicked = f.type == EventType.OPENED.value, f.type == EventType.CLICKED.value

    def total(*conditions: Any) -> Any:
        return func.coalesce(func.sum(case((and_(*conditions), f.n), else_=0)), 0)

    rows = await conn.execute(
        select(hour, total(opened), total(opened, human), total(clicked), total(clicked, human))
        .where(f.type.in_([EventType.OPENED.value, EventType.CLICKED.value]))
        .group_by(hour)
    )
    return {as_utc(moment): [int(n) for n in counts] for moment, *counts in rows.all()}


async def refresh(db: Database, campaign: str) -> dict[str, Any]:
    """Recompute the campaign's statistics from stored events, store them, and read them."""
    async with db.writing() as conn:
        await refresh_in(conn, db, campaign)
    return await read_statistics(db, campaign)


async def refresh_in(conn: AsyncConnection, db: Database, campaign: str) -> None:
    """Recompute the campaign's counters, links, buckets and breakdowns from stored events and
    store them, in the caller's (writing) transaction.

    The statistics row is locked first: ingest transactions touching this campaign wait,
    so no increment lands between the recount and the write (SQLite's write lock does the
    same for the whole database).
    """
    now = utcnow()
    await conn.execute(
        db.insert(STATS)
        .values(campaign=campaign, updated_at=now, **dict.fromkeys(COUNTER_COLUMNS, 0))
        .on_conflict_do_nothing(index_elements=["campaign"])
    )
    lock = select(STATS.c.campaign).where(STATS.c.campaign == campaign)
    await conn.execute(lock.with_for_update() if db.dialect == "postgresql" else lock)
    counters = await recount(conn, campaign)
    await conn.execute(STATS.update().where(STATS.c.campaign == campaign).values(updated_at=now, **counters))
    links = await recount_links(conn, campaign)
    await conn.execute(delete(LINKS).where(LINKS.c.campaign == campaign))
    if links:
        await conn.execute(
            LINKS.insert(),
            [
                {
                    "campaign": campaign,
                    "url_hash": url_hash(u),
                    "url": u,
                    "total_clicks": t,
                    "unique_clicks": q,
                }
                for u, t, q in links
            ],
        )
    buckets = await recount_buckets(conn, db.dialect, campaign)
    await conn.execute(delete(BUCKETS).where(BUCKETS.c.campaign == campaign))
    if buckets:
        await conn.execute(
            BUCKETS.insert(),
            [
                {
                    "campaign": campaign,
                    "hour": h,
                    "opens": o,
                    "human_opens": ho,
                    "clicks": c,
                    "human_clicks": hc,
                }
                for h, (o, ho, c, hc) in sorted(buckets.items())
            ],
        )
    facets = await breakdowns.recount_facets(conn, campaign)
    domains = await breakdowns.recount_domains(conn, _facts(campaign))
    await breakdowns.store_recount(conn, campaign, facets, domains)


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
            result.append({"campaign": row["key"], "first_seen_at": iso_utc(row["first_seen_at"]), **stats})
    return result


async def provider_snapshot(db: Database) -> dict[str, dict[str, dict[str, int]]]:
    """Every campaign's copies per mailbox provider (the Prometheus gauge's rows)."""
    d = DOMAINS.c
    async with db.read_engine.connect() as conn:
        rows = await conn.execute(
            select(CAMPAIGNS.c.key, d.domain, *(d[n] for n in DOMAIN_COUNTERS))
            .select_from(CAMPAIGNS.join(DOMAINS, d.campaign == CAMPAIGNS.c.key))
            .where(d.domain.in_(PROVIDERS))
        )
        snapshot: dict[str, dict[str, dict[str, int]]] = {}
        for campaign, provider, *counts in rows.all():
            snapshot.setdefault(campaign, {})[provider] = dict(
                zip(DOMAIN_COUNTERS, map(int, counts), strict=True)
            )
    return snapshot
