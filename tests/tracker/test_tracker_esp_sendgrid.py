"""SendGrid Event Webhook: documented events normalized, ECDSA signature verified, retries deduplicated."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from tests.esp_payloads.harness import (
    TRACKING_ID,
    load,
    now_ts,
    post,
    running_tracker,
    sendgrid_headers,
    stream_events,
    verify_context,
    webhook_request,
)
from tracker.webhooks.esp import sendgrid
from tracker.webhooks.esp.base import ParseContext, WebhookError

DOCUMENTED = load("sendgrid_events.json")


def parse(records: list[dict[str, object]]) -> list[tuple[object, ...]]:
    result = sendgrid.parse(webhook_request(json.dumps(records).encode()), ParseContext())
    return [
        (e.event_id, e.type.value, e.recipient, e.tracking_id, e.bounce_kind, e.machine, e.machine_kind)
        for e in result.events
    ]


def test_documented_events_are_normalized() -> None:
    assert parse(DOCUMENTED) == [
        (
            "webhook:sendgrid:t7LEShmowp86DTdUW8M-GQ==",
            "deferred",
            "ann@example.com",
            TRACKING_ID,
            None,
            False,
            None,
        ),
        (
            "webhook:sendgrid:rWVYmVk90MjZJ9iohOBa3w==",
            "delivered",
            "ann@example.com",
            TRACKING_ID,
            None,
            False,
            None,
        ),
        (
            "webhook:sendgrid:FOTFFO0ecsBE-zxFXfs6WA==",
            "opened",
            "ann@example.com",
            TRACKING_ID,
            None,
            False,
            None,
        ),
        (
            "webhook:sendgrid:MPPopenHr8Q7Lq2v3oQ9dQ==",
            "opened",
            "ann@example.com",
            TRACKING_ID,
            None,
            True,
            "apple_privacy_proxy",
        ),
        (
            "webhook:sendgrid:kCAi1KttyQdEKHhdC-nuEA==",
            "clicked",
            "ann@example.com",
            TRACKING_ID,
            None,
            False,
            None,
        ),
        (
            "webhook:sendgrid:6g4ZI7SA-xmRDv57GoPIPw==",
            "bounced",
            "ben@example.com",
            None,
            "hard",
            False,
            None,
        ),
        ("webhook:sendgrid:bl0ckedVHq2Bxi9Jg3QqVQ==", "bounced", "cy@example.com", None, "soft", False, None),
        ("webhook:sendgrid:zmzJhfJgAfUSOW80yEbPyw==", "failed", "dee@example.com", None, None, False, None),
        (
            "webhook:sendgrid:37nvH5QBz858KGVYCM4uOA==",
            "complained",
            "ann@example.com",
            TRACKING_ID,
            None,
            False,
            None,
        ),
        (
            "webhook:sendgrid:Cb2_tRRbQyu9eqWVH0GSLg==",
            "unsubscribed",
            "eve@example.com",
            None,
            None,
            False,
            None,
        ),
        (
            "webhook:sendgrid:ahSCB7xYcXFb-hEaawsPRw==",
            "unsubscribed",
            "fay@example.com",
            None,
            None,
            False,
            None,
        ),
    ]  # processed and group_resubscribe are acknowledged, not recorded


def test_event_details_and_raw_payload_are_kept() -> None:
    # Received a minute after the documented events: a time more than a year before its
    # arrival is replaced by the arrival, so "now" would make this test expire.
    received_at = datetime.fromtimestamp(1764237660, UTC)
    body = json.dumps(DOCUMENTED).encode()
    result = sendgrid.parse(webhook_request(body, received_at=received_at), ParseContext())
    by_id = {e.event_id.rsplit(":", 1)[1]: e for e in result.events}
    bounce = by_id["6g4ZI7SA-xmRDv57GoPIPw=="]
    assert bounce.reason == "500 unknown recipient"
    assert bounce.metadata["payload"]["bounce_classification"] == "Invalid Address"
    assert bounce.occurred_at.timestamp() == 1764237606
    click = by_id["kCAi1KttyQdEKHhdC-nuEA=="]
    assert (click.url, click.ip) == ("https://shop.example.com/spring", "198.51.100.23")
    assert by_id["rWVYmVk90MjZJ9iohOBa3w=="].reason == "250 OK"
    assert by_id["zmzJhfJgAfUSOW80yEbPyw=="].reason == "Bounced Address"
    assert result.ignored == 2
    assert all(e.source == "webhook:sendgrid" for e in result.events)


def test_unknown_events_and_records_without_recipient_are_ignored_not_mistyped() -> None:
    records = [
        {"event": "brand_new_event", "email": "a@example.com", "sg_event_id": "x1"},
        {"event": "delivered", "sg_event_id": "x2"},  # names nobody
    ]
    result = sendgrid.parse(webhook_request(json.dumps(records).encode()), ParseContext())
    assert (result.events, result.ignored) == ([], 2)


@pytest.mark.parametrize("body", [b"{not json", b'"a string"', b"[1, 2]", b"\xff\xfe"])
def test_malformed_bodies_are_400(body: bytes) -> None:
    with pytest.raises(WebhookError) as refused:
        sendgrid.parse(webhook_request(body), ParseContext())
    assert refused.value.status == 400


async def test_signature_is_checked_over_timestamp_and_raw_body(tmp_path: Path) -> None:
    body = json.dumps(DOCUMENTED).encode()
    context = verify_context(tmp_path)
    headers = sendgrid_headers(body)
    assert (await sendgrid.verify(webhook_request(body, headers), context)).replay_key
    for tampered in (body.replace(b"ann@", b"eve@"), body + b" "):
        with pytest.raises(WebhookError) as refused:
            await sendgrid.verify(webhook_request(tampered, sendgrid_headers(body)), context)
        assert refused.value.status == 401
    # Signed for one second, presented as the next: the timestamp is part of what is signed.
    signed_at = now_ts() - 10
    shifted = {
        **sendgrid_headers(body, timestamp=signed_at),
        "X-Twilio-Email-Event-Webhook-Timestamp": str(signed_at + 1),
    }
    with pytest.raises(WebhookError) as refused:
        await sendgrid.verify(webhook_request(body, shifted), context)
    assert refused.value.status == 401


async def test_unconfigured_key_refuses_with_503(tmp_path: Path) -> None:
    body = b"[]"
    with pytest.raises(WebhookError) as refused:
        await sendgrid.verify(
            webhook_request(body, sendgrid_headers(body)), verify_context(tmp_path, sendgrid_public_key=None)
        )
    assert refused.value.status == 503
    assert "SENDGRID_PUBLIC_KEY" in refused.value.reason


async def test_signed_batch_over_http_is_stored_once_even_when_retried(tmp_path: Path, nats_url: str) -> None:
    body = json.dumps(DOCUMENTED).encode()
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        url = f"{tracker.url}/webhooks/sendgrid"
        first_sent = now_ts() - 30
        status, answer = await post(http, url, body, sendgrid_headers(body, timestamp=first_sent))
        assert (status, answer["stored"], answer["ignored"]) == (200, 11, 2)
        # SendGrid's retry is a later POST of the same events, signed again for its own time.
        status, answer = await post(http, url, body, sendgrid_headers(body))
        assert status == 200
        # The same signed bytes again (even with a re-randomized signature): the same body under
        # the same replay key, taken as a retry whose events are stored once (docs/tracker.md "ESP webhooks").
        status, answer = await post(http, url, body, sendgrid_headers(body, timestamp=first_sent))
        assert (status, answer["stored"]) == (200, 11)
    stored = await stream_events(nats_url)
    assert len(stored) == 11
    assert {e.type.value for e in stored} == {
        "deferred",
        "delivered",
        "opened",
        "clicked",
        "bounced",
        "failed",
        "complained",
        "unsubscribed",
    }
    assert all(e.metadata["payload"]["sg_event_id"] in e.event_id for e in stored)
