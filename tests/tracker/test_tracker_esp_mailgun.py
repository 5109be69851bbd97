"""Mailgun webhooks: documented events normalized, HMAC signature, freshness and token replay."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from tests.esp_payloads.harness import (
    TRACKING_ID,
    load,
    mailgun_body,
    mailgun_legacy_form,
    now_ts,
    post,
    running_tracker,
    stream_events,
    verify_context,
    webhook_request,
)
from tracker.webhooks.esp import mailgun
from tracker.webhooks.esp.base import ParseContext, WebhookError

DOCUMENTED = load("mailgun_events.json")


def parse_one(name: str) -> tuple[object, ...] | None:
    result = mailgun.parse(webhook_request(mailgun_body(DOCUMENTED[name])), ParseContext())
    if not result.events:
        return None
    (e,) = result.events
    return (e.type.value, e.recipient, e.tracking_id, e.bounce_kind, e.reason, e.machine_kind)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("delivered", ("delivered", "ann@example.com", TRACKING_ID, None, "250 OK", None)),
        (
            "failed_permanent",
            (
                "bounced",
                "ben@example.com",
                None,
                "hard",
                "550 5.1.1 The email account that you tried to reach does not exist.",
                None,
            ),
        ),
        (
            "failed_temporary",
            (
                "deferred",
                "cy@example.com",
                "7c0c54a4-53a4-4b67-8d8f-35c6b1b5d9a2",
                None,
                "452 4.2.2 Mailbox full",
                None,
            ),
        ),
        (
            "failed_suppressed",
            (
                "failed",
                "old@example.com",
                None,
                None,
                "605 Not delivering to previously bounced address",
                None,
            ),
        ),
        ("opened", ("opened", "ann@example.com", TRACKING_ID, None, None, None)),
        ("clicked", ("clicked", "ann@example.com", TRACKING_ID, None, None, "security_scanner")),
        ("complained", ("complained", "ann@example.com", TRACKING_ID, None, None, None)),
        ("unsubscribed", ("unsubscribed", "eve@example.com", None, None, None, None)),
        ("accepted", None),
    ],
)
def test_documented_events_are_normalized(name: str, expected: tuple[object, ...] | None) -> None:
    assert parse_one(name) == expected


def test_event_id_is_stable_across_retries_and_keeps_the_payload() -> None:
    first = mailgun.parse(webhook_request(mailgun_body(DOCUMENTED["clicked"])), ParseContext()).events[0]
    retry = mailgun.parse(webhook_request(mailgun_body(DOCUMENTED["clicked"])), ParseContext()).events[0]
    assert first.event_id == retry.event_id == "webhook:mailgun:Ase7i2zsRYeDXztHGENqRB:1764237606.0"
    assert first.url == "https://shop.example.com/spring"
    assert first.metadata["payload"]["client-info"]["client-type"] == "robot"
    assert first.metadata["message_id"] == "20261127100000.1.ABCDEF@mg.example.com"


def test_bot_flag_of_mailgun_marks_apple_proxy_opens() -> None:
    opened = {
        **DOCUMENTED["opened"],
        "client-info": {"client-type": "browser", "bot": "apple", "user-agent": "Mozilla/5.0"},
    }
    (event,) = mailgun.parse(webhook_request(mailgun_body(opened)), ParseContext()).events
    assert (event.machine, event.machine_kind) == (True, "apple_privacy_proxy")


@pytest.mark.parametrize("body", [b"[]", b"nope", json.dumps({"signature": {}}).encode()])
def test_malformed_bodies_are_400(body: bytes) -> None:
    with pytest.raises(WebhookError) as refused:
        mailgun.parse(webhook_request(body), ParseContext())
    assert refused.value.status == 400


async def test_signature_freshness_and_token_replay(tmp_path: Path) -> None:
    """The token is the replay key: another event-data under the same signature is the same
    key (the shared replay guard then compares the bodies)."""
    context = verify_context(tmp_path)
    body = mailgun_body(DOCUMENTED["delivered"], token="t" * 50, timestamp=now_ts())
    swapped = json.loads(body)
    swapped["event-data"] = DOCUMENTED["complained"]
    first = await mailgun.verify(webhook_request(body), context)
    again = await mailgun.verify(webhook_request(json.dumps(swapped).encode()), context)
    assert first.replay_key == again.replay_key == "mailgun:" + "t" * 50
    with pytest.raises(WebhookError) as wrong_key:
        await mailgun.verify(webhook_request(mailgun_body(DOCUMENTED["delivered"], key="key-other")), context)
    assert wrong_key.value.status == 401
    with pytest.raises(WebhookError) as stale:
        await mailgun.verify(
            webhook_request(mailgun_body(DOCUMENTED["delivered"], timestamp=now_ts() - 3600)), context
        )
    assert stale.value.status == 403


async def test_over_http_stores_events_and_acknowledges_what_it_cannot_use(
    tmp_path: Path, nats_url: str
) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        url = f"{tracker.url}/webhooks/mailgun"
        for name in ("delivered", "failed_permanent", "accepted"):
            status, answer = await post(
                http, url, mailgun_body(DOCUMENTED[name]), {"Content-Type": "application/json"}
            )
            assert status == 200, answer
        assert answer == {
            "status": "success",
            "message": "event 'accepted' ignored",
            "stored": 0,
            "ignored": 1,
        }
    assert [e.type.value for e in await stream_events(nats_url)] == ["delivered", "bounced"]


# Mailgun's last word after hours of temporary refusals: reason "old". The reply it gave up on
# and Mailgun's description are both kept; the event may still say severity "temporary".
GAVE_UP = {
    **DOCUMENTED["failed_temporary"],
    "id": "0ldR3tr1esExhausted",
    "reason": "old",
    "delivery-status": {
        "attempt-no": 9,
        "code": 452,
        "message": "Too old",
        "description": "4.2.2 The email account that you tried to reach is over quota.",
        "session-seconds": 0.0,
    },
}


@pytest.mark.parametrize("severity", ["temporary", "permanent"])
@pytest.mark.parametrize(
    "status",
    [
        GAVE_UP["delivery-status"],
        {
            **GAVE_UP["delivery-status"],
            "message": "4.2.2 The email account that you tried to reach is over quota.",
            "description": "Too old",
        },
    ],
    ids=["description-says-why", "message-says-why"],
)
def test_retries_exhausted_is_a_soft_bounce_with_the_last_refusal(
    severity: str, status: dict[str, object]
) -> None:
    (event,) = mailgun.parse(
        webhook_request(mailgun_body({**GAVE_UP, "severity": severity, "delivery-status": status})),
        ParseContext(),
    ).events
    assert (event.type.value, event.bounce_kind, event.recipient) == ("bounced", "soft", "cy@example.com")
    assert event.reason is not None and event.reason.startswith("452 ")
    assert "over quota" in event.reason and "Too old" in event.reason


def test_a_reply_and_a_description_that_say_the_same_are_said_once() -> None:
    status = {"code": 450, "message": "Greylisted", "description": "Greylisted"}
    (event,) = mailgun.parse(
        webhook_request(mailgun_body({**DOCUMENTED["failed_temporary"], "delivery-status": status})),
        ParseContext(),
    ).events
    assert (event.type.value, event.reason) == ("deferred", "450 Greylisted")


REJECTED = {
    "event": "rejected",
    "id": "r3J3ct3d0001",
    "timestamp": 1764237609.1,
    "reject": {"reason": "Sandbox subdomains are for test purposes only.", "description": ""},
    "message": {
        "headers": {"to": "Ann Example <Ann@Example.com>", "message-id": "20261127.1@mg.example.com"}
    },
}


def test_rejected_names_its_recipient_by_the_to_header_as_anymail_does() -> None:
    (event,) = mailgun.parse(webhook_request(mailgun_body(REJECTED)), ParseContext()).events
    assert (event.type.value, event.recipient, event.tracking_id) == ("failed", "ann@example.com", None)
    assert event.reason == "Sandbox subdomains are for test purposes only."
    # Several addresses in To: which copy it was is unknown, so no address is guessed.
    several = {**REJECTED, "message": {"headers": {"to": "ann@example.com, Ben <ben@example.com>"}}}
    result = mailgun.parse(webhook_request(mailgun_body(several)), ParseContext())
    assert (result.events, result.ignored) == ([], 1)
    # The recipient Mailgun names wins over the header.
    named = {**REJECTED, "recipient": "cy@example.com"}
    (event,) = mailgun.parse(webhook_request(mailgun_body(named)), ParseContext()).events
    assert event.recipient == "cy@example.com"


async def test_legacy_form_webhooks_are_refused_with_the_answer_mailgun_does_not_retry(
    tmp_path: Path, nats_url: str
) -> None:
    form = mailgun_legacy_form({"event": "delivered", "recipient": "ann@example.com"})
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        status, answer = await post(http, f"{tracker.url}/webhooks/mailgun", form, headers)
        assert (status, answer) == (406, {"status": "error", "error": mailgun.LEGACY_REFUSED})
        # Anything else that is not JSON is still a malformed body.
        status, _ = await post(http, f"{tracker.url}/webhooks/mailgun", b"event=delivered", headers)
        assert status == 400
    assert await stream_events(nats_url) == []
