"""Retention: old events are pruned while the statistics stay, for reads and for refresh."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from aggregator.ingest.ingest import apply_batch
from aggregator.read import statistics
from aggregator.store.db import open_database
from aggregator.store.migrate import migrate
from aggregator.store.models import EVENTS, PRUNED
from aggregator.store.retention import prune
from mailbeacon.contract.events import Event, EventType
from mailbeacon.contract.signing import HONEYPOT_URL

# Events arrive now (received_at is the ingest's clock) and are pruned as seen from NOW, far
# enough ahead that they all arrived before its cutoff.
NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=200)
VOLATILE = {"updated_at", "recent_events"}


def life(campaign: str, tid: str, recipient: str, start: datetime) -> list[Event]:
    def ev(kind: EventType, hours: float, **fields: object) -> Event:
        return Event(
            event_id=uuid.uuid4().hex,
            type=kind,
            tracking_id=tid,
            occurred_at=start + timedelta(hours=hours),
            **fields,
        )

    return [
        ev(EventType.SENT, 0, campaign=campaign, recipient=recipient),
        ev(EventType.DELIVERED, 0.1),
        ev(EventType.OPENED, 1),
        ev(EventType.OPENED, 2, machine=True, machine_kind="apple_privacy_proxy"),
        ev(EventType.CLICKED, 3, url="https://shop.example/a"),
        ev(EventType.CLICKED, 3.5, url="https://shop.example/a"),
        ev(EventType.CLICKED, 4, url=HONEYPOT_URL, machine=True, machine_kind="honeypot"),
        ev(EventType.BOUNCED, 5, bounce_kind="soft"),
    ]


async def test_pruning_keeps_statistics_and_refresh(database_url: str) -> None:
    db = open_database(database_url)
    await migrate(db)
    campaign = f"keep/c{uuid.uuid4().hex[:8]}"
    try:
        old = NOW - timedelta(days=100)
        tids = [str(uuid.uuid4()) for _ in range(4)]
        events = []
        for i, tid in enumerate(tids):
            events += life(campaign, tid, f"r{i}@example.com", old if i < 3 else NOW - timedelta(days=1))
        # A later open of an old message, and a hard bounce that turns its soft bounce hard.
        events.append(
            Event(event_id="late-open", type=EventType.OPENED, tracking_id=tids[0], occurred_at=NOW)
        )
        events.append(
            Event(
                event_id="late-hard",
                type=EventType.BOUNCED,
                tracking_id=tids[1],
                bounce_kind="hard",
                occurred_at=NOW,
            )
        )
        # A parked event that never found its message: pruned without a trace.
        events.append(
            Event(event_id="orphan", type=EventType.OPENED, tracking_id=str(uuid.uuid4()), occurred_at=old)
        )
        await apply_batch(db, events)
        before = await statistics.refresh(db, campaign)

        removed = await prune(db, timedelta(days=30), now=NOW)
        assert removed == 3 * 8 + 1
        async with db.read_engine.connect() as conn:
            left = await conn.scalar(
                select(func.count()).select_from(EVENTS).where(EVENTS.c.campaign == campaign)
            )
            archived = await conn.scalar(select(func.sum(PRUNED.c.n)).where(PRUNED.c.campaign == campaign))
        assert left == 8 + 2 and archived == 3 * 8

        kept = await statistics.read_statistics(db, campaign)
        refreshed = await statistics.refresh(db, campaign)
        strip = lambda s: {k: v for k, v in s.items() if k not in VOLATILE}  # noqa: E731
        assert strip(kept) == strip(before)
        assert strip(refreshed) == strip(before)  # a recount still includes what was pruned
        assert refreshed["top_links"] == [
            {"url": "https://shop.example/a", "total_clicks": 8, "unique_clicks": 4}
        ]
        assert (refreshed["hard_bounced_count"], refreshed["soft_bounced_count"]) == (1, 3)
        assert await prune(db, timedelta(days=30), now=NOW) == 0  # nothing older left
    finally:
        await db.dispose()


async def test_an_imported_old_event_is_kept_for_the_retention_after_it_arrived(database_url: str) -> None:
    """History imported today (a bounce stated in 2024) keeps its time and counts where it
    belongs; retention prunes it only once it also arrived longer ago than the retention."""
    db = open_database(database_url)
    await migrate(db)
    campaign = f"import/c{uuid.uuid4().hex[:8]}"
    tid = str(uuid.uuid4())
    stated = datetime(2024, 1, 1, 12, tzinfo=UTC)
    try:
        await apply_batch(
            db,
            [
                Event(
                    event_id=uuid.uuid4().hex,
                    type=EventType.SENT,
                    tracking_id=tid,
                    campaign=campaign,
                    recipient="ann@example.com",
                    occurred_at=stated - timedelta(minutes=1),
                ),
                Event(
                    event_id=uuid.uuid4().hex,
                    type=EventType.BOUNCED,
                    tracking_id=tid,
                    bounce_kind="hard",
                    occurred_at=stated,
                ),
            ],
        )
        before = await statistics.refresh(db, campaign)
        assert (before["bounced_count"], before["hard_bounced_count"]) == (1, 1)
        assert await prune(db, timedelta(days=30)) == 0  # just arrived: kept
        async with db.read_engine.connect() as conn:
            kept = await conn.scalar(
                select(func.count()).select_from(EVENTS).where(EVENTS.c.tracking_id == tid)
            )
        assert kept == 2
        # Once it arrived longer ago than the retention, it goes like any old event; the numbers stay.
        assert await prune(db, timedelta(days=30), now=datetime.now(UTC) + timedelta(days=31)) == 2
        after = await statistics.refresh(db, campaign)
        strip = lambda s: {k: v for k, v in s.items() if k not in VOLATILE}  # noqa: E731
        assert strip(after) == strip(before)
    finally:
        await db.dispose()


async def test_pruned_opens_keep_their_client_and_which_came_first(database_url: str) -> None:
    """A copy opened first in Outlook and half an hour later on an iPhone, both pruned: the
    recount still says Outlook (by the earliest exact time kept, not the hour, in which Apple
    Mail would sort first), and keeps the machine's kind and the recipient's provider."""
    outlook = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)"
    iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"
    db = open_database(database_url)
    await migrate(db)
    campaign, tid = f"keep/c{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    old = NOW - timedelta(days=100)

    def ev(kind: EventType, at: datetime, **fields: object) -> Event:
        return Event(event_id=uuid.uuid4().hex, type=kind, tracking_id=tid, occurred_at=at, **fields)

    try:
        await apply_batch(
            db,
            [
                ev(EventType.SENT, old, campaign=campaign, recipient="ann@icloud.com"),
                ev(EventType.DELIVERED, old + timedelta(minutes=1)),
                ev(EventType.OPENED, old + timedelta(minutes=5), user_agent=outlook),
                ev(EventType.OPENED, old + timedelta(minutes=35), user_agent=iphone),
                ev(EventType.OPENED, old + timedelta(minutes=36), machine=True, machine_kind="image_proxy"),
                ev(EventType.OPENED, NOW - timedelta(days=1), user_agent=iphone),  # kept
            ],
        )
        before = await statistics.read_statistics(db, campaign)
        assert [(c["client"], c["unique_opens"], c["total_opens"]) for c in before["clients"]] == [
            ("Outlook", 1, 1),
            ("Apple Mail", 0, 2),
        ]
        assert await prune(db, timedelta(days=30), now=NOW) == 5
        strip = lambda s: {k: v for k, v in s.items() if k not in VOLATILE}  # noqa: E731
        assert strip(await statistics.read_statistics(db, campaign)) == strip(before)
        refreshed = await statistics.refresh(db, campaign)
        assert strip(refreshed) == strip(before)
        assert refreshed["devices"]["desktop"] == 1 and refreshed["machines"] == {
            "image_proxy": {"opens": 1, "clicks": 0}
        }
        assert refreshed["domains"][3] == {
            **refreshed["domains"][3],
            "domain": "apple",
            "sent": 1,
            "delivered": 1,
        }
    finally:
        await db.dispose()
