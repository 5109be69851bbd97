"""A poison event, one the database refuses while it works, through real JetStream on both
databases: the consumer isolates it by halving the batch, stores every other event,
terminates it (counted in ``mailbeacon_aggregator_events_rejected_total``) and keeps
going, instead of redelivering the batch forever. A database that refuses everything is
not taken for a batch of poison.
The consumer also applies a campaign's IP anonymization, parked events included."""

from __future__ import annotations

import json
import uuid

import pytest
from nats.aio.client import Client as NATS
from prometheus_client import generate_latest
from sqlalchemy import func, select, text

from aggregator import metrics as aggregator_metrics
from aggregator.ingest.consumer import EventConsumer
from aggregator.read.statistics import read_statistics
from aggregator.store.db import Database, open_database
from aggregator.store.migrate import migrate
from aggregator.store.models import EVENTS
from mailbeacon.bus.jetstream import CONSUMER, STREAM
from tests.support import eventually, metric_value


def rejected() -> float:
    return metric_value(
        generate_latest(aggregator_metrics.REGISTRY).decode(), "mailbeacon_aggregator_events_rejected_total"
    )


def batch_failures() -> float:
    return metric_value(
        generate_latest(aggregator_metrics.REGISTRY).decode(), "mailbeacon_aggregator_batch_failures_total"
    )


async def publish(nc: NATS, events: list[dict[str, object]]) -> None:
    js = nc.jetstream()
    for e in events:
        await js.publish(f"mailbeacon.events.{e['type']}", json.dumps(e).encode())


def event(kind: str, **fields: object) -> dict[str, object]:
    return {"event_id": uuid.uuid4().hex, "type": kind, "occurred_at": "2026-03-02T08:00:00+00:00", **fields}


async def test_poison_events_are_rejected_and_the_rest_stored(nc: NATS, database_url: str) -> None:
    dialect = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    db = open_database(database_url)
    await migrate(db)
    async with db.writing() as conn:
        for statement in REFUSE_POISON[dialect]:
            await conn.execute(text(statement))
    campaign = f"poison/c{uuid.uuid4().hex[:8]}"
    before = rejected()
    consumer = EventConsumer(nc.jetstream(), db, batch_size=64, anonymized={campaign})
    await consumer.start()
    try:
        # An open whose message comes later: parked, then anonymized when applied.
        late = str(uuid.uuid4())
        early_open = event("opened", tracking_id=late, ip="192.0.2.200")
        await publish(nc, [early_open])
        await eventually(lambda: _stored(db, [str(early_open["event_id"])]))

        tids = [str(uuid.uuid4()) for _ in range(40)]
        good = [
            event("sent", tracking_id=t, campaign=campaign, recipient=f"r{i}@x.example")
            for i, t in enumerate(tids)
        ]
        good += [event("opened", tracking_id=t, ip="203.0.113.9") for t in tids]
        good.append(event("sent", tracking_id=late, campaign=campaign, recipient="late@x.example"))
        # Valid events by the contract that this database refuses to store (a constraint
        # the contract does not know of, as a schema change or a DBA's check would add).
        poison = [
            {**event("opened", tracking_id=tids[3]), "event_id": "poison-open"},
            {
                **event("clicked", tracking_id=tids[7], url="https://shop.example/"),
                "event_id": "poison-click",
            },
        ]
        await publish(nc, good[:30] + poison[:1] + good[30:60] + poison[1:] + good[60:])

        async def all_settled() -> bool:
            info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(all_settled, within=60)
        stats = await read_statistics(db, campaign)
        assert stats["sent_count"] == 41 and stats["unique_opens"] == 41
        assert stats["total_opens"] == 41 and stats["total_clicks"] == 0
        assert rejected() - before == 2
        assert consumer.healthy
        async with db.read_engine.connect() as conn:
            ips = set(
                (
                    await conn.execute(
                        select(EVENTS.c.ip).where(EVENTS.c.campaign == campaign, EVENTS.c.ip.is_not(None))
                    )
                ).scalars()
            )
        assert ips == {"203.0.113.0", "192.0.2.0"}
    finally:
        await consumer.stop()
        async with db.writing() as conn:
            for statement in ALLOW_POISON[dialect]:
                await conn.execute(text(statement))
        await db.dispose()


