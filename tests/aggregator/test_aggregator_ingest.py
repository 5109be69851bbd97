"""Ingest on both databases: replicas applying overlapping batches at once stay exact, and a
batch that fails half-way leaves nothing behind (so its redelivery counts once)."""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import func, select

from aggregator.ingest.ingest import adopt_parked, apply_batch, apply_prepared, look_up_stored
from aggregator.ingest.prepare import prepare
from aggregator.ingest.transaction import Transaction
from aggregator.read import statistics
from aggregator.store.db import open_database
from aggregator.store.migrate import migrate
from aggregator.store.models import EVENTS, MESSAGES
from mailbeacon.contract.events import Event
from tests.aggregator.test_aggregator_crash import CAMPAIGNS, generate, recount


async def test_concurrent_replicas_with_redeliveries_stay_exact(database_url: str) -> None:
    replicas = [open_database(database_url) for _ in range(3)]
    await migrate(replicas[0])
    raw = generate(150, seed=11)
    events = [Event.model_validate(e) for e in raw]
    rng = random.Random(3)
    try:

        async def replica(db_index: int) -> None:
            # Every replica sees every event, in its own order and batching: the worst case
            # of redeliveries after lost acks, all racing on the same messages and counters.
            mine = events[:]
            rng.shuffle(mine)
            i = 0
            while i < len(mine):
                size = rng.randint(5, 80)
                await apply_batch(replicas[db_index], mine[i : i + size])
                i += size

        await asyncio.gather(*(replica(n) for n in range(len(replicas))))
        for db in replicas:
            await adopt_parked(db)
        insights = ("clients", "devices", "machines", "domains", "engagement_heatmap", "clicks_over_time")
        for campaign in CAMPAIGNS:
            expected = recount(raw, campaign)
            kept = await statistics.read_statistics(replicas[0], campaign)
            assert {k: kept[k] for k in expected} == expected
            refreshed = await statistics.refresh(replicas[1], campaign)
            assert {k: refreshed[k] for k in expected} == expected
            # The breakdowns the replicas kept while racing equal their recount too.
            assert kept["clients"] and {k: kept[k] for k in insights} == {k: refreshed[k] for k in insights}
        async with replicas[0].read_engine.connect() as conn:
            stored = await conn.scalar(select(func.count()).select_from(EVENTS))
        assert stored == len(events)  # each event stored once
    finally:
        for db in replicas:
            await db.dispose()


async def test_a_failed_batch_leaves_nothing(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = open_database(database_url)
    await migrate(db)
    events = [Event.model_validate(e) for e in generate(10, seed=2)]
    try:

        async def broken(self: object) -> None:
            raise RuntimeError("database went away")

        with monkeypatch.context() as patch:
            patch.setattr(Transaction, "flush", broken)
            with pytest.raises(RuntimeError):
                await apply_batch(db, events)
        async with db.read_engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(EVENTS)) == 0
            assert await conn.scalar(select(func.count()).select_from(MESSAGES)) == 0
        result = await apply_batch(db, events)  # the redelivery
        assert result.duplicates == 0 and result.applied == len(events)
        again = await apply_batch(db, events)
        assert again.duplicates == len(events) and again.applied == 0
    finally:
        await db.dispose()


async def test_events_stored_meanwhile_by_another_replica_count_once(database_url: str) -> None:
    """The consumer looks up which events are stored before their transaction starts (on
    PostgreSQL, to copy the rest straight in). Events another replica stores after that
    lookup must still count once: the copy fails on them and the batch falls back."""
    here, there = open_database(database_url), open_database(database_url)
    await migrate(here)
    raw = generate(12, seed=5)
    events = [Event.model_validate(e) for e in raw]
    try:
        batch = prepare(events, here.dialect == "postgresql")
        await look_up_stored(here, batch)
        assert batch.stored == (set() if here.dialect == "postgresql" else None)
        # Half of the batch, and one event only the other replica has, stored meanwhile.
        elsewhere = await apply_batch(there, events[::2])
        assert elsewhere.duplicates == 0
        result = await apply_prepared(here, batch)
        assert result.duplicates == len(events[::2])
        await adopt_parked(here)
        for campaign in CAMPAIGNS:
            expected = recount(raw, campaign)
            kept = await statistics.read_statistics(here, campaign)
            assert {k: kept[k] for k in expected} == expected
        async with here.read_engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(EVENTS)) == len(events)
        # Redelivered once more, looked up first: all of it is known, nothing counts again.
        again = prepare(events, here.dialect == "postgresql")
        await look_up_stored(here, again)
        assert (await apply_prepared(here, again)).duplicates == len(events)
        for campaign in CAMPAIGNS:
            expected = recount(raw, campaign)
            kept = await statistics.read_statistics(here, campaign)
            assert {k: kept[k] for k in expected} == expected
    finally:
        await here.dispose()
        await there.dispose()
