"""Buffered pixel and click events published as JetStream fast batches, against a real
nats-server: all stored once, in order, duplicates skipped, flow control honoured, and
publishing one by one where the stream does not take fast batches."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from mailbeacon.bus import fast_batch
from mailbeacon.bus.jetstream import STREAM, provision, stream_config
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.events import Event, EventType, new_event_id
from tests.support import make_settings

TID = "0b7e4c2a-4f7e-4d8e-9a51-3c1f0f7d2b11"


@pytest.fixture
def nc(bare_nc: NATS) -> NATS:
    return bare_nc


def opens(n: int) -> list[Event]:
    return [
        Event(event_id=new_event_id(), type=EventType.OPENED, tracking_id=TID, source="pixel")
        for _ in range(n)
    ]


async def stored_ids(nc: NATS, subject: str = "mailbeacon.events.opened") -> list[str]:
    """Every stored event's id, in stream order."""
    js = nc.jetstream()
    subscription = await js.pull_subscribe(subject, durable=None, stream=STREAM)
    ids: list[str] = []
    try:
        while True:
            try:
                messages = await subscription.fetch(500, timeout=0.5)
            except TimeoutError:
                return ids
            for message in messages:
                ids.append(Event.model_validate_json(message.data).event_id)
                await message.ack()  # else the consumer stops at its ack-pending limit
    finally:
        await subscription.unsubscribe()


async def test_a_fast_batch_stores_every_message_once_in_order(nc: NATS, tmp_path: Path) -> None:
    js = nc.jetstream()
    await provision(js, make_settings(tmp_path))
    assert (await js.stream_info(STREAM)).config.allow_batched
    events = opens(1000)  # several flows: the publisher has to wait for the server's acks
    # One id already stored, one twice in the batch: both skipped, the batch goes on.
    await js.publish(
        "mailbeacon.events.opened",
        events[10].to_json(),
        headers={"Nats-Msg-Id": events[10].event_id},
    )
    messages = [
        fast_batch.outgoing(b"mailbeacon.events.opened", e.event_id, e.to_json())
        for e in [*events, events[20]]
    ]
    stored = await fast_batch.publish_fast_batch(nc, messages, patience=10)
    assert stored == len(messages)
    assert await stored_ids(nc) == [events[10].event_id] + [e.event_id for e in events if e is not events[10]]


@pytest.mark.slow
async def test_the_publisher_uses_fast_batches_and_drains_once(nc: NATS, tmp_path: Path) -> None:
    js = nc.jetstream()
    await provision(js, make_settings(tmp_path))
    publisher = EventPublisher(js)
    events = opens(2000)
    for event in [*events, *events[:300]]:  # a buffer that holds repeats (a republish after doubt)
        assert publisher.publish_later(event)
    await publisher.close()
    assert publisher.buffered == 0 and publisher.fast_batches
    assert sorted(await stored_ids(nc)) == sorted(e.event_id for e in events)


async def test_a_stream_without_fast_batches_gets_events_one_by_one(nc: NATS, tmp_path: Path) -> None:
    """A stream provisioned before fast batches (or by hand) refuses the batch: nothing is
    lost, the publisher goes on event by event."""
    js = nc.jetstream()
    config: StreamConfig = stream_config(make_settings(tmp_path))
    await js.add_stream(config=config)
    assert not (await js.stream_info(STREAM)).config.allow_batched
    with pytest.raises(fast_batch.FastBatchesUnavailable):
        message = fast_batch.outgoing(b"mailbeacon.events.opened", "x1", b"{}")
        await fast_batch.publish_fast_batch(nc, [message], patience=5)
    publisher = EventPublisher(js)
    events = opens(300)
    for event in events:
        publisher.publish_later(event)
    await publisher.close()
    assert publisher.buffered == 0 and not publisher.fast_batches
    assert sorted(await stored_ids(nc)) == sorted(e.event_id for e in events)
    # Provisioning (any component starting) turns fast batches on for the existing stream.
    await provision(js, make_settings(tmp_path))
    assert (await js.stream_info(STREAM)).config.allow_batched


async def test_fast_batches_stay_off_when_the_settings_say_so(nc: NATS, tmp_path: Path) -> None:
    """A NATS cluster with servers older than 2.14 could not run a stream that allows them."""
    js = nc.jetstream()
    await provision(js, make_settings(tmp_path, stream_fast_batches=False))
    assert not (await js.stream_info(STREAM)).config.allow_batched
    publisher = EventPublisher(js)
    events = opens(50)
    for event in events:
        publisher.publish_later(event)
    await publisher.close()
    assert sorted(await stored_ids(nc)) == sorted(e.event_id for e in events)


def reply(data: bytes) -> Msg:
    return Msg(None, subject="_INBOX.x.128.fail.1.0.$FI", data=data)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("answers", "stored", "refused", "failed"),
    [
        # A server before 2.14 stores the first message as a single publish and says so.
        ([b'{"stream":"MAILBEACON_EVENTS","seq":7}'], 0, True, True),
        (
            [b'{"error":{"code":400,"err_code":10205,"description":"batch publish not enabled"}}'],
            0,
            True,
            True,
        ),
        ([b'{"type":"ack","seq":0,"msgs":128}', b'{"type":"ack","seq":128,"msgs":64}'], 128, False, False),
        # Stopped after it started: what was acknowledged stays, the rest is published again.
        (
            [b'{"type":"ack","seq":0,"msgs":128}', b'{"type":"err","seq":5,"error":{"code":400}}'],
            0,
            False,
            True,
        ),
        (
            [b'{"type":"ack","seq":128,"msgs":128}', b'{"type":"gap","last_seq":130,"seq":140}'],
            128,
            False,
            True,
        ),
        # Nothing a reply holds may raise inside nats-py's reader.
        ([b"not json"], 0, False, True),
        ([b"[1, 2]"], 0, False, True),
        ([b'{"type":"ack","seq":"x"}'], 0, False, True),
    ],
)
def test_what_the_server_answers_is_read_safely(
    answers: list[bytes], stored: int, refused: bool, failed: bool
) -> None:
    batch = fast_batch._Batch()
    for answer in answers:
        batch.on_reply(reply(answer))
    assert batch.stored == stored
    assert batch.not_enabled is refused
    assert (batch.failure is not None) is failed
