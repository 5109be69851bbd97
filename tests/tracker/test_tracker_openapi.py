"""The OpenAPI document at /openapi.json, checked by schemathesis against the running tracker.

The tracker runs on its own event loop in a thread (schemathesis drives it with blocking
HTTP), against a real nats-server, with every provider configured; schemathesis loads the
document the tracker serves and fuzzes every operation with schema-valid and invalid input.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mailbeacon.app.embedded_nats import EmbeddedNats
from tests.esp_payloads.harness import RunningTracker, running_tracker
from tracker.openapi import openapi_document


@pytest.fixture(scope="module")
def tracker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("openapi")
    nats = EmbeddedNats(base / "nats")
    nats_url = nats.start()
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            context = running_tracker(base, nats_url)
            started["context"], started["tracker"] = context, await context.__aenter__()

        try:
            loop.run_until_complete(start())
        finally:
            ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="tracker-under-schemathesis", daemon=True)
    thread.start()
    try:
        assert ready.wait(30) and "tracker" in started, "the tracker did not start"
        tracker: RunningTracker = started["tracker"]
        yield tracker.url
    finally:
        if "context" in started:
            asyncio.run_coroutine_threadsafe(started["context"].__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        nats.stop()


# The document the tracker serves (asserted equal below): built by the same function, so the
# operations are known when pytest collects, before the tracker runs.
schema = schemathesis.openapi.from_dict(openapi_document("http://127.0.0.1"))


def test_served_document_describes_every_route(tracker_url: str) -> None:
    served = requests.get(f"{tracker_url}/openapi.json", timeout=10).json()
    assert served == openapi_document(served["servers"][0]["url"])
    assert set(served["paths"]) >= {
        "/track/pixel/{tracking_id}/",
        "/track/click/{tracking_id}/",
        "/track/unsubscribe/{tracking_id}/",
        "/track/{kind}/",
        "/webhooks/sendgrid",
        "/webhooks/mailgun",
        "/webhooks/ses",
        "/webhooks/postmark",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_tracker_conforms_to_its_description(case: Any, tracker_url: str) -> None:
    case.call_and_validate(
        base_url=tracker_url,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
        allow_redirects=False,
        timeout=10,
    )


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/track/%C3%B8%0A%03", 404),  # a decoded newline in the path
        ("GET", "/nowhere%0Aelse", 404),
        ("DELETE", "/track/pixel/7a3e9c2d-4b1f-4e8a-9d6c-5f0b1a2c3d4e/", 405),
    ],
)
def test_paths_nobody_serves_answer_json(tracker_url: str, method: str, path: str, status: int) -> None:
    response = requests.request(method, tracker_url + path, timeout=10)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["status"] == "error"
