"""Amazon SES through SNS: signed envelopes (v1 and v2), allowed topics, every SES event kind."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from tests.esp_payloads.harness import (
    CERT_URL,
    TOPIC,
    TRACKING_ID,
    FakeSns,
    post,
    running_tracker,
    ses_event,
    sns_certificate_pem,
    sns_headers,
    sns_notification,
    sns_subscription_confirmation,
    stream_events,
    verify_context,
    webhook_request,
)
from tracker.webhooks.esp import ses, sns
from tracker.webhooks.esp.base import ParseContext, WebhookError


def parse(message: dict[str, object]) -> list[tuple[object, ...]]:
    result = ses.parse(webhook_request(json.dumps(message).encode()), ParseContext())
    return [
        (e.type.value, e.recipient, e.tracking_id, e.bounce_kind, e.reason, e.machine_kind)
        for e in result.events
    ]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("Bounce", ("bounced", "ann@example.com", TRACKING_ID, "hard", "smtp; 550 5.1.1 user unknown", None)),
        ("Complaint", ("complained", "ann@example.com", TRACKING_ID, None, "abuse", None)),
        ("Delivery", ("delivered", "ann@example.com", TRACKING_ID, None, "250 2.6.0 Message received", None)),
        ("Open", ("opened", "ann@example.com", TRACKING_ID, None, None, None)),
        ("Click", ("clicked", "ann@example.com", TRACKING_ID, None, None, None)),
        ("Reject", ("failed", "ann@example.com", TRACKING_ID, None, "Bad content", None)),
        (
            "DeliveryDelay",
            (
                "deferred",
                "ann@example.com",
                TRACKING_ID,
                None,
                # Why SES waits (delayType), then what the receiving server said.
                "TransientCommunicationFailure: smtp; 421 4.4.1 Unable to connect to remote host",
                None,
            ),
        ),
    ],
)
def test_documented_event_publishing_kinds(kind: str, expected: tuple[object, ...]) -> None:
    assert parse(sns_notification(ses_event(kind))) == [expected]


def test_transient_identity_notification_bounces_every_recipient_soft() -> None:
    event = ses_event(
        "Bounce", identity_notification=True, destination=["a@example.com", "b@example.com"], tags={}
    )
    event["bounce"] = {
        **event["bounce"],
        "bounceType": "Transient",
        "bounceSubType": "MailboxFull",
        "bouncedRecipients": [
            {"emailAddress": "a@example.com"},
            {"emailAddress": "B@Example.com", "status": "4.2.2"},
        ],
    }
    event["mail"]["headers"] = []
    parsed = parse(sns_notification(event))
    # Two addresses on one message: the tag cannot say which copy, so the recipient decides.
    assert parsed == [
        ("bounced", "a@example.com", None, "soft", "Transient/MailboxFull", None),
        ("bounced", "b@example.com", None, "soft", "Transient/MailboxFull", None),
    ]


def test_a_delay_without_a_reply_still_says_why() -> None:
    event = ses_event("DeliveryDelay")
    event["deliveryDelay"] = {**event["deliveryDelay"], "delayType": "MailboxFull"}
    event["deliveryDelay"]["delayedRecipients"] = [{"emailAddress": "ann@example.com", "status": "4.2.2"}]
    assert parse(sns_notification(event))[0][4] == "MailboxFull"


def _several_bounced(**mail: object) -> dict[str, object]:
    event = ses_event("Bounce", **mail)
    event["bounce"] = {
        **event["bounce"],
        "bouncedRecipients": [
            {"emailAddress": "Ann@Example.com", "diagnosticCode": "smtp; 550 5.1.1 user unknown"},
            {"emailAddress": "bob@example.com", "diagnosticCode": "smtp; 550 5.2.1 disabled"},
            {"emailAddress": "cy@example.com"},
        ],
    }
    return event


def test_a_bounce_of_several_recipients_gives_the_tag_to_its_own_copy_only() -> None:
    """The proxy sends one copy per recipient, each tagged with its own tracking id: the tag of
    this message names Ann's copy. Bob and Cy belong to other copies, found by address."""
    parsed = parse(sns_notification(_several_bounced()))  # destination: ["ann@example.com"]
    assert [(recipient, tracking_id) for _, recipient, tracking_id, *_ in parsed] == [
        ("ann@example.com", TRACKING_ID),
        ("bob@example.com", None),
        ("cy@example.com", None),
    ]
    assert [reason for *_, reason, _ in parsed] == [
        "smtp; 550 5.1.1 user unknown",
        "smtp; 550 5.2.1 disabled",
        "Permanent/General",
    ]
    # Without a destination list, a tag cannot be given to one of several addresses.
    unknown_copy = parse(sns_notification(_several_bounced(destination=[])))
    assert [tracking_id for _, _, tracking_id, *_ in unknown_copy] == [None, None, None]
    # A message sent to several addresses at once is nobody's copy in particular.
    shared = parse(sns_notification(_several_bounced(destination=["ann@example.com", "bob@example.com"])))
    assert [tracking_id for _, _, tracking_id, *_ in shared] == [None, None, None]


def test_a_bounce_of_another_address_than_the_copys_is_not_given_the_tag() -> None:
    event = ses_event("Bounce", destination=["ann@example.com"])
    event["bounce"] = {**event["bounce"], "bouncedRecipients": [{"emailAddress": "forward@example.net"}]}
    assert parse(sns_notification(event))[0][1:3] == ("forward@example.net", None)
    event["mail"]["destination"] = []  # no destination given: the one address named is the copy's
    assert parse(sns_notification(event))[0][1:3] == ("forward@example.net", TRACKING_ID)


