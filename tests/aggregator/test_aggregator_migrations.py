"""Alembic migrations: the same schema on SQLite and PostgreSQL, the one the models describe;
databases made by the first slice's ``create_all`` upgrade with their data; ``mailbeacon
migrate`` and concurrent start-ups are safe; an aggregator refuses an unmigrated database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from aggregator.ingest.ingest import apply_batch, count_parked
from aggregator.ingest.parked import expire_parked
from aggregator.read import statistics
from aggregator.store.db import open_database
from aggregator.store.migrate import (
    SchemaOutOfDate,
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    migrate,
)
from aggregator.store.retention import prune
from mailbeacon.contract.events import Event, EventType


def _differences(connection: Any) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, SQLModel.metadata))


async def test_migrations_build_the_models_schema(database_url: str) -> None:
    db = open_database(database_url)
    try:
        before, after = await migrate(db)
        assert (before, after) == (None, head_revision())
        assert await migrate(db) == (head_revision(), head_revision())  # nothing left to do
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
            indexes = await conn.run_sync(lambda c: {i["name"] for i in inspect(c).get_indexes("events")})
        assert {
            "ix_events_message_type",
            "ix_events_campaign_time",
            "ix_events_type_time",
            "ix_events_parked",
            "ix_events_parked_since",
        } <= indexes
    finally:
        await db.dispose()


async def test_down_and_up_again(database_url: str) -> None:
    db = open_database(database_url)
    try:
        await migrate(db)
        assert await downgrade(db, "0001") == "0001"
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert "pruned_events" not in tables and "events" in tables
        assert await downgrade(db, "base") is None
        await migrate(db)
        assert await current_revision(db) == head_revision()
    finally:
        await db.dispose()


async def test_parked_events_stored_before_their_bounds_are_found_after_the_upgrade(
    database_url: str,
) -> None:
    """0003 rebuilds the parked index by (address, arrival) and adds one by age: events
    parked under 0002 are counted, claimed by a copy relayed in time, and expire."""
    db = open_database(database_url)
    at: Any = datetime.now(UTC)
    stamp: Any = at if db.dialect == "postgresql" else at.replace(tzinfo=None).isoformat(sep=" ")
    try:
        await migrate(db, "0002")
        async with db.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO events (event_id, type, tracking_id, campaign, recipient, occurred_at, received_at, "
                    "machine, source, applied) VALUES ('old-open', 'opened', :tid, NULL, NULL, :at, :at, false, "
                    "'pixel', false), ('old-bounce', 'bounced', NULL, NULL, 'ann@example.com', :at, :at, false, "
                    "'webhook:generic', false)"
                ),
                {"tid": str(uuid.uuid4()), "at": stamp},
            )
        await migrate(db)
        assert await count_parked(db) == 2
        await apply_batch(
            db,
            [
                Event(
                    event_id="new-sent",
                    type=EventType.SENT,
                    tracking_id=str(uuid.uuid4()),
                    campaign="up/graded",
                    recipient="ann@example.com",
                    occurred_at=at,
                )
            ],
        )
        assert await count_parked(db) == 1  # the bounce went to the copy relayed by its time
        assert (await statistics.read_statistics(db, "up/graded"))["bounced_count"] == 1
        assert await expire_parked(db, datetime.now(UTC) + timedelta(seconds=1)) == {"opened": 1}
        assert await downgrade(db, "0002") == "0002"
        await migrate(db)
    finally:
        await db.dispose()


@pytest.mark.slow
async def test_first_slice_database_upgrades_with_its_data(database_url: str, tmp_path: Path) -> None:
    """A database that ``create_all`` made (no alembic_version) is stamped and upgraded."""
    db = open_database(database_url)
    tid = str(uuid.uuid4())
    at: Any = (
        datetime(2026, 1, 1, 10, tzinfo=UTC) if db.dialect == "postgresql" else "2026-01-01 10:00:00.000000"
    )
    try:
        await migrate(db, "0001")
        async with db.engine.begin() as conn:
            await conn.execute(text("DROP TABLE alembic_version"))
            await conn.execute(
                text(
                    "INSERT INTO messages (tracking_id, campaign, recipient, status, sent_at, open_count, click_count) "
                    "VALUES (:tid, 'old/campaign', 'ann@example.com', 'sent', :at, 1, 0)"
                ),
                {"tid": tid, "at": at},
            )
            await conn.execute(
                text(
                    "INSERT INTO events (event_id, type, tracking_id, campaign, recipient, occurred_at, received_at, "
                    "machine, source, applied) VALUES (:e, 'sent', :tid, 'old/campaign', 'ann@example.com', "
                    ":at, :at, false, 'proxy', true), (:o, 'opened', :tid, 'old/campaign', NULL, :at, :at, false, "
                    "'pixel', true)"
                ),
                {"e": "old-sent", "o": "old-open", "tid": tid, "at": at},
            )
    finally:
        await db.dispose()

    env = {**os.environ, "MAILBEACON_DATABASE_URL": database_url, "MAILBEACON_DATA_DIR": str(tmp_path)}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mailbeacon.app.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"revision {head_revision()}, was 0001" in done.stdout

    db = open_database(database_url)
    try:
        async with db.engine.connect() as conn:
            row = (await conn.execute(text("SELECT newly_seen, open_count FROM messages"))).one()
        assert tuple(row) == (0, 1)  # the new column got its default, the old data is there
        stats = await statistics.refresh(db, "old/campaign")
        assert (stats["sent_count"], stats["total_opens"], stats["unique_opens"]) == (1, 1, 1)
    finally:
        await db.dispose()


async def test_replicas_starting_together_migrate_once(new_database: Any) -> None:
    url = new_database()
    dbs = [open_database(url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(ensure_schema(db, migrate_on_start=True) for db in dbs))
        assert results == [None, None, None]
        assert await current_revision(dbs[0]) == head_revision()
    finally:
        for db in dbs:
            await db.dispose()


async def test_aggregator_refuses_an_unmigrated_database(database_url: str) -> None:
    db = open_database(database_url)
    try:
        with pytest.raises(SchemaOutOfDate, match="mailbeacon migrate"):
            await ensure_schema(db, migrate_on_start=False)
        await migrate(db)
        await ensure_schema(db, migrate_on_start=False)
    finally:
        await db.dispose()


async def test_insights_upgrade_recounts_existing_campaigns(database_url: str) -> None:
    """0004 on a database with events (some pruned): ``migrate`` fills each copy's domain and
    first client, lists the campaigns, and recounts them once the schema is committed; the
    numbers equal what ingest keeps and a refresh. Opens pruned before the upgrade kept no
    user agent: they count as client Other, device unknown."""
    iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"
    outlook = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)"
    # In the days ahead, so that retention can prune the one open dated long before them; at
    # 08:00, so the events of the next hours fall on the same day whenever the test runs.
    campaign, start = (
        "up/insights",
        datetime.now(UTC).replace(hour=8, minute=0, second=0, microsecond=0) + timedelta(days=30),
    )
    ids = [str(uuid.uuid4()) for _ in range(3)]
    recipients = ["ann@gmail.com", '"x@y"@corp.example', "cy@corp.example"]

    def event(n: int, kind: EventType, tid: str, hours: float, **fields: Any) -> Event:
        return Event(
            event_id=f"e{n}", type=kind, tracking_id=tid, occurred_at=start + timedelta(hours=hours), **fields
        )

    events = [
        *(
            event(i, EventType.SENT, tid, 0, campaign=campaign, recipient=recipients[i])
            for i, tid in enumerate(ids)
        ),
        event(10, EventType.DELIVERED, ids[0], 0.1),
        event(11, EventType.DELIVERED, ids[1], 0.1),
        event(12, EventType.OPENED, ids[0], 1, user_agent=iphone),
        event(13, EventType.OPENED, ids[0], 2, user_agent=outlook),
        event(14, EventType.OPENED, ids[1], 1, machine=True, machine_kind="image_proxy"),
        event(15, EventType.CLICKED, ids[1], 3, url="https://shop.example/a", user_agent=outlook),
        event(16, EventType.BOUNCED, ids[2], 0.2, bounce_kind="hard"),
        # A person's open years back, pruned before the upgrade.
        event(17, EventType.OPENED, ids[1], -24 * 400, user_agent=iphone),
    ]
    db = open_database(database_url)
    try:
        await migrate(db)
        await apply_batch(db, events)
        assert await prune(db, timedelta(days=1), now=datetime.now(UTC) + timedelta(days=2)) == 1
        assert await downgrade(db, "0003") == "0003"
        async with db.engine.begin() as conn:  # what 0003 kept of it
            assert await conn.scalar(text("SELECT sum(n) FROM pruned_events")) == 1
            assert await conn.scalar(text("SELECT total_opens FROM campaign_stats")) == 4

        before, after = await migrate(db)
        assert (before, after) == ("0003", head_revision())
        async with db.engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM pending_recounts")) == 0
            domains = dict((await conn.execute(text("SELECT tracking_id, domain FROM messages"))).all())
        assert domains == {ids[0]: "gmail.com", ids[1]: "corp.example", ids[2]: "corp.example"}
        upgraded = await statistics.read_statistics(db, campaign)
        assert upgraded["clients"] == [
            {"client": "Apple Mail", "unique_opens": 1, "total_opens": 1, "share": 50.0},
            {"client": "Other", "unique_opens": 1, "total_opens": 1, "share": 50.0},  # the pruned open
            {"client": "Outlook", "unique_opens": 0, "total_opens": 1, "share": 0.0},
        ]
        assert upgraded["devices"] == {"desktop": 0, "mobile": 1, "tablet": 0, "webmail": 0, "unknown": 1}
        assert upgraded["machines"] == {"image_proxy": {"opens": 1, "clicks": 0}}
        rows = {
            d["domain"]: (d["sent"], d["delivered"], d["bounced"], d["unique_opens"])
            for d in upgraded["domains"]
        }
        assert rows["gmail"] == (1, 1, 0, 1) and rows["other"] == rows["corp.example"] == (2, 1, 1, 1)
        # The open 400 days back is counted, but the series cover the most recent 366 days only.
        day = start.strftime("%Y-%m-%d")
        assert upgraded["clicks_over_time"] == [{"date": day, "clicks": 1, "human_clicks": 1}]
        assert upgraded["opens_over_time"] == [{"date": day, "opens": 3, "human_opens": 2}]
        # Ingest goes on from the filled state: an earlier open of ann's copy on Outlook moves it.
        await apply_batch(db, [event(20, EventType.OPENED, ids[0], 0.5, user_agent=outlook)])
        moved = await statistics.read_statistics(db, campaign)
        assert [(c["client"], c["unique_opens"], c["total_opens"]) for c in moved["clients"]] == [
            ("Outlook", 1, 2),
            ("Other", 1, 1),
            ("Apple Mail", 0, 1),
        ]
        refreshed = await statistics.refresh(db, campaign)
        volatile = {"updated_at", "recent_events"}
        assert {k: v for k, v in refreshed.items() if k not in volatile} == {
            k: v for k, v in moved.items() if k not in volatile
        }
    finally:
        await db.dispose()


async def test_an_interrupted_upgrade_finishes_its_recounts_later(database_url: str) -> None:
    """A campaign still listed in pending_recounts (the migrating process stopped after the
    schema commit) is recounted by the next ``migrate`` or aggregator start."""
    db = open_database(database_url)
    tid = str(uuid.uuid4())
    try:
        await migrate(db)
        await apply_batch(
            db,
            [
                Event(
                    event_id="s",
                    type=EventType.SENT,
                    tracking_id=tid,
                    campaign="up/later",
                    recipient="a@gmail.com",
                ),
                Event(event_id="d", type=EventType.DELIVERED, tracking_id=tid),
            ],
        )
        async with db.engine.begin() as conn:
            await conn.execute(text("DELETE FROM domain_stats"))
            await conn.execute(text("INSERT INTO pending_recounts (campaign) VALUES ('up/later')"))
        assert (await statistics.read_statistics(db, "up/later"))["domains"][0]["delivered"] == 0
        await ensure_schema(db, migrate_on_start=False)
        gmail = (await statistics.read_statistics(db, "up/later"))["domains"][0]
        assert (gmail["domain"], gmail["sent"], gmail["delivered"]) == ("gmail", 1, 1)
        async with db.engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM pending_recounts")) == 0
    finally:
        await db.dispose()
