"""Times in webhooks: an authentic event is never refused for its time. The sender's time is
kept however old it is; one that cannot be a time (unreadable, before 1990, more than a day
ahead) gives way to the arrival time, with the stated one kept in ``metadata.stated_time``.
Never a 4xx or 5xx that makes a provider retry for days."""

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
from tracker.webhooks.esp import sendgrid
from tracker.webhooks.esp.base import timestamp_or
from tracker.webhooks.generic_webhooks import WebhookError, event_time, parse_timestamp

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
# Readable times no event can have: they would become a copy's first-seen time.
IMPLAUSIBLE_TIMESTAMPS: list[Any] = [
    12345,
    -5,
    "1970-01-01T00:00:00Z",  # Unix 0
    "0001-01-01T00:00:00Z",  # Go's and .NET's zero time
    "1989-12-31T23:59:59Z",
    "2099-01-01T00:00:00Z",
]


def stated(value: Any) -> Any:
    """How metadata.stated_time keeps a value: text and JSON-safe numbers as they are."""
    if isinstance(value, str) or (isinstance(value, int) and abs(value) < 2**53):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return json.dumps(value)[:100]


@pytest.mark.parametrize("value", ODD_TIMESTAMPS, ids=repr)
def test_parse_timestamp_refuses_with_a_webhook_error(value: Any) -> None:
    with pytest.raises(WebhookError) as refused:
        parse_timestamp(value)
    assert refused.value.status == 400
    received = datetime(2026, 11, 27, 12, tzinfo=UTC)
    assert timestamp_or(value, received) == received


@pytest.mark.parametrize("value", IMPLAUSIBLE_TIMESTAMPS, ids=repr)
def test_times_no_event_can_have_give_way_to_the_arrival_time(value: Any) -> None:
    received = datetime.now(UTC)
    assert timestamp_or(value, received) == received
    when = event_time(value, received)
    assert when.occurred_at == received
    assert when.metadata()["stated_time"] == value
    assert when.metadata()["stated_time_problem"].endswith(
        ("is before 1990", "is more than a day after its arrival")
    )


@pytest.mark.parametrize(
    "value",
    ["2024-01-01T12:00:00Z", "1990-01-01T00:00:00Z", 1461095250, "2016-04-27T16:28:50.3963933-04:00"],
    ids=repr,
)
def test_an_old_time_is_kept_however_old(value: Any) -> None:
    """Importing last year's bounces from another system is a real use."""
    received = datetime.now(UTC)
    when = event_time(value, received)
    assert when.occurred_at == parse_timestamp(value) < received - timedelta(days=366)
    assert when.metadata() == {}
    assert timestamp_or(value, received) == parse_timestamp(value)
    soon = received + timedelta(hours=23)  # a sender's clock a little ahead
    assert event_time(soon.isoformat(), received).occurred_at == soon


def test_edges_of_the_calendar_that_exist_in_utc_are_times() -> None:
    assert parse_timestamp("0001-01-01T05:00:00+05:00") == datetime(1, 1, 1, tzinfo=UTC)
    assert parse_timestamp("2026-11-27T10:00:00+01:00") == datetime(2026, 11, 27, 9, tzinfo=UTC)
    assert parse_timestamp(1764237600) == parse_timestamp(1764237600000) == parse_timestamp("1764237600")


@pytest.mark.parametrize("value", ODD_TIMESTAMPS + IMPLAUSIBLE_TIMESTAMPS, ids=repr)
async def test_odd_timestamps_over_http(tmp_path: Path, nats_url: str, value: Any) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        before = datetime.now(UTC)
        # The generic webhook describes one event: kept, at its arrival; a retry is the same event.
        body = json.dumps({"tracking_id": TID, "email": "ann@example.com", "timestamp": value}).encode()
        for _ in range(2):
            async with http.post(
                f"{tracker.url}/track/bounce/", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                assert response.status == 200, await response.text()
        # One record of a SendGrid batch: kept, at the time it was received.
        records = [
            {"event": "delivered", "email": "ann@example.com", "timestamp": now_ts(), "sg_event_id": "ok-1"},
            {"event": "delivered", "email": "bob@example.com", "timestamp": value, "sg_event_id": "odd-1"},
        ]
        batch = json.dumps(records).encode()
        status, answer = await post(http, f"{tracker.url}/webhooks/sendgrid", batch, sendgrid_headers(batch))
        after = datetime.now(UTC)
        assert (status, answer["stored"]) == (200, 2)

        async def all_three() -> list[Any]:
            events = await stream_events(nats_url)
            assert len(events) == 3
            return events

        events = {(e.source, e.recipient): e for e in await eventually(all_three)}
    ok = events[("webhook:sendgrid", "ann@example.com")]
    assert "stated_time" not in ok.metadata
    for odd in (
        events[("webhook:generic", "ann@example.com")],
        events[("webhook:sendgrid", "bob@example.com")],
    ):
        assert before - timedelta(seconds=1) <= odd.occurred_at <= after
        assert odd.metadata["stated_time"] == stated(value)
        assert odd.metadata["stated_time_problem"]


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

    from mailbeacon.contract.events import Event
    from tracker.webhooks.webhooks import invalid_event

    with pytest.raises(ValidationError) as refused:
        Event(event_id="x", type="bounced", bounce_kind="permanent")
    response = invalid_event(refused.value)
    assert response.status == 400
    assert response.text is not None and json.loads(response.text)["error"].startswith("bounce_kind:")
