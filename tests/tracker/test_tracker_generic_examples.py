"""The generic webhooks' documented examples work exactly as written: each example request of
the README's tour, of docs/esps/generic.md and of the OpenAPI document is posted to a running
tracker with a real nats-server and answered as documented, and its event is stored with the
copy or address and the time it states, however old."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.esp_payloads.harness import post, running_tracker, stream_events
from tracker.openapi import openapi_document
from tracker.webhooks.generic_webhooks import parse_timestamp

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "esps" / "generic.md")
# curl -X POST http://127.0.0.1:8080/track/<kind>/ ... -d '<body>' then "# <answer>" on its own line.
CURL = re.compile(
    r"curl -X POST http://127\.0\.0\.1:8080(/track/[a-z]+/)[^\n]*\\\n\s*-d '([^']*)'\n# (\{[^\n]*\})"
)
ANSWERS = {"bounce": "Event recorded", "delivery": "Delivery recorded", "complaint": "Event recorded"}


def readme_examples() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, body, json.loads(answer))
        for document in DOCUMENTS
        for path, body, answer in CURL.findall(document.read_text())
    ]


def openapi_examples() -> list[tuple[str, str, dict[str, Any]]]:
    operation = openapi_document("http://127.0.0.1")["paths"]["/track/{kind}/"]["post"]
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    return [
        (f"/track/{kind}/", json.dumps(example["value"]), {"status": "success", "message": ANSWERS[kind]})
        for kind, example in examples.items()
    ]


def test_the_documented_examples_are_found() -> None:
    assert [path for path, _, _ in readme_examples()] == [
        "/track/delivery/",  # the README's tour: by address
        "/track/bounce/",
        "/track/bounce/",  # docs/esps/generic.md: by tracking id, with times
        "/track/delivery/",
    ]
    assert [path for path, _, _ in openapi_examples()] == ["/track/bounce/", "/track/delivery/"]
    # The delivery example states a time years before today.
    assert any(
        json.loads(body).get("timestamp") == "2024-01-01T12:00:00Z" for _, body, _ in readme_examples()
    )


@pytest.mark.parametrize(
    ("path", "body", "answer"),
    [*readme_examples(), *openapi_examples()],
    ids=[f"README {p}" for p, _, _ in readme_examples()] + [f"OpenAPI {p}" for p, _, _ in openapi_examples()],
)
async def test_documented_example_is_stored_as_written(
    tmp_path: Path, nats_url: str, path: str, body: str, answer: dict[str, Any]
) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        status, answered = await post(
            http, f"{tracker.url}{path}", body.encode(), {"Content-Type": "application/json"}
        )
        assert (status, answered) == (200, answer)
    (stored,) = await stream_events(nats_url)
    sent = json.loads(body)
    assert stored.type.value == {"/track/bounce/": "bounced", "/track/delivery/": "delivered"}[path]
    assert stored.tracking_id == sent.get("tracking_id")
    assert stored.recipient == sent.get("email")
    if "timestamp" in sent:
        assert stored.occurred_at == parse_timestamp(sent["timestamp"])  # as stated, not the arrival
    assert "stated_time" not in stored.metadata
    assert stored.metadata["payload"] == sent
