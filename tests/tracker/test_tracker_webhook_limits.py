"""Webhook bodies the tracker cannot turn into storable events get a 4xx, never a 503 forever.

- Size: a body larger than one NATS message can carry (the server's max_payload, 1 MiB by
  default, less room for the event around the record) is a 413, as is an event that still
  outgrows a message once encoded. A 503 would make the provider retry it for days.
- Depth: JSON nested deeper than MAX_JSON_DEPTH (64) is a 400, in the body and in an SNS
  notification's Message; no depth raises RecursionError. Whatever depth the tracker takes,
  the aggregator stores (on SQLite and PostgreSQL): depth 250 used to be acknowledged and
  then dropped by the aggregator.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import select

from aggregator.ingest.consumer import EventConsumer
from aggregator.ingest.decode import InvalidEvent, decode
from aggregator.store.db import open_database
from aggregator.store.migrate import migrate
from aggregator.store.models import EVENTS
from mailbeacon.contract.events import Event, EventType
from mailbeacon.contract.settings import MAX_JSON_DEPTH_CEILING
from tests.esp_payloads.harness import (
    load,
    mailgun_body,
    now_ts,
    postmark_headers,
    running_tracker,
    sendgrid_headers,
    ses_event,
    sns_headers,
    sns_notification,
    stream_events,
)
from tests.support import eventually

NATS_DEFAULT_MAX_PAYLOAD = 1024 * 1024
FIVE_MIB = 5 * 1024 * 1024
TID = "0b9e8a5c-7d4e-4f0a-9a57-3c1f2d8e6b01"


def nested(depth: int) -> str:
    """JSON text nesting ``depth`` levels of objects and arrays (built as text: Python's own
    JSON writer would recurse)."""
    opening = "".join('{"deeper":' if level % 2 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 else "]" for level in reversed(range(depth)))
    return f'{opening}"bottom"{closing}'


def with_field(record: dict[str, Any], name: str, json_text: str) -> str:
    """``record`` as JSON with one more field holding ``json_text`` as it is."""
    return json.dumps(record)[:-1] + f', "{name}": {json_text}}}'


def postmark_bounce(**extra: Any) -> dict[str, Any]:
    return {**load("postmark_records.json")["Bounce"], "ID": uuid.uuid4().int % 10**15, **extra}


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def test_a_record_larger_than_a_nats_message_is_413(tmp_path: Path, nats_url: str) -> None:
    big = "x" * (2 * 1000 * 1000)
    sendgrid = json.dumps(
        [{"event": "bounce", "email": "ann@example.com", "sg_event_id": "big", "reason": big}]
    )
    requests = {
        "/webhooks/postmark": (json.dumps(postmark_bounce(Content=big)).encode(), postmark_headers()),
        "/webhooks/sendgrid": (sendgrid.encode(), sendgrid_headers(sendgrid.encode())),
        "/track/bounce/": (json.dumps({"tracking_id": TID, "note": big}).encode(), {}),
    }
    async with running_tracker(tmp_path, nats_url, max_webhook_bytes=FIVE_MIB) as tracker:
        assert tracker.publisher.max_payload == NATS_DEFAULT_MAX_PAYLOAD
        for path, (body, headers) in requests.items():
            status, answer = await post(f"{tracker.url}{path}", body, headers)
            assert status == 413, (path, answer)
            assert "bytes" in answer["error"]
        # Below the limit an operator may still lower it to: MAX_WEBHOOK_BYTES stays the upper bound.
    async with running_tracker(tmp_path, nats_url, max_webhook_bytes=4096) as tracker:
        body = json.dumps(postmark_bounce(Content="y" * 5000)).encode()
        status, answer = await post(f"{tracker.url}/webhooks/postmark", body, postmark_headers())
        assert status == 413 and "4096" in answer["error"]
    assert await stream_events(nats_url) == []


async def test_an_event_that_outgrows_a_nats_message_is_413(tmp_path: Path, nats_url: str) -> None:
    """Numbers written short in the body come out long in the event (9e15 is
    9000000000000000.0): it fits the body limit, never a NATS message."""
    record = (
        json.dumps(postmark_bounce()).rstrip("}") + ', "Numbers": [' + ",".join(["9e15"] * 150_000) + "]}"
    )
    assert len(record) < NATS_DEFAULT_MAX_PAYLOAD - 64 * 1024
    async with running_tracker(tmp_path, nats_url, max_webhook_bytes=FIVE_MIB) as tracker:
        status, answer = await post(f"{tracker.url}/webhooks/postmark", record.encode(), postmark_headers())
    assert status == 413 and "NATS" in answer["error"]
    assert await stream_events(nats_url) == []


def deep_requests(depth: int) -> dict[str, tuple[bytes, dict[str, str]]]:
    """A body of each kind nesting ``depth`` levels, its own brackets included."""
    generic = with_field({"tracking_id": TID}, "extra", nested(depth - 1)).encode()
    record = {"event": "delivered", "email": "a@example.com", "sg_event_id": uuid.uuid4().hex}
    sendgrid = f"[{with_field(record, 'x', nested(depth - 2))}]".encode()
    data = {"event": "delivered", "id": uuid.uuid4().hex, "timestamp": now_ts(), "recipient": "a@x.example"}
    envelope = json.loads(mailgun_body(data))
    mailgun = json.dumps(envelope)[:-1].replace(
        '"event-data": {', '"event-data": {"x": ' + nested(depth - 2) + ", "
    )
    ses = with_field(ses_event("Delivery", messageId=uuid.uuid4().hex), "x", nested(depth - 1))
    message = sns_notification(ses)  # the SNS envelope is flat: the SES event in its Message nests
    return {
        "/track/bounce/": (generic, {}),
        "/webhooks/sendgrid": (sendgrid, sendgrid_headers(sendgrid)),
        "/webhooks/mailgun": ((mailgun + "}").encode(), {}),
        "/webhooks/postmark": (
            with_field(postmark_bounce(), "X", nested(depth - 1)).encode(),
            postmark_headers(),
        ),
        "/webhooks/ses": (json.dumps(message).encode(), sns_headers(message)),
    }


@pytest.mark.parametrize("depth", [65, 250, 600, 100_000])
async def test_json_nested_too_deep_is_400_everywhere(tmp_path: Path, nats_url: str, depth: int) -> None:
    async with running_tracker(tmp_path, nats_url, max_webhook_bytes=FIVE_MIB) as tracker:
        for path, (body, headers) in deep_requests(depth).items():
            status, answer = await post(f"{tracker.url}{path}", body, headers)
            assert status == 400, (path, answer)
            assert "deeper than 64 levels" in answer["error"]
    assert await stream_events(nats_url) == []


async def test_the_deepest_json_taken_is_stored_by_the_aggregator(
    tmp_path: Path, nats_url: str, nc: NATS, database_url: str
) -> None:
    """What the tracker accepts (depth 64) the aggregator stores, the raw record intact."""
    async with running_tracker(tmp_path, nats_url) as tracker:
        for path, (body, headers) in deep_requests(64).items():
            status, answer = await post(f"{tracker.url}{path}", body, headers)
            assert status == 200, (path, answer)
    published = await stream_events(nats_url)
    assert len(published) == 5
    db = open_database(database_url)
    await migrate(db)
    consumer = EventConsumer(nc.jetstream(), db, batch_size=64)
    await consumer.start()
    try:

        async def stored() -> dict[str, Any]:
            async with db.read_engine.connect() as conn:
                rows = (await conn.execute(select(EVENTS.c.event_id, EVENTS.c.metadata))).all()
            assert len(rows) == 5
            return {event_id: metadata for event_id, metadata in rows}

        rows = await eventually(stored, within=30)
    finally:
        await consumer.stop()
        await db.dispose()
    for event in published:
        assert rows[event.event_id]["payload"] == event.metadata["payload"]


def test_the_aggregator_decodes_events_as_deep_as_any_tracker_takes() -> None:
    """However MAX_JSON_DEPTH is set (at most 128), its events decode; deeper ones are refused
    with a reason, before anything recursive reads them."""
    payload = json.loads(nested(MAX_JSON_DEPTH_CEILING))
    deepest = Event(event_id="generic:deep", type=EventType.BOUNCED, metadata={"payload": payload})
    assert decode(deepest.to_json()).metadata == deepest.metadata
    for depth in (MAX_JSON_DEPTH_CEILING + 1, 250, 100_000):
        data = (
            b'{"event_id":"x","type":"bounced","metadata":{"payload":' + b"[" * depth + b"]" * depth + b"}}"
        )
        with pytest.raises(InvalidEvent, match="nests deeper than"):
            decode(data)