def test_tracking_id_falls_back_to_the_header_when_tags_are_absent() -> None:
    (event,) = ses.parse(
        webhook_request(json.dumps(sns_notification(ses_event("Delivery", tags={}))).encode()), ParseContext()
    ).events
    assert event.tracking_id == TRACKING_ID
    assert event.event_id.startswith("webhook:ses:EXAMPLE7c191be45")
    assert event.metadata["payload"]["delivery"]["processingTimeMillis"] == 546


def test_unknown_or_non_ses_messages_are_acknowledged_and_ignored() -> None:
    for message in (
        sns_notification("Successfully validated SNS topic for Amazon SES event publishing."),
        sns_notification(ses_event("Delivery") | {"eventType": "Send", "send": {}}),
        sns_notification({"eventType": "BrandNew", "mail": {}}),
    ):
        result = ses.parse(webhook_request(json.dumps(message).encode()), ParseContext())
        assert (result.events, result.ignored) == ([], 1)


def test_signing_certificate_host_is_checked_before_anything_is_fetched() -> None:
    assert sns.is_sns_url(CERT_URL, ".pem")
    assert sns.is_sns_url("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-x.pem", ".pem")
    for url in (
        "http://sns.us-east-1.amazonaws.com/cert.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example/cert.pem",
        "https://evil.example/sns.us-east-1.amazonaws.com/cert.pem",
        "https://user@sns.us-east-1.amazonaws.com/cert.pem",
        "https://sns.us-east-1.amazonaws.com:8443/cert.pem",
        "https://127.0.0.1/cert.pem",
        "https://sns.us-east-1.amazonaws.com/cert.txt",
        "https://s3.amazonaws.com/cert.pem",
    ):
        assert not sns.is_sns_url(url, ".pem"), url


async def test_certificates_come_from_the_directory_else_a_verified_fetch(tmp_path: Path) -> None:
    fake = FakeSns()
    store = sns.Certificates(tmp_path, fake.get)
    (tmp_path / "SimpleNotificationService-a.pem").write_bytes(sns_certificate_pem())
    pem = await store.load("https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-a.pem")
    assert pem == sns_certificate_pem() and fake.requests == []
    with pytest.raises(WebhookError) as refused:
        await store.load("https://attacker.example/SimpleNotificationService-a.pem")
    assert refused.value.status == 401 and fake.requests == []
    with pytest.raises(WebhookError) as unavailable:  # not provided: fetched (here the fake fails)
        await store.load("https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-b.pem")
    assert unavailable.value.status == 503
    assert fake.requests == ["https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-b.pem"]


@pytest.mark.parametrize("version", ["1", "2"])
async def test_both_signature_versions_verify_and_tampering_fails(tmp_path: Path, version: str) -> None:
    context = verify_context(tmp_path)
    message = sns_notification(
        ses_event("Delivery"), version=version, subject="Amazon SES Email Event Notification"
    )
    assert await ses.verify(webhook_request(json.dumps(message).encode(), sns_headers(message)), context)
    tampered = {**message, "Message": message["Message"].replace("ann@", "eve@")}
    with pytest.raises(WebhookError) as refused:
        await ses.verify(webhook_request(json.dumps(tampered).encode()), context)
    assert refused.value.status == 401


async def test_topics_age_and_configuration(tmp_path: Path) -> None:
    context = verify_context(tmp_path)
    foreign = sns_notification(ses_event("Delivery"), topic="arn:aws:sns:us-east-1:999999999999:other")
    with pytest.raises(WebhookError) as refused:
        await ses.verify(webhook_request(json.dumps(foreign).encode()), context)
    assert refused.value.status == 403
    old = sns_notification(ses_event("Delivery"), at=datetime.now(UTC) - timedelta(hours=2))
    with pytest.raises(WebhookError) as stale:
        await ses.verify(webhook_request(json.dumps(old).encode()), context)
    assert stale.value.status == 403
    with pytest.raises(WebhookError) as unconfigured:
        await ses.verify(
            webhook_request(json.dumps(old).encode()), verify_context(tmp_path, ses_topic_arns="")
        )
    assert unconfigured.value.status == 503


async def test_subscription_is_confirmed_only_for_allowed_topics(tmp_path: Path, nats_url: str) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        url = f"{tracker.url}/webhooks/ses"
        foreign = sns_subscription_confirmation(topic="arn:aws:sns:us-east-1:999999999999:other")
        status, _ = await post(http, url, json.dumps(foreign).encode(), sns_headers(foreign))
        assert status == 403 and tracker.sns.requests == []
        allowed = sns_subscription_confirmation()
        status, answer = await post(http, url, json.dumps(allowed).encode(), sns_headers(allowed))
        assert (status, answer["message"]) == (200, "subscription confirmation")
        assert tracker.sns.requests == [allowed["SubscribeURL"]]


async def test_notification_over_http_stores_the_bounce(tmp_path: Path, nats_url: str) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        message = sns_notification(ses_event("Bounce"))
        status, answer = await post(
            http, f"{tracker.url}/webhooks/ses", json.dumps(message).encode(), sns_headers(message)
        )
        assert (status, answer["stored"]) == (200, 1)
    (stored,) = await stream_events(nats_url)
    assert (stored.type.value, stored.bounce_kind, stored.tracking_id) == ("bounced", "hard", TRACKING_ID)
    assert stored.metadata["topic"] == TOPIC
