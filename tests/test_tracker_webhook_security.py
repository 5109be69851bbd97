"""The security rules every provider webhook follows, over HTTP against a running tracker.

Bad signature → 401, stale → 403, replay → 403, oversize → 413, garbage → 400; nothing
refused reaches the stream, and nothing is ever answered with a 500.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from mailbeacon.jetstream import connect
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
from tests.support import metric_value

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
    replay_refused: bool = True  # Postmark signs nothing: a replay is deduplicated instead


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
    ),
    Provider(
        "ses",
        authentic=lambda: _ses(sns_notification(_ses_event())),
        bad_signature=_tampered_ses,
        stale=lambda: _ses(sns_notification(_ses_event(), at=datetime.now(UTC) - timedelta(hours=3))),
        oversize=lambda: _ses(sns_notification(_ses_event(PADDING))),
        garbage=lambda: (b"\x00\x01 garbage {[", {"x-amz-sns-message-type": "Notification"}),
    ),
    Provider(
        "postmark",
        authentic=_postmark,
        bad_signature=lambda: (_postmark()[0], postmark_headers("postmark:guessed")),
        stale=None,
        oversize=lambda: _postmark(PADDING),
        garbage=lambda: (b"\x00\x01 garbage {[", postmark_headers()),
        replay_refused=False,
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


RULES = ["bad_signature", "stale", "replay", "oversize", "garbage"]


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
@pytest.mark.parametrize("rule", RULES)
async def test_shared_security_rules(provider: Provider, rule: str, tracker: Client, nats_url: str) -> None:
    if rule == "stale" and provider.stale is None:
        pytest.skip(f"{provider.name} signs nothing, so a request carries no time to be stale")
    expected_stored = 0
    if rule == "replay":
        request = provider.authentic()
        first, _ = await _send(tracker, provider.name, request)
        assert first == 200
        status, answer = await _send(tracker, provider.name, request)
        expected_stored = 1
        expected = 403 if provider.replay_refused else 200
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
