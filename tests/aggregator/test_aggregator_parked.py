"""Parked events are bounded, on both databases.

Address-only events attach only to a copy relayed no later than their time plus five
minutes, their time being at the latest their arrival in the stream, so a complaint for an
address never mailed cannot wait for that address's first copy. Parked events expire after
the TTL and are capped (oldest first); expired or dropped ones never count, not in a
``refresh``, not when their copy's ``sent`` arrives afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import generate_latest
from sqlalchemy import select, text

from aggregator import metrics as aggregator_metrics
from aggregator import service as aggregator_service
from aggregator.ingest.consumer import EventConsumer, arrivals
from aggregator.ingest.decode import decode
from aggregator.ingest.ingest import adopt_parked, apply_batch, apply_prepared, count_parked
from aggregator.ingest.parked import bound_parked, drop_over_limit, expire_parked
from aggregator.ingest.prepare import prepare
from aggregator.read import statistics
from aggregator.store.bulk import Bulk
from aggregator.store.db import Database, open_database
from aggregator.store.migrate import migrate
from aggregator.store.models import EVENTS
from aggregator.store.times import as_utc, sqlite_time
from mailbeacon.app.runner import AllInOne
from mailbeacon.contract.events import Event, EventType, utcnow
from tests.support import eventually, make_settings, metric_value

TTL = timedelta(hours=72)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = open_database(database_url)
    await migrate(database)
    try:
        yield database
    finally:
        await database.dispose()


def sent(tid: str, campaign: str, address: str, at: datetime) -> Event:
    return Event(
        event_id=f"sent-{tid}", type=EventType.SENT, tracking_id=tid, campaign=campaign, recipient=address,
        occurred_at=at,
    )  # fmt: skip


def webhook(kind: EventType, address: str, at: datetime) -> Event:
    """A provider's report naming only the address (no tracking id)."""
    return Event(
        event_id=uuid.uuid4().hex, type=kind, recipient=address, occurred_at=at, source="webhook:generic"
    )


def pixel(tid: str, at: datetime | None = None) -> Event:
    return Event(
        event_id=uuid.uuid4().hex, type=EventType.OPENED, tracking_id=tid, occurred_at=at or utcnow(),
        ip="203.0.113.9", user_agent="Mozilla/5.0", source="pixel",
    )  # fmt: skip


async def stored(db: Database, event_id: str) -> dict[str, Any] | None:
    async with db.read_engine.connect() as conn:
        row = (await conn.execute(select(EVENTS).where(EVENTS.c.event_id == event_id))).mappings().first()
    return dict(row) if row else None


async def counts(db: Database, campaign: str, *names: str) -> dict[str, int]:
    """The kept statistics, and the same recounted from stored events (``refresh``)."""
    kept = await statistics.read_statistics(db, campaign)
    refreshed = await statistics.refresh(db, campaign)
    assert {n: refreshed[n] for n in names} == {n: kept[n] for n in names}
    return {n: kept[n] for n in names}


def metric(name: str, **labels: str) -> float:
    return metric_value(generate_latest(aggregator_metrics.REGISTRY).decode(), name, **labels)


# -- address-only events are time-bounded ------------------------------------------------------


async def test_a_complaint_for_an_address_never_mailed_waits_for_no_later_copy(db: Database) -> None:
    """Issue 14, finding 2: before, the complaint waited parked and went to the first copy
    ever sent to the address (and stopped the recipient's mail); now it never does."""
    tag = uuid.uuid4().hex[:8]
    campaign, address = f"poison/{tag}", f"eve@{tag}.example"
    now = utcnow()
    complaint = webhook(EventType.COMPLAINED, address, now)
    assert (await apply_batch(db, [complaint])).parked == 1
    # The first copy to that address, relayed an hour later (the proxy's time).
    tid = str(uuid.uuid4())
    await apply_batch(db, [sent(tid, campaign, address, now + timedelta(hours=1))])
    await adopt_parked(db)
    row = await stored(db, complaint.event_id)
    assert row is not None and not row["applied"] and row["tracking_id"] is None
    assert await counts(db, campaign, "sent_count", "complained_count") == {
        "sent_count": 1,
        "complained_count": 0,
    }


