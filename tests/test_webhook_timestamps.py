"""Odd times in webhooks are the sender's mistake: a 400 with a reason (or, for one record of
an ESP batch, the receive time), never a 5xx that makes a provider retry for days."""

from __future__ import annotations

import base64
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.esp_payloads.harness import (
    now_ts,
    post,
    running_tracker,
    sendgrid_headers,
    sendgrid_private_key,
    stream_events,
    verify_context,
    webhook_request,
)
from tests.support import eventually
from tracker.esp import sendgrid
from tracker.esp.base import timestamp_or
from tracker.generic_webhooks import WebhookError, parse_timestamp

TID = "7a3e9c2d-4b1f-4e8a-9d6c-5f0b1a2c3d4e"

ODD_TIMESTAMPS: list[Any] = [
    "²",  # a digit to str.isdigit, not to float()
    "\uff10",  # fullwidth zero
    "١٧٦٤٢٣٧٦٠٠",  # Arabic-Indic digits
    "0001-01-01T00:00:00+05:00",  # before year 1 in UTC
    "9999-12-31T23:59:59-05:00",  # after year 9999 in UTC
    "99999999999999999999999999",
    10**30,
    -(10**30),
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "NaN",
    "1e999",
    "2026-13-45T99:00:00Z",
]
# Readable times no event of today can have: they would become a copy's first-seen time.
IMPLAUSIBLE_TIMESTAMPS: list[Any] = [12345, -5, "1970-01-01T00:00:00Z", "2099-01-01T00:00:00Z"]


@pytest.mark.parametrize("value", ODD_TIMESTAMPS, ids=repr)
def test_parse_timestamp_refuses_with_a_webhook_error(value: Any) -> None:
    with pytest.raises(WebhookError) as refused:
        parse_timestamp(value)
    assert refused.value.status == 400
    received = datetime(2026, 11, 27, 12, tzinfo=UTC)
    assert timestamp_or(value, received) == received


@pytest.mark.parametrize("value", IMPLAUSIBLE_TIMESTAMPS, ids=repr)
def test_times_far_from_arrival_give_way_to_the_arrival_time(value: Any) -> None:
    received = datetime.now(UTC)
    assert timestamp_or(value, received) == received
    yesterday = received - timedelta(days=1)
    assert timestamp_or(yesterday.isoformat(), received) == yesterday  # late, but plausible


def test_edges_of_the_calendar_that_exist_in_utc_are_times() -> None:
    assert parse_timestamp("0001-01-01T05:00:00+05:00") == datetime(1, 1, 1, tzinfo=UTC)
    assert parse_timestamp("2026-11-27T10:00:00+01:00") == datetime(2026, 11, 27, 9, tzinfo=UTC)
    assert parse_timestamp(1764237600) == parse_timestamp(1764237600000) == parse_timestamp("1764237600")


@pytest.mark.parametrize("value", ODD_TIMESTAMPS + IMPLAUSIBLE_TIMESTAMPS, ids=repr)
async def test_odd_timestamps_over_http(tmp_path: Path, nats_url: str, value: Any) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        # The generic webhook describes one event: its time is wrong, so the request is.
        body = json.dumps({"tracking_id": TID, "email": "ann@example.com", "timestamp": value}).encode()
        async with http.post(
            f"{tracker.url}/track/bounce/", data=body, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400
            answer = await response.json()
        assert answer["status"] == "error" and "timestamp" in answer["error"]
        # One record of a SendGrid batch: kept, at the time it was received.
        records = [
            {"event": "delivered", "email": "ann@example.com", "timestamp": now_ts(), "sg_event_id": "ok-1"},
            {"event": "delivered", "email": "bob@example.com", "timestamp": value, "sg_event_id": "odd-1"},
        ]
        batch = json.dumps(records).encode()
        before = datetime.now(UTC)
        status, answer = await post(http, f"{tracker.url}/webhooks/sendgrid", batch, sendgrid_headers(batch))
        after = datetime.now(UTC)
        assert (status, answer["stored"]) == (200, 2)

        async def both() -> list[Any]:
            events = await stream_events(nats_url)
            assert len(events) == 2
            return events

        events = {e.recipient: e for e in await eventually(both)}
    assert before - timedelta(seconds=1) <= events["bob@example.com"].occurred_at <= after


def _signed(body: bytes, stamp: str) -> dict[str, str]:
    signature = sendgrid_private_key().sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
    }


@pytest.mark.parametrize("stamp", ["²", "\uff19\uff19", "9" * 40])
async def test_odd_signed_timestamps_are_401_not_a_server_error(tmp_path: Path, stamp: str) -> None:
    body = b"[]"
    with pytest.raises(WebhookError) as refused:
        await sendgrid.verify(webhook_request(body, _signed(body, stamp)), verify_context(tmp_path))
    assert refused.value.status == 401


async def test_sendgrid_replay_is_keyed_on_what_was_signed_not_the_signature(tmp_path: Path) -> None:
    """ECDSA signatures are malleable, and SendGrid's are randomized: a second valid signature
    over the same timestamp and body is the same request replayed."""
    body = json.dumps([{"event": "delivered", "email": "a@example.com", "sg_event_id": "r1"}]).encode()
    context = verify_context(tmp_path)
    stamp = now_ts()
    first, second = sendgrid_headers(body, stamp), sendgrid_headers(body, stamp)
    assert first != second  # two different, equally valid signatures
    first_key = (await sendgrid.verify(webhook_request(body, first), context)).replay_key
    assert (
        first_key and (await sendgrid.verify(webhook_request(body, second), context)).replay_key == first_key
    )
    # A different body signed for the same second is a different request.
    other = body.replace(b"r1", b"r2")
    other_key = (
        await sendgrid.verify(webhook_request(other, sendgrid_headers(other, stamp)), context)
    ).replay_key
    assert other_key and other_key != first_key


def test_values_the_event_contract_refuses_are_a_400_with_the_field() -> None:
    """The last line of defence behind the parsers: the contract's refusal is the sender's to fix."""
    from pydantic import ValidationError

    from mailbeacon.events import Event
    from tracker.webhooks import invalid_event

    with pytest.raises(ValidationError) as refused:
        Event(event_id="x", type="bounced", bounce_kind="permanent")
    response = invalid_event(refused.value)
    assert response.status == 400
    assert response.text is not None and json.loads(response.text)["error"].startswith("bounce_kind:")