REFUSE_POISON = {
    # SQLite: a constraint failure; PostgreSQL: a data exception (SQLSTATE class 22).
    "sqlite": [
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON events WHEN NEW.event_id LIKE 'poison-%' "
        "BEGIN SELECT RAISE(ABORT, 'refused value'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN IF NEW.event_id LIKE 'poison-%' THEN "
        "RAISE EXCEPTION 'refused value' USING ERRCODE = '22023'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ],
}
ALLOW_POISON = {
    "sqlite": ["DROP TRIGGER refuse_poison"],
    "postgresql": ["DROP TRIGGER refuse_poison ON events", "DROP FUNCTION refuse_poison()"],
}


async def _stored(db: Database, event_ids: list[str]) -> bool:
    async with db.read_engine.connect() as conn:
        n = (await conn.execute(select(func.count()).where(EVENTS.c.event_id.in_(event_ids)))).scalar_one()
    return bool(n == len(event_ids))


REFUSE_EVERY_EVENT = {
    # A database that answers but stores nothing, as after a failover to a read-only standby
    # or on a full disk: the refusal says nothing about the events themselves.
    "sqlite": [
        "CREATE TRIGGER refuse_all BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_all() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_all BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_all()",
    ],
}
ALLOW_AGAIN = {
    "sqlite": ["DROP TRIGGER refuse_all"],
    "postgresql": ["DROP TRIGGER refuse_all ON events", "DROP FUNCTION refuse_all()"],
}


@pytest.mark.slow
async def test_a_database_that_stores_nothing_loses_nothing(nc: NATS, database_url: str) -> None:
    db = open_database(database_url)
    await migrate(db)
    dialect = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    async with db.writing() as conn:
        for statement in REFUSE_EVERY_EVENT[dialect]:
            await conn.execute(text(statement))
    campaign = f"full/c{uuid.uuid4().hex[:8]}"
    before_rejected = rejected()
    failures_before = batch_failures()
    consumer = EventConsumer(nc.jetstream(), db, batch_size=64)
    await consumer.start()
    try:
        sent = [
            event("sent", tracking_id=str(uuid.uuid4()), campaign=campaign, recipient=f"r{i}@x.example")
            for i in range(8)
        ]
        await publish(nc, sent)

        async def refused_and_redelivered() -> bool:
            # Several rounds of refusal, each a batch and its halves.
            return batch_failures() - failures_before >= 30

        await eventually(refused_and_redelivered, within=30)
        assert rejected() == before_rejected  # not one event given up on
        assert not consumer.healthy
        async with db.writing() as conn:
            for statement in ALLOW_AGAIN[dialect]:
                await conn.execute(text(statement))
        await eventually(lambda: _stored(db, [str(e["event_id"]) for e in sent]), within=60)
        assert (await read_statistics(db, campaign))["sent_count"] == 8
        assert rejected() == before_rejected
    finally:
        await consumer.stop()
        await db.dispose()


@pytest.mark.slow
async def test_address_only_webhook_waits_for_a_sent_put_back(nc: NATS, database_url: str) -> None:
    """The newer copy's ``sent`` could not be stored (the database failed) and waits for its
    redelivery; a bounce naming only the address, arriving once the database works again,
    must not go to the older copy meanwhile."""
    db = open_database(database_url)
    await migrate(db)
    dialect = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    old, new = f"held/o{uuid.uuid4().hex[:8]}", f"held/n{uuid.uuid4().hex[:8]}"
    address = f"{uuid.uuid4().hex[:8]}@example.com"
    consumer = EventConsumer(nc.jetstream(), db, batch_size=64)
    await consumer.start()
    try:
        await publish(nc, [event("sent", tracking_id=str(uuid.uuid4()), campaign=old, recipient=address)])
        await eventually(lambda: _sent(db, old))
        async with db.writing() as conn:
            for statement in REFUSE_EVERY_EVENT[dialect]:
                await conn.execute(text(statement))
        failures_before = batch_failures()
        later = {"occurred_at": "2026-03-02T09:00:00+00:00"}
        await publish(
            nc, [event("sent", tracking_id=str(uuid.uuid4()), campaign=new, recipient=address, **later)]
        )
        await eventually(lambda: _is(batch_failures() > failures_before))
        async with db.writing() as conn:
            for statement in ALLOW_AGAIN[dialect]:
                await conn.execute(text(statement))
        bounce = event(
            "bounced", recipient=address, bounce_kind="hard", occurred_at="2026-03-02T09:05:00+00:00"
        )
        await publish(nc, [bounce])
        await eventually(lambda: _stored(db, [str(bounce["event_id"])]), within=30)
        assert (await read_statistics(db, new))["bounced_count"] == 1
        assert (await read_statistics(db, old))["bounced_count"] == 0
    finally:
        await consumer.stop()
        await db.dispose()


async def _sent(db: Database, campaign: str) -> bool:
    return bool((await read_statistics(db, campaign)).get("sent_count"))


async def _is(value: bool) -> bool:
    return value
