"""The aggregator's pull feed over its lean NATS connection, against a real nats-server.

The feed must deliver every stored message (with or without headers), acknowledge a
whole batch in one write, survive the server restarting under it, and behave the same
over nats-py (used for URLs the lean connection does not speak). The consumer on top
terminates a malformed message instead of letting it be redelivered forever.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo
from prometheus_client import generate_latest

from aggregator import metrics as aggregator_metrics
from aggregator.ingest.consumer import EventConsumer
from aggregator.ingest.feed import ACK, TERM, Delivery, PullFeed, delivery_info, nak
from aggregator.ingest.ingest import adopt_parked, apply_batch
from aggregator.ingest.wire import Server, Unsupported, WireConnection
from aggregator.read.statistics import read_statistics
from aggregator.store.db import Database, open_database
from aggregator.store.migrate import migrate
from mailbeacon.app.embedded_nats import EmbeddedNats, nats_server_binary
from mailbeacon.bus.jetstream import CONSUMER, STREAM, connect
from mailbeacon.contract.events import Event
from tests.aggregator.test_aggregator_crash import CAMPAIGNS, generate, recount
from tests.support import eventually, free_port, metric_value


def invalid_events() -> float:
    return metric_value(
        generate_latest(aggregator_metrics.REGISTRY).decode(), "mailbeacon_aggregator_invalid_events_total"
    )


def event(kind: str = "opened", **fields: object) -> dict[str, object]:
    return {"event_id": uuid.uuid4().hex, "type": kind, "occurred_at": "2026-03-02T08:00:00+00:00", **fields}


async def publish(nc: NATS, events: list[dict[str, object]], *, headers: bool = True) -> None:
    js = nc.jetstream()
    for e in events:
        hdrs = {"Nats-Msg-Id": str(e["event_id"])} if headers else None
        await js.publish(f"mailbeacon.events.{e['type']}", json.dumps(e).encode(), headers=hdrs)


async def consumer_info(nc: NATS) -> ConsumerInfo:
    return await nc.jetstream().consumer_info(STREAM, CONSUMER)


async def take_all(feed: PullFeed, count: int, within: float = 10.0) -> list[Delivery]:
    taken: list[Delivery] = []
    deadline = asyncio.get_running_loop().time() + within
    while len(taken) < count and asyncio.get_running_loop().time() < deadline:
        taken += await feed.take(wait=0.2)
    return taken


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "nats-py"])
async def test_feed_delivers_every_message_and_acks_them_in_one_go(nc: NATS, lean: bool) -> None:
    feed = PullFeed(nc, STREAM, CONSUMER, batch=50, lean=lean)
    await feed.start()
    try:
        sent = [event() for _ in range(120)]
        await publish(nc, sent[:60])
        await publish(nc, sent[60:], headers=False)  # stored without headers: delivered as MSG
        taken = await take_all(feed, 120)
        assert sorted(json.loads(payload)["event_id"] for _, payload in taken) == sorted(
            str(e["event_id"]) for e in sent
        )
        assert await feed.take(wait=0.1) == []  # nothing twice
        info = delivery_info(taken[-1][0])
        assert info is not None and info.pending == 0 and info.delivered == 1

        assert await feed.settle([reply for reply, _ in taken], ACK)

        async def all_acked() -> bool:
            state = await consumer_info(nc)
            return state.num_ack_pending == 0 and state.ack_floor.stream_seq == 120

        await eventually(all_acked)
    finally:
        await feed.stop()


async def test_nak_redelivers_and_term_does_not(nc: NATS) -> None:
    feed = PullFeed(nc, STREAM, CONSUMER, batch=10)
    await feed.start()
    try:
        await publish(nc, [event(), event()])
        first, second = await take_all(feed, 2)
        await feed.settle([first[0]], nak(0.1))
        await feed.settle([second[0]], TERM)
        again = await take_all(feed, 1)
        assert [payload for _, payload in again] == [first[1]]
        redelivered = delivery_info(again[0][0])
        assert redelivered is not None and redelivered.delivered == 2  # the consumer's backoff grows with it
        await feed.settle([again[0][0]], ACK)
        await eventually(lambda: _no_ack_pending(nc))
        assert await feed.take(wait=0.3) == []
    finally:
        await feed.stop()


async def _no_ack_pending(nc: NATS) -> bool:
    return (await consumer_info(nc)).num_ack_pending == 0


async def test_feed_reconnects_after_the_server_restarts(nats_server: EmbeddedNats, nc: NATS) -> None:
    feed = PullFeed(nc, STREAM, CONSUMER, batch=20)
    await feed.start()
    try:
        await publish(nc, [event() for _ in range(30)])
        before = await take_all(feed, 30)
        assert len(before) == 30
        nats_server.stop()
        await eventually(lambda: _is(not feed.connected))
        nats_server.start()  # same port, same JetStream store
        await eventually(lambda: _is(feed.connected and nc.is_connected), within=15)
        # Acknowledgements name their message, so they count on the new connection too.
        assert await feed.settle([reply for reply, _ in before], ACK)
        later = [event() for _ in range(25)]
        await publish(nc, later)
        after = await take_all(feed, 25, within=15)
        assert sorted(json.loads(p)["event_id"] for _, p in after) == sorted(
            str(e["event_id"]) for e in later
        )
        await feed.settle([reply for reply, _ in after], ACK)
        await eventually(lambda: _no_ack_pending(nc))
    finally:
        await feed.stop()


async def _is(value: bool) -> bool:
    return value


async def test_the_last_acknowledgements_reach_the_server_before_the_feed_stops(nc: NATS) -> None:
    """A stopping aggregator acknowledges its last batches and closes its feed at once. With
    pull requests outstanding the server keeps delivering, the closed socket is reset, and
    the acknowledgements it had not sent yet were lost: JetStream delivered those events
    again after the ack wait (stored twice over, then dropped as duplicates), at every stop.
    A big batch makes it certain: its acknowledgements outgrow the socket buffers."""
    js = nc.jetstream()
    name, batch = "big-batches", 20_000
    config = ConsumerConfig(
        durable_name=name,
        ack_policy=AckPolicy.EXPLICIT,
        filter_subject="mailbeacon.events.>",
        max_ack_pending=4 * batch,
    )
    await js.add_consumer(STREAM, config=config)
    for e in [event() for _ in range(2 * batch)]:  # more than taken: deliveries go on at the stop
        await js.publish_async(f"mailbeacon.events.{e['type']}", json.dumps(e).encode())
    await js.publish_async_completed()
    feed = PullFeed(nc, STREAM, name, batch=batch)
    await feed.start()
    try:
        taken = await take_all(feed, batch)
        assert await feed.settle([reply for reply, _ in taken], ACK)
    finally:
        await feed.stop()

    async def all_acked() -> bool:
        return (await js.consumer_info(STREAM, name)).ack_floor.stream_seq >= len(taken)

    await eventually(all_acked, within=5)  # well before the ack wait would redeliver them


@pytest.mark.slow
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "nats-py"])
async def test_refused_pull_requests_are_asked_again_with_a_pause(
    nc: NATS, lean: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """No one serves a consumer whose leader is being elected (a NATS node failed): every
    pull request is answered 503 at once. The feed must not ask again as fast as it is
    refused (thousands of requests and warnings a second), and must go on when it is served."""
    name = "elected-later"
    feed = PullFeed(nc, STREAM, name, batch=10, lean=lean)
    await feed.start()
    try:
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.5
        while loop.time() < until:
            assert await feed.take(wait=0.02) == []  # as the consumer's loop asks
        assert 3 <= feed.refusals <= 8  # about one a second once the pause is at its longest
        refusals = [r for r in caplog.records if "refused a pull request" in r.getMessage()]
        assert len(refusals) == 1 and "503" in refusals[0].getMessage()

        config = ConsumerConfig(
            durable_name=name, ack_policy=AckPolicy.EXPLICIT, filter_subject="mailbeacon.events.>"
        )
        await nc.jetstream().add_consumer(STREAM, config=config)
        await publish(nc, [event()])
        assert len(await take_all(feed, 1, within=3)) == 1  # served again within the longest pause
    finally:
        await feed.stop()


async def test_consumer_terminates_malformed_messages_and_stores_the_rest(nc: NATS, tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'feed.db'}")
    await migrate(db)
    invalid_before = invalid_events()
    consumer = EventConsumer(nc.jetstream(), db, batch_size=100)
    await consumer.start()
    try:
        tid = str(uuid.uuid4())
        good = [
            event("sent", tracking_id=tid, campaign="feed/test", recipient="ann@example.com"),
            event("opened", tracking_id=tid),
        ]
        await publish(nc, good[:1])
        await nc.jetstream().publish("mailbeacon.events.opened", b'{"event_id": "x", "type": "teleported"}')
        await nc.jetstream().publish("mailbeacon.events.opened", b"not json at all")
        await publish(nc, good[1:])

        async def stored() -> bool:
            stats = await read_statistics(db, "feed/test")
            return bool(stats.get("unique_opens") == 1 and stats.get("sent_count") == 1)

        await eventually(stored)
        await eventually(lambda: _no_ack_pending(nc))
        assert invalid_events() - invalid_before == 2
        assert (await consumer_info(nc)).num_redelivered == 0
        assert consumer.healthy
    finally:
        await consumer.stop()
        await db.dispose()


# -- the lean connection on its own ------------------------------------------------------------


def test_server_urls_are_read_like_nats_py() -> None:
    assert Server.from_url("nats://127.0.0.1:4333") == Server("127.0.0.1", 4333)
    # As written: nats-py sends "p%40ss", so must we (the server's password is those bytes).
    assert Server.from_url("nats://feed:p%40ss@nats.example:4222") == Server(
        "nats.example", 4222, user="feed", password="p%40ss"
    )
    assert Server.from_url("nats://s3cret@nats.example") == Server("nats.example", 4222, token="s3cret")
    assert Server.from_url("nats.example:4000") == Server("nats.example", 4000)
    # tls:// is spoken too (the TLS handshake after INFO: tests/mailbeacon/test_nats_auth.py); WebSocket is not.
    assert Server.from_url("tls://nats.example:4222") == Server("nats.example", 4222, tls=True)
    with pytest.raises(Unsupported):
        Server.from_url("wss://nats.example:443")


@pytest.fixture
def guarded_nats(tmp_path: Path) -> Iterator[int]:
    """A plain nats-server (no JetStream) that wants a user and password."""
    port = free_port()
    log = tmp_path / "guarded.log"
    process = subprocess.Popen(
        [
            str(nats_server_binary()),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "--user",
            "feed",
            "--pass",
            "s3%40cret",  # a password that looks percent-encoded, taken literally by nats-py
            "-l",
            str(log),
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        process.terminate()
        process.wait(10)


async def test_lean_connection_authenticates_and_refuses_bad_credentials(guarded_nats: int) -> None:
    received: list[tuple[bytes, bytes]] = []
    url = f"nats://feed:s3%40cret@127.0.0.1:{guarded_nats}"

    async def ready() -> bool:
        try:
            probe = await asyncio.open_connection("127.0.0.1", guarded_nats)
        except OSError:
            return False
        probe[1].close()
        return True

    await eventually(ready)
    conn = WireConnection(lambda: url, "test", lambda s, r, st, p: received.append((s, p)))
    await conn.start()
    publisher = await connect(url, "test-publisher")
    try:
        conn.subscribe(b"feed.test")
        await conn.drain()
        await asyncio.sleep(0.1)  # the SUB reaches the server before the publication
        await publisher.publish("feed.test", b"hello")
        await eventually(lambda: _is(received == [(b"feed.test", b"hello")]))
    finally:
        await publisher.close()
        await conn.stop()

    wrong = WireConnection(lambda: f"nats://feed:wrong@127.0.0.1:{guarded_nats}", "test", lambda *a: None)
    with pytest.raises(ConnectionError, match=r"(?i)authorization"):
        await wrong.start()


@pytest.mark.slow
async def test_consumer_lanes_store_each_message_after_its_sent(nc: NATS, database_url: str) -> None:
    """On PostgreSQL the consumer stores a batch in two lanes at once, split by tracking id.
    Every event of a message must still be stored after its ``sent`` (a later batch never
    overtakes an earlier one in its lane), and the statistics equal the recount."""
    db = open_database(database_url)
    await migrate(db)
    raw = generate(60, seed=21)
    sent_at = {e["tracking_id"]: i for i, e in enumerate(raw) if e["type"] == "sent"}
    # Each message's events after its ``sent``, messages interleaved: spread over many batches.
    # Address-only events last, after every message (len(raw) reads 0 while raw sorts).
    last = len(raw)
    raw.sort(key=lambda e: (sent_at.get(e.get("tracking_id"), last), e["type"] != "sent"))
    address_only = sum(1 for e in raw if not e.get("tracking_id"))
    parked_before = _parked_total()
    consumer = EventConsumer(nc.jetstream(), db, batch_size=25)
    assert consumer.lanes == (2 if db.dialect == "postgresql" else 1)
    await consumer.start()
    try:
        await publish(nc, raw)

        async def all_acknowledged() -> bool:
            info = await consumer_info(nc)
            return (
                info.num_pending == 0 and info.num_ack_pending == 0 and info.ack_floor.stream_seq >= len(raw)
            )

        await eventually(all_acknowledged, within=30)
        await adopt_parked(db)
        for campaign in CAMPAIGNS:
            expected = recount(raw, campaign)
            kept = await read_statistics(db, campaign)
            assert {k: kept[k] for k in expected} == expected
        # Address-only events come last, after their messages: none had to wait.
        assert address_only > 0 and _parked_total() == parked_before
    finally:
        await consumer.stop()
        await db.dispose()


def _parked_total() -> float:
    return metric_value(
        generate_latest(aggregator_metrics.REGISTRY).decode(), "mailbeacon_aggregator_events_parked_total"
    )


async def test_address_only_event_waits_for_the_lane_creating_its_message(
    nc: NATS, database_url: str
) -> None:
    """A bounce that names only the address belongs to the latest copy sent there, even when
    that copy's ``sent`` is stored by another lane of the same batch (a newsletter went
    to the same address earlier, in another campaign, and must not get the bounce)."""
    db = open_database(database_url)
    await migrate(db)
    address = "pat@example.com"
    older = event("sent", tracking_id=str(uuid.uuid4()), campaign="lanes/old", recipient=address)
    await apply_batch(db, [Event.model_validate(older)])
    consumer = EventConsumer(nc.jetstream(), db, batch_size=200)
    # All in one batch: the newer copy in the last lane, with enough events there to keep
    # that lane busy while the bounce is stored.
    newer = next(
        t for t in (str(uuid.uuid4()) for _ in range(100)) if hash(t) % consumer.lanes == consumer.lanes - 1
    )
    later = "2026-03-02T09:00:00+00:00"
    batch = [event("sent", tracking_id=newer, campaign="lanes/new", recipient=address, occurred_at=later)]
    batch += [event("opened", tracking_id=newer, occurred_at=later) for _ in range(60)]
    batch.append(
        event("bounced", recipient=address, bounce_kind="hard", occurred_at="2026-03-02T09:05:00+00:00")
    )
    await publish(nc, batch)
    await consumer.start()
    try:
        await eventually(lambda: _stats_say(db, "lanes/new", total_opens=60, bounced_count=1))
        assert (await read_statistics(db, "lanes/old")).get("bounced_count") == 0
    finally:
        await consumer.stop()
        await db.dispose()


async def _stats_say(db: Database, campaign: str, **expected: int) -> bool:
    stats = await read_statistics(db, campaign)
    return all(stats.get(name) == value for name, value in expected.items())
