"""Webhooks that can go without credentials (the generic ones, Postmark's) need them as soon as
the tracker listens beyond loopback (docs/tracker.md "ESP webhooks").

A tracker bound to 0.0.0.0 is reached here through 127.0.0.1: what a stranger on the network
would see. Forged complaints made the proxy withhold a recipient's mail for good.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.esp_payloads.harness import load, postmark_headers, running_tracker, stream_events
from tests.support import free_port

FORGED_POSTMARK = {**load("postmark_records.json")["SpamComplaint"], "Email": "alice@example.com", "ID": 4711}
FORGED_COMPLAINT = {"email": "bob@example.com"}
TOKEN = "f1e2d3c4b5a6978877665544332211aa"


def exposed(**overrides: Any) -> dict[str, Any]:
    """A tracker on every interface, with neither the generic token nor Postmark's credential."""
    port = free_port()
    return {
        "tracker_listen": f"0.0.0.0:{port}",
        "site_url": f"http://127.0.0.1:{port}",
        "postmark_basic_auth": None,
        **overrides,
    }


async def forge(url: str, **headers: str) -> list[tuple[int, dict[str, Any]]]:
    answers = []
    async with aiohttp.ClientSession() as http:
        for path, body in (("/webhooks/postmark", FORGED_POSTMARK), ("/track/complaint/", FORGED_COMPLAINT)):
            async with http.post(f"{url}{path}", json=body, headers=headers) as response:
                assert response.content_type == "application/json"
                answers.append((response.status, await response.json()))
    return answers


async def test_forged_complaints_are_refused_off_loopback_without_credentials(
    tmp_path: Path, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tracker.service"):
        async with running_tracker(tmp_path, nats_url, **exposed()) as tracker:
            (postmark, postmark_answer), (generic, generic_answer) = await forge(tracker.url)
    assert postmark == 503 and "set MAILBEACON_POSTMARK_BASIC_AUTH" in postmark_answer["error"]
    assert generic == 503 and "set MAILBEACON_WEBHOOK_TOKEN" in generic_answer["error"]
    assert await stream_events(nats_url) == []
    # Said once at start: which routes refuse, and what to set.
    starts = [r.getMessage() for r in caplog.records if "until their credentials are set" in r.getMessage()]
    assert len(starts) == 1
    assert "/track/bounce/" in starts[0] and "MAILBEACON_WEBHOOK_TOKEN" in starts[0]
    assert "/webhooks/postmark (set MAILBEACON_POSTMARK_BASIC_AUTH)" in starts[0]


async def test_with_credentials_off_loopback_only_the_holder_is_heard(tmp_path: Path, nats_url: str) -> None:
    settings = exposed(webhook_token=TOKEN, postmark_basic_auth="postmark:s3cret-hook")
    async with running_tracker(tmp_path, nats_url, **settings) as tracker:
        assert [status for status, _ in await forge(tracker.url)] == [401, 401]
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{tracker.url}/webhooks/postmark", json=FORGED_POSTMARK, headers=postmark_headers()
            ) as response:
                assert response.status == 200
            async with http.post(
                f"{tracker.url}/track/complaint/",
                json=FORGED_COMPLAINT,
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as response:
                assert response.status == 200
    assert sorted(e.recipient or "" for e in await stream_events(nats_url)) == [
        "alice@example.com",
        "bob@example.com",
    ]


async def test_the_explicit_opt_out_accepts_and_warns(
    tmp_path: Path, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tracker.service"):
        async with running_tracker(
            tmp_path, nats_url, **exposed(allow_unauthenticated_webhooks=True)
        ) as tracker:
            assert [status for status, _ in await forge(tracker.url)] == [200, 200]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    opted = [w for w in warnings if w.startswith("MAILBEACON_ALLOW_UNAUTHENTICATED_WEBHOOKS=true")]
    assert len(opted) == 1 and "/track/bounce/" in opted[0] and "/webhooks/postmark" in opted[0]
    assert not any("until their credentials are set" in w and "postmark" in w for w in warnings)


async def test_on_loopback_nothing_needs_configuring(tmp_path: Path, nats_url: str) -> None:
    """`mailbeacon up` stays as easy as it was: on 127.0.0.1 both answer without credentials."""
    async with running_tracker(tmp_path, nats_url, postmark_basic_auth=None) as tracker:
        assert [status for status, _ in await forge(tracker.url)] == [200, 200]
        body = json.dumps({"tracking_id": str(uuid.uuid4())}).encode()
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{tracker.url}/track/bounce/", data=body) as response,
        ):
            assert response.status == 200
    assert len(await stream_events(nats_url)) == 3
