"""Postmark webhooks: documented records normalized, bounce types mapped, basic auth checked."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from tests.esp_payloads.harness import (
    TRACKING_ID,
    load,
    post,
    postmark_headers,
    running_tracker,
    stream_events,
    verify_context,
    webhook_request,
)
from tracker.webhooks.esp import postmark
from tracker.webhooks.esp.base import ParseContext, WebhookError

DOCUMENTED = load("postmark_records.json")


def parse(record: dict[str, object]) -> tuple[object, ...] | None:
    result = postmark.parse(webhook_request(json.dumps(record).encode()), ParseContext())
    if not result.events:
        return None
    (e,) = result.events
    return (e.event_id, e.type.value, e.recipient, e.tracking_id, e.bounce_kind, e.machine_kind)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "Bounce",
            (
                "webhook:postmark:bounce:4323372036854775807",
                "bounced",
                "ann@example.com",
                TRACKING_ID,
                "hard",
                None,
            ),
        ),
        (
            "SoftBounce",
            ("webhook:postmark:bounce:4323372036854775808", "bounced", "ben@example.com", None, "soft", None),
        ),
        ("AutoResponder", None),  # an out-of-office reply is not a delivery failure
        (
            "Delivery",
            (
                "webhook:postmark:883953f4-6105-42a2-a16a-77a8eac79483:delivery:ann@example.com",
                "delivered",
                "ann@example.com",
                TRACKING_ID,
                None,
                None,
            ),
        ),
        (
            "SpamComplaint",
            ("webhook:postmark:bounce:42", "complained", "ann@example.com", TRACKING_ID, None, None),
        ),
        ("Reactivation", None),
    ],
)
def test_documented_records(name: str, expected: tuple[object, ...] | None) -> None:
    assert parse(DOCUMENTED[name]) == expected


def test_opens_clicks_and_manual_unsubscribes() -> None:
    opened = postmark.parse(webhook_request(json.dumps(DOCUMENTED["Open"]).encode()), ParseContext()).events[
        0
    ]
    assert (opened.type.value, opened.ip, opened.machine) == ("opened", "188.2.95.4", False)
    clicked = postmark.parse(
        webhook_request(json.dumps(DOCUMENTED["Click"]).encode()), ParseContext()
    ).events[0]
    assert clicked.url == "https://shop.example.com/spring"
    # Opens carry no id of their own: a retry (same record) has the same id, another open another one.
    again = postmark.parse(webhook_request(json.dumps(DOCUMENTED["Open"]).encode()), ParseContext()).events[0]
    other = postmark.parse(
        webhook_request(json.dumps({**DOCUMENTED["Open"], "ReceivedAt": "2026-11-27T11:00:00Z"}).encode()),
        ParseContext(),
    ).events[0]
    assert opened.event_id == again.event_id != other.event_id


@pytest.mark.parametrize(
    ("suppression", "expected"),
    [
        ("ManualSuppression", ("unsubscribed", "ann@example.com", TRACKING_ID, None, None)),
        # What made Postmark stop sending, as anymail maps it: the copy bounced, or its recipient complained.
        ("HardBounce", ("bounced", "ann@example.com", TRACKING_ID, "hard", None)),
        ("SpamComplaint", ("complained", "ann@example.com", TRACKING_ID, None, None)),
        ("SomethingNew", None),
    ],
)
def test_subscription_changes_that_suppress(suppression: str, expected: tuple[object, ...] | None) -> None:
    parsed = parse({**DOCUMENTED["SubscriptionChange"], "SuppressionReason": suppression})
    assert (parsed[1:] if parsed else None) == expected


def test_a_manual_suppression_keeps_its_event_id() -> None:
    """The id it had before bounce and complaint suppressions were mapped: a retry stays one event."""
    parsed = parse(DOCUMENTED["SubscriptionChange"])
    assert parsed is not None and parsed[0] == (
        "webhook:postmark:883953f4-6105-42a2-a16a-77a8eac79483:unsubscribe:ann@example.com:"
        "2026-11-27T10:53:34.416071Z"
    )
    bounced = parse({**DOCUMENTED["SubscriptionChange"], "SuppressionReason": "HardBounce"})
    assert bounced is not None and bounced[0] != parsed[0]


def test_a_suppression_says_why_and_a_reactivation_is_acknowledged_without_an_event() -> None:
    record = {**DOCUMENTED["SubscriptionChange"], "SuppressionReason": "HardBounce"}
    (event,) = postmark.parse(webhook_request(json.dumps(record).encode()), ParseContext()).events
    assert event.reason == "Postmark suppressed the address: HardBounce (origin Recipient)"
    # SuppressSending false (anymail: subscribed): mailbeacon has no such event.
    for reactivation in (DOCUMENTED["Reactivation"], {**record, "SuppressSending": False}):
        result = postmark.parse(webhook_request(json.dumps(reactivation).encode()), ParseContext())
        assert (result.events, result.ignored) == ([], 1)


@pytest.mark.parametrize(
    ("bounce_type", "expected"),
    [
        ("Transient", ("deferred", None)),
        ("DnsError", ("deferred", None)),
        ("SpamNotification", ("bounced", "soft")),
        ("BadEmailAddress", ("bounced", "hard")),
        ("ManuallyDeactivated", ("failed", None)),
        ("Unsubscribe", ("unsubscribed", None)),
        ("ChallengeVerification", None),
        ("SomethingNew", None),
    ],
)
def test_bounce_types(bounce_type: str, expected: tuple[object, ...] | None) -> None:
    parsed = parse({**DOCUMENTED["Bounce"], "Type": bounce_type})
    assert ((parsed[1], parsed[4]) if parsed else None) == expected


@pytest.mark.parametrize("body", [b"[]", b"{}", b"<xml/>"])
def test_malformed_bodies_are_400(body: bytes) -> None:
    with pytest.raises(WebhookError) as refused:
        postmark.parse(webhook_request(body), ParseContext())
    assert refused.value.status == 400


async def test_basic_auth_when_configured(tmp_path: Path) -> None:
    body = json.dumps(DOCUMENTED["Delivery"]).encode()
    configured = verify_context(tmp_path)
    assert await postmark.verify(webhook_request(body, postmark_headers()), configured)
    for headers in ({}, postmark_headers("postmark:wrong"), {"Authorization": "Bearer x"}):
        with pytest.raises(WebhookError) as refused:
            await postmark.verify(webhook_request(body, headers), configured)
        assert refused.value.status == 401
    # Without credentials: open on loopback, refused (503, naming the setting) beyond it
    # unless the operator opted out.
    assert await postmark.verify(webhook_request(body), verify_context(tmp_path, postmark_basic_auth=None))
    exposed = verify_context(tmp_path, postmark_basic_auth=None, tracker_listen="0.0.0.0:8080")
    with pytest.raises(WebhookError) as unconfigured:
        await postmark.verify(webhook_request(body), exposed)
    assert unconfigured.value.status == 503 and "MAILBEACON_POSTMARK_BASIC_AUTH" in unconfigured.value.reason
    opted_out = verify_context(
        tmp_path, postmark_basic_auth=None, tracker_listen="0.0.0.0:8080", allow_unauthenticated_webhooks=True
    )
    assert await postmark.verify(webhook_request(body), opted_out)


async def test_over_http(tmp_path: Path, nats_url: str) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        url = f"{tracker.url}/webhooks/postmark"
        async with http.post(url, data=b"{}", headers={"Content-Type": "application/json"}) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Basic")
        for name in ("Bounce", "Delivery", "AutoResponder"):
            status, _ = await post(http, url, json.dumps(DOCUMENTED[name]).encode(), postmark_headers())
            assert status == 200
    assert [e.type.value for e in await stream_events(nats_url)] == ["bounced", "delivered"]