async def test_a_time_stated_later_than_the_arrival_reaches_no_later_copy(db: Database) -> None:
    """A provider (or anyone posting webhooks) states a time in the future: the event's time
    is its arrival, so copies relayed after it are out of reach, however late it says."""
    tag = uuid.uuid4().hex[:8]
    campaign, address = f"future/{tag}", f"fay@{tag}.example"
    now = utcnow()
    older = str(uuid.uuid4())
    await apply_batch(db, [sent(older, campaign, address, now - timedelta(days=2))])
    bounce = webhook(EventType.BOUNCED, address, now + timedelta(hours=20))
    complaint = webhook(EventType.COMPLAINED, f"gil@{tag}.example", now + timedelta(hours=20))
    await apply_batch(db, [bounce, complaint])
    newer = str(uuid.uuid4())
    later = sent(newer, campaign, address, now + timedelta(hours=1))
    await apply_batch(db, [later, sent(str(uuid.uuid4()), campaign, f"gil@{tag}.example", later.occurred_at)])
    await adopt_parked(db)
    bounced = await stored(db, bounce.event_id)
    assert bounced is not None and bounced["tracking_id"] == older  # the copy relayed before it arrived
    unclaimed = await stored(db, complaint.event_id)
    assert unclaimed is not None and not unclaimed["applied"]
    assert await counts(db, campaign, "bounced_count", "complained_count") == {
        "bounced_count": 1,
        "complained_count": 0,
    }


def ack_subject(stored_at: datetime, sequence: int) -> bytes:
    """JetStream's acknowledgement subject, which carries the time the stream stored the message."""
    nanos = int(stored_at.timestamp() * 1e9)
    return f"$JS.ACK.MAILBEACON_EVENTS.aggregator.1.{sequence}.{sequence}.{nanos}.0".encode()


async def test_the_arrival_is_the_time_the_stream_stored_the_event(db: Database) -> None:
    """Arrival is JetStream's own time (in the acknowledgement subject), not the aggregator's
    clock: an event ingested a day after it reached the stream (a backlog) still attaches by
    the time it arrived, and keeps that time as its ``received_at``."""
    tag = uuid.uuid4().hex[:8]
    campaign, address = f"arrival/{tag}", f"hal@{tag}.example"
    now = utcnow()
    day_before, hours_ago = str(uuid.uuid4()), str(uuid.uuid4())
    await apply_batch(
        db,
        [
            sent(day_before, campaign, address, now - timedelta(days=2)),
            sent(hours_ago, campaign, address, now - timedelta(hours=2)),
        ],
    )
    arrived = now - timedelta(days=1)
    delivery = webhook(EventType.DELIVERED, address, now)  # its stated time: after both copies
    incoming = [decode(delivery.to_json())]
    on_time = arrivals(incoming, [ack_subject(arrived, 7)])
    assert set(on_time) == {delivery.event_id}
    assert abs(on_time[delivery.event_id] - arrived) < timedelta(milliseconds=1)
    await apply_prepared(db, prepare(incoming, db.dialect == "postgresql", on_time))
    row = await stored(db, delivery.event_id)
    assert row is not None and row["tracking_id"] == day_before
    assert abs(as_utc(row["received_at"]) - arrived) < timedelta(milliseconds=1)
    # Parked and claimed later, it is bounded by the same stored arrival.
    other = f"ida@{tag}.example"
    late = webhook(EventType.DELIVERED, other, now)
    parked = [decode(late.to_json())]
    await apply_prepared(
        db, prepare(parked, db.dialect == "postgresql", arrivals(parked, [ack_subject(arrived, 8)]))
    )
    await apply_batch(db, [sent(str(uuid.uuid4()), campaign, other, now - timedelta(hours=2))])
    await adopt_parked(db)
    row = await stored(db, late.event_id)
    assert row is not None and not row["applied"]


async def test_the_consumer_bounds_address_only_events_by_their_arrival(nc: NATS, database_url: str) -> None:
    """Through JetStream: a complaint stating a time a day ahead, then a copy relayed an hour
    from now, stay apart; the parked complaint's ``received_at`` is its arrival."""
    db = open_database(database_url)
    await migrate(db)
    consumer = EventConsumer(nc.jetstream(), db, batch_size=50)
    tag = uuid.uuid4().hex[:8]
    campaign, address = f"stream/{tag}", f"jo@{tag}.example"
    now = utcnow()
    complaint = webhook(EventType.COMPLAINED, address, now + timedelta(hours=23))
    copy = sent(str(uuid.uuid4()), campaign, address, now + timedelta(hours=1))
    js = nc.jetstream()
    try:
        assert consumer.ingested_until() is None  # nothing known yet: nothing expires
        await consumer.start()
        published = datetime.now(UTC)
        await js.publish(complaint.subject, complaint.to_json(), headers={"Nats-Msg-Id": complaint.event_id})
        await eventually(lambda: stored(db, complaint.event_id))
        await js.publish(copy.subject, copy.to_json(), headers={"Nats-Msg-Id": copy.event_id})
        await eventually(lambda: stored(db, copy.event_id))
        await adopt_parked(db)
        row = await stored(db, complaint.event_id)
        assert row is not None and not row["applied"]
        assert abs(as_utc(row["received_at"]) - published) < timedelta(seconds=2)
        assert (await statistics.read_statistics(db, campaign))["complained_count"] == 0
        until = consumer.ingested_until()
        assert until is not None and abs(until - datetime.now(UTC)) < timedelta(seconds=5)
    finally:
        await consumer.stop()
        await db.dispose()


