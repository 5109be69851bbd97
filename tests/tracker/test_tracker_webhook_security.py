"""The security rules every provider webhook follows, over HTTP against a running tracker.

Bad signature → 401, stale → 403, replay → 403, oversize → 413, garbage → 400; nothing
refused reaches the stream, and nothing is ever answered with a 500.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from mailbeacon.bus.jetstream import connect
from tests.esp_payloads.harness import (
    RunningTracker,
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
from tests.support import eventually, metric_value, raw_http

Request = tuple[bytes, dict[str, str]]
PADDING = "x" * (300 * 1024)  # over the 256 KiB limit the harness configures


def _sendgrid(body: bytes, timestamp: int | None = None) -> Request:
    return body, sendgrid_headers(body, timestamp)


def _sendgrid_event(padding: str = "") -> bytes:
    record = {"event": "delivered", "email": "ann@example.com", "timestamp": now_ts(), "response": "250 OK"}
    record["sg_event_id"] = uuid.uuid4().hex
    if padding:
        record["note"] = padding
    return json.dumps([record]).encode()


def _mailgun_event(padding: str = "") -> dict[str, object]:
    data: dict[str, object] = {
        "event": "delivered",
        "id": uuid.uuid4().hex,
        "timestamp": now_ts(),
        "recipient": "a@example.com",
    }
    if padding:
        data["note"] = padding
    return data


def _ses(message: dict[str, object]) -> Request:
    return json.dumps(message).encode(), sns_headers(message)


def _ses_event(padding: str = "") -> dict[str, object]:
    event = ses_event("Delivery", messageId=uuid.uuid4().hex)
    if padding:
        event["note"] = padding
    return event


def _postmark(padding: str = "") -> Request:
    record: dict[str, object] = {
        **load("postmark_records.json")["Delivery"],
        "MessageID": str(uuid.uuid4()),
    }
    if padding:
        record["Details"] = padding
    return json.dumps(record).encode(), postmark_headers()


@dataclass(frozen=True)
class Provider:
    name: str
    authentic: Callable[[], Request]
    bad_signature: Callable[[], Request]
    stale: Callable[[], Request] | None
    oversize: Callable[[], Request]
    garbage: Callable[[], Request]
    # The request's replay key again (its signature still valid) with another body: None
    # where no such request can be made (SendGrid signs the whole body, Postmark signs nothing).
    altered: Callable[[Request], Request] | None = None


def _mailgun_swapped(request: Request) -> Request:
    """Mailgun signs only timestamp and token: anyone holding one request can swap event-data."""
    envelope = json.loads(request[0])
    envelope["event-data"] = {**_mailgun_event(), "event": "complained", "recipient": "victim@example.com"}
    return json.dumps(envelope).encode(), request[1]


def _ses_same_message_id(request: Request) -> Request:
    message_id = json.loads(request[0])["MessageId"]
    return _ses(sns_notification(_ses_event(), message_id=message_id))


def _tampered_sendgrid() -> Request:
    body, headers = _sendgrid(_sendgrid_event())
    return body.replace(b"ann@", b"eve@"), headers


def _tampered_ses() -> Request:
    message = sns_notification(_ses_event())
    message["Message"] = str(message["Message"]).replace("ann@", "eve@")
    return _ses(message)


PROVIDERS = [
    Provider(
        "sendgrid",
        authentic=lambda: _sendgrid(_sendgrid_event()),
        bad_signature=_tampered_sendgrid,
        stale=lambda: _sendgrid(_sendgrid_event(), timestamp=now_ts() - 3600),
        oversize=lambda: _sendgrid(_sendgrid_event(PADDING)),
        garbage=lambda: _sendgrid(b"\x00\x01 garbage {["),
    ),
    Provider(
        "mailgun",
        authentic=lambda: (mailgun_body(_mailgun_event()), {"Content-Type": "application/json"}),
        bad_signature=lambda: (mailgun_body(_mailgun_event(), key="key-not-ours"), {}),
        stale=lambda: (mailgun_body(_mailgun_event(), timestamp=now_ts() - 3600), {}),
        oversize=lambda: (mailgun_body(_mailgun_event(PADDING)), {}),
        garbage=lambda: (b"\x00\x01 garbage {[", {}),
        altered=_mailgun_swapped,
    ),
    Provider(
        "ses",
        authentic=lambda: _ses(sns_notification(_ses_event())),
        bad_signature=_tampered_ses,
        stale=lambda: _ses(sns_notification(_ses_event(), at=datetime.now(UTC) - timedelta(hours=3))),
        oversize=lambda: _ses(sns_notification(_ses_event(PADDING))),
        garbage=lambda: (b"\x00\x01 garbage {[", {"x-amz-sns-message-type": "Notification"}),
        altered=_ses_same_message_id,
    ),
    Provider(
        "postmark",
        authentic=_postmark,
        bad_signature=lambda: (_postmark()[0], postmark_headers("postmark:guessed")),
        stale=None,
        oversize=lambda: _postmark(PADDING),
        garbage=lambda: (b"\x00\x01 garbage {[", postmark_headers()),
    ),
]


Client = tuple[RunningTracker, aiohttp.ClientSession]


@pytest.fixture
async def tracker(tmp_path: Path, nats_url: str) -> AsyncIterator[Client]:
    async with running_tracker(tmp_path, nats_url) as running, aiohttp.ClientSession() as http:
        yield running, http


async def _send(tracker: Client, name: str, request: Request) -> tuple[int, dict[str, object]]:
    running, http = tracker
    body, headers = request
    async with http.post(f"{running.url}/webhooks/{name}", data=body, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


RULES = ["bad_signature", "stale", "replay", "altered_replay", "oversize", "garbage"]


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
@pytest.mark.parametrize("rule", RULES)
async def test_shared_security_rules(provider: Provider, rule: str, tracker: Client, nats_url: str) -> None:
    if rule == "stale" and provider.stale is None:
        pytest.skip(f"{provider.name} signs nothing, so a request carries no time to be stale")
    if rule == "altered_replay" and provider.altered is None:
        pytest.skip(f"no request of {provider.name}'s can reuse another's replay key with another body")
    expected_stored = 0
    if rule in ("replay", "altered_replay"):
        request = provider.authentic()
        first, _ = await _send(tracker, provider.name, request)
        assert first == 200
        expected_stored = 1
        if rule == "replay":
            # The same request again, as a provider retries: taken, and its event stored once.
            status, answer = await _send(tracker, provider.name, request)
            expected = 200
        else:
            assert provider.altered is not None
            status, answer = await _send(tracker, provider.name, provider.altered(request))
            expected = 403
    else:
        make = getattr(provider, rule)
        status, answer = await _send(tracker, provider.name, make())
        expected = {"bad_signature": 401, "stale": 403, "oversize": 413, "garbage": 400}[rule]
    assert status == expected, answer
    if status >= 400:
        assert answer["status"] == "error" and answer["error"]
    assert len(await stream_events(nats_url)) == expected_stored


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
async def test_a_failed_request_does_not_burn_its_signature(
    provider: Provider, tmp_path: Path, nats_url: str
) -> None:
    """A request answered 503 (event store down) is accepted when the provider retries it."""
    request = provider.authentic()
    async with running_tracker(tmp_path, nats_url) as running, aiohttp.ClientSession() as http:
        await running.nc.close()  # the tracker's NATS connection is gone: nothing can be stored
        async with http.post(
            f"{running.url}/webhooks/{provider.name}", data=request[0], headers=request[1]
        ) as response:
            assert response.status == 503
        reconnected = await connect(nats_url, "tracker-test-again")
        try:
            running.publisher.attach(reconnected.jetstream())
            async with http.post(
                f"{running.url}/webhooks/{provider.name}", data=request[0], headers=request[1]
            ) as response:
                assert response.status == 200, await response.text()
        finally:
            await reconnected.close()
    assert len(await stream_events(nats_url)) == 1


async def test_generic_webhooks_are_counted_with_the_providers(tmp_path: Path, nats_url: str) -> None:
    name = "mailbeacon_tracker_webhooks_total"
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:

        async def metrics() -> str:
            async with http.get(f"{tracker.url}/metrics") as response:
                return await response.text()

        before = await metrics()
        good = {"tracking_id": str(uuid.uuid4()), "reason": "550 5.1.1 unknown"}
        async with http.post(f"{tracker.url}/track/bounce/", json=good) as response:
            assert response.status == 200
        async with http.post(f"{tracker.url}/track/bounce/", data=b"{not json") as response:
            assert response.status == 400
        after = await metrics()
    for outcome in ("stored", "invalid"):
        counted = metric_value(after, name, provider="generic", outcome=outcome) - metric_value(
            before, name, provider="generic", outcome=outcome
        )
        assert counted == 1, outcome


async def test_lone_surrogate_escapes_are_stored_not_retried_forever(tmp_path: Path, nats_url: str) -> None:
    """A JSON "\\ud800" escape is valid JSON but not encodable text: the event is stored with
    U+FFFD in its place (a 503 would make the provider retry it for days)."""
    tid = str(uuid.uuid4())
    record = {
        "event": "bounce",
        "email": "ann@example.com",
        "timestamp": now_ts(),
        "sg_event_id": "sg-\ud800",
        "reason": "550 5.1.1 \ud800 unknown",
        "note\udcff": ["\udfff", {"deep": "\ud800"}],
    }
    body = json.dumps([record]).encode()
    assert b"\\ud800" in body  # the escape, as a provider sends it
    generic = json.dumps({"tracking_id": tid, "reason": "full \ud800 mailbox", "x": "\ud800"}).encode()
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        async with http.post(
            f"{tracker.url}/webhooks/sendgrid", data=body, headers=sendgrid_headers(body)
        ) as r:
            assert r.status == 200, await r.text()
        async with http.post(
            f"{tracker.url}/track/bounce/", data=generic, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 200, await r.text()

        async def stored() -> list[object]:
            events = await stream_events(nats_url)
            assert len(events) == 2
            return events

        events = await eventually(stored, within=10)
    by_source = {e.source: e for e in events}  # type: ignore[attr-defined]
    assert by_source["webhook:sendgrid"].reason == "550 5.1.1 \ufffd unknown"
    assert "\ufffd" in json.dumps(by_source["webhook:sendgrid"].metadata, ensure_ascii=False)
    assert by_source["webhook:generic"].reason == "full \ufffd mailbox"
    assert by_source["webhook:generic"].tracking_id == tid


@pytest.mark.parametrize("event_id", ["a\u0000b", "a\u007fb", "a\nb", "a\ud800"])
async def test_generic_event_ids_the_store_cannot_keep_are_refused(
    event_id: str, tmp_path: Path, nats_url: str
) -> None:
    body = json.dumps({"tracking_id": str(uuid.uuid4()), "event_id": event_id}).encode()
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        async with http.post(
            f"{tracker.url}/track/bounce/", data=body, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400
            assert "event_id" in (await response.json())["error"]
        await asyncio.sleep(0.2)
    assert await stream_events(nats_url) == []


async def test_a_token_that_is_not_utf8_is_unauthorized(tmp_path: Path, nats_url: str) -> None:
    body = json.dumps({"tracking_id": str(uuid.uuid4())}).encode()
    async with running_tracker(tmp_path, nats_url, webhook_token="s3cret-token") as tracker:
        port = int(tracker.url.rsplit(":", 1)[1])
        for header in (b"X-Webhook-Token: s3cret-\xff\xfe", b"Authorization: Bearer \xffs3cret"):
            answer = await raw_http(
                port,
                b"POST /track/bounce/ HTTP/1.1\r\nHost: t\r\n" + header + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body,
            )
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{tracker.url}/track/bounce/", data=body, headers={"X-Webhook-Token": "s3cret-token"}
            ) as response,
        ):
            assert response.status == 200