# -- expiry and the cap ------------------------------------------------------------------------


async def test_expired_parked_events_never_count(db: Database) -> None:
    """Expired events are deleted: a ``sent`` arriving afterwards finds nothing to apply, and
    a recount finds nothing to count, exactly as while they waited."""
    tag = uuid.uuid4().hex[:8]
    campaign, address = f"expire/{tag}", f"kim@{tag}.example"
    now = utcnow()
    waiting_tid = str(uuid.uuid4())
    unsubscribe = Event(
        event_id=uuid.uuid4().hex, type=EventType.UNSUBSCRIBED, tracking_id=waiting_tid, source="unsubscribe"
    )
    complaint = webhook(EventType.COMPLAINED, address, now)
    waiting = [pixel(waiting_tid), unsubscribe, complaint]
    live = str(uuid.uuid4())
    await apply_batch(db, [sent(live, campaign, f"lee@{tag}.example", now - timedelta(hours=1)), pixel(live)])
    assert (await apply_batch(db, waiting)).parked == 3
    parked_before = await count_parked(db)
    expired_before = metric("mailbeacon_aggregator_parked_events_expired_total", type="complained")

    # Not yet: the ingest clock is 71 hours on.
    await bound_parked(db, TTL, 1_000_000, now + TTL - timedelta(hours=1))
    assert await count_parked(db) == parked_before
    await bound_parked(db, TTL, 1_000_000, now + TTL + timedelta(seconds=1))
    for event in waiting:
        assert await stored(db, event.event_id) is None
    assert await count_parked(db) == parked_before - 3
    assert (
        metric("mailbeacon_aggregator_parked_events_expired_total", type="complained") == expired_before + 1
    )

    # Their copies appear (relayed within the complaint's five minutes, too late for the TTL).
    await apply_batch(
        db,
        [
            sent(waiting_tid, campaign, f"mo@{tag}.example", now),
            sent(str(uuid.uuid4()), campaign, address, now),
        ],
    )
    await adopt_parked(db)
    assert await counts(
        db, campaign, "sent_count", "unique_opens", "total_opens", "unsubscribed_count", "complained_count"
    ) == {
        "sent_count": 3,
        "unique_opens": 1,
        "total_opens": 1,
        "unsubscribed_count": 0,
        "complained_count": 0,
    }


async def test_a_flood_of_parked_events_is_capped_oldest_first(db: Database) -> None:
    """Issue 14, finding 6: each pixel for a made-up copy parks a row that nothing removed.
    Beyond the limit the oldest go, counted by type; the newest stay, and still apply."""
    first = [pixel(str(uuid.uuid4())) for _ in range(150)]
    second = [pixel(str(uuid.uuid4())) for _ in range(100)]
    await apply_batch(db, first)
    await asyncio.sleep(0.01)  # a later received_at for the second flood
    await apply_batch(db, second)
    assert await count_parked(db) == 250
    dropped_before = metric("mailbeacon_aggregator_parked_events_dropped_total", type="opened")
    await bound_parked(db, TTL, 120, None)  # no ingest clock yet: the cap alone
    assert await count_parked(db) == 120
    assert metric("mailbeacon_aggregator_parked_events_dropped_total", type="opened") == dropped_before + 130
    kept = {e.event_id for e in first + second if await stored(db, e.event_id) is not None}
    assert kept >= {e.event_id for e in second} and len(kept) == 120
    assert await drop_over_limit(db, 120) == {}  # nothing beyond the limit now
    # A survivor still finds its copy.
    survivor = second[-1]
    assert survivor.tracking_id is not None
    campaign = f"flood/{uuid.uuid4().hex[:8]}"
    await apply_batch(db, [sent(survivor.tracking_id, campaign, "nan@example.com", utcnow())])
    assert (await counts(db, campaign, "unique_opens"))["unique_opens"] == 1


async def test_replicas_bounding_at_once_drop_only_the_excess(database_url: str) -> None:
    replicas = [open_database(database_url) for _ in range(3)]
    await migrate(replicas[0])
    try:
        await apply_batch(replicas[0], [pixel(str(uuid.uuid4())) for _ in range(400)])
        await asyncio.gather(*(drop_over_limit(db, 100) for db in replicas))
        await asyncio.gather(*(expire_parked(db, utcnow() - TTL) for db in replicas))
        assert await count_parked(replicas[0]) == 100
    finally:
        for db in replicas:
            await db.dispose()


async def test_parked_events_are_found_through_their_indexes(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statements that look for parked events (expiry, the cap, the count, adoption, a
    new copy's address-only events) read a partial index, never the events table: there may
    be a million parked events among a billion."""
    statements: list[tuple[str, dict[str, Any]]] = []
    run = Bulk.run

    async def recording(self: Bulk, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        statements.append((sql, dict(params or {})))
        return await run(self, sql, params)

    monkeypatch.setattr(Bulk, "run", recording)
    now = utcnow()
    await apply_batch(db, [pixel(str(uuid.uuid4())) for _ in range(20)])
    await apply_batch(db, [webhook(EventType.COMPLAINED, "oz@example.com", now)])
    await apply_batch(db, [sent(str(uuid.uuid4()), "idx/c", "pat@example.com", now)])  # a new address
    await adopt_parked(db, since=now - timedelta(minutes=1))
    await count_parked(db)
    await bound_parked(db, TTL, 5, now + TTL)
    monkeypatch.setattr(Bulk, "run", run)
    wanted = [
        (sql, params)
        for sql, params in statements
        if "ORDER BY received_at" in sql or ":since" in sql or sql.startswith("SELECT count(*) FROM events")
    ]
    assert len(wanted) >= 6, [sql for sql, _ in statements]
    explain = "EXPLAIN" if db.dialect == "postgresql" else "EXPLAIN QUERY PLAN"
    async with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            await conn.execute(text("SET enable_seqscan = off"))  # as Bulk.planning_for_few_rows does
        for sql, params in wanted:
            plan = " ".join(str(row) for row in (await conn.execute(text(f"{explain} {sql}"), params)).all())
            assert "ix_events_parked" in plan, (sql, plan)  # ix_events_parked or ix_events_parked_since
            assert "Seq Scan on events" not in plan and "'SCAN events'" not in plan, (sql, plan)


# -- the suppression watch ---------------------------------------------------------------------


async def test_the_suppression_watch_forgets_expired_unsubscribes(nc: NATS, database_url: str) -> None:
    from aggregator.ingest.suppressions import SuppressionRecorder
    from mailbeacon.bus.jetstream import ensure_suppression_bucket
    from mailbeacon.bus.suppressions import SuppressionList
    from mailbeacon.contract.settings import Settings

    db = open_database(database_url)
    await migrate(db)
    bucket = await ensure_suppression_bucket(nc.jetstream(), Settings())
    recorder = SuppressionRecorder(db, SuppressionList(bucket))
    try:
        unsubscribe = Event(
            event_id=uuid.uuid4().hex,
            type=EventType.UNSUBSCRIBED,
            tracking_id=str(uuid.uuid4()),
            source="unsubscribe",
        )
        await apply_batch(db, [unsubscribe])
        await recorder.record([decode(unsubscribe.to_json())])
        assert list(recorder.watched) == [unsubscribe.event_id]
        await bound_parked(db, TTL, 1_000_000, utcnow() + TTL + timedelta(seconds=1))
        await recorder.check_parked()
        assert recorder.watched == {}
    finally:
        await db.dispose()


async def test_pixels_for_made_up_copies_stay_within_the_limit(
    tmp_path: Path, nats_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14, finding 6, over the whole pipeline: pixels fetched for random tracking ids
    (tracker → NATS → aggregator) park no more than PARKED_EVENT_LIMIT events, and the
    dropped ones are counted."""
    monkeypatch.setattr(aggregator_service, "PARKED_EVERY_SECONDS", 0.2)
    settings = make_settings(tmp_path, nats_url=nats_url, database_url=database_url, parked_event_limit=40)
    system = AllInOne(settings)
    addresses = await system.start()
    aggregator = system.components[0]
    assert isinstance(aggregator, aggregator_service.AggregatorService)
    dropped_before = metric("mailbeacon_aggregator_parked_events_dropped_total", type="opened")
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(120):
                async with http.get(f"{addresses.tracker}/track/pixel/{uuid.uuid4()}/") as response:
                    assert response.status == 200

        async def capped() -> bool:
            dropped = (
                metric("mailbeacon_aggregator_parked_events_dropped_total", type="opened") - dropped_before
            )
            return dropped == 80 and await count_parked(aggregator.db) == 40

        await eventually(capped, within=30)
    finally:
        await system.stop()


async def test_adoption_looks_at_recent_parked_events_and_now_and_then_at_all(db: Database) -> None:
    """Events parked while another replica created their message are adopted. Every round
    reads only those parked lately (a flood of a million parked events costs it nothing);
    a round over all of them finds an older one too."""
    older, recent = str(uuid.uuid4()), str(uuid.uuid4())
    await apply_batch(db, [pixel(older)])
    since = utcnow()
    await apply_batch(db, [pixel(recent)])
    # Their messages, stored by a transaction that did not see the parked events.
    async with db.writing() as conn:
        for tid in (older, recent):
            await conn.execute(
                text(
                    "INSERT INTO messages (tracking_id, campaign, recipient, status, sent_at, open_count, "
                    "click_count) VALUES (:tid, 'adopt/c', :r, 'sent', :at, 0, 0)"
                ),
                {"tid": tid, "r": f"{tid}@example.com", "at": since - timedelta(hours=1)},
            )
    assert (await adopt_parked(db, since=since)).applied == 1
    assert await count_parked(db) == 1
    assert (await adopt_parked(db)).applied == 1
    assert await count_parked(db) == 0


async def test_adoption_gives_address_only_events_only_to_copies_relayed_in_time(db: Database) -> None:
    """Adoption's SQL bound (the event's time plus five minutes) agrees with the rule on both
    databases: a copy relayed three minutes after the event takes it, one six minutes after
    does not."""
    at = utcnow()
    early, late = (
        webhook(EventType.DELIVERED, "quin@example.com", at),
        webhook(EventType.DELIVERED, "ray@example.com", at),
    )
    await apply_batch(db, [early, late])
    async with db.writing() as conn:
        for address, minutes in (("quin@example.com", 3), ("ray@example.com", 6)):
            sent_at = at + timedelta(minutes=minutes)
            await conn.execute(
                text(
                    "INSERT INTO messages (tracking_id, campaign, recipient, status, sent_at, open_count, "
                    "click_count) VALUES (:tid, 'adopt/skew', :r, 'sent', :at, 0, 0)"
                ),
                {
                    "tid": str(uuid.uuid4()),
                    "r": address,
                    "at": sent_at if db.dialect == "postgresql" else sqlite_time(sent_at),
                },
            )
    assert (await adopt_parked(db)).applied == 1
    taken, left = await stored(db, early.event_id), await stored(db, late.event_id)
    assert taken is not None and taken["applied"] and left is not None and not left["applied"]


@pytest.mark.slow
async def test_the_expiry_clock_follows_the_stream_while_ingest_catches_up(
    nc: NATS, database_url: str
) -> None:
    """After an outage the aggregator works through a backlog: its expiry clock is the
    stream time it has reached, not the wall clock, until it has caught up."""
    db = open_database(database_url)
    await migrate(db)
    js = nc.jetstream()
    events = [pixel(str(uuid.uuid4())) for _ in range(40)]
    for e in events:
        await js.publish(e.subject, e.to_json(), headers={"Nats-Msg-Id": e.event_id})
    published = datetime.now(UTC)
    await asyncio.sleep(2.0)  # the backlog is two seconds old when ingest starts
    consumer = EventConsumer(js, db, batch_size=5, pipeline=1, lanes=1)
    clocks: list[datetime | None] = []

    async def note(_: object) -> None:
        clocks.append(consumer.ingested_until())

    consumer.before_ack = note
    try:
        await consumer.start()
        await eventually(lambda: stored(db, events[-1].event_id))
        behind = [t for t in clocks if t is not None]
        assert behind and min(behind) <= published, clocks
        await eventually(lambda: _near_now(consumer.ingested_until()))
    finally:
        await consumer.stop()
        await db.dispose()


async def _near_now(moment: datetime | None) -> bool:
    return moment is not None and abs(moment - datetime.now(UTC)) < timedelta(seconds=1)
