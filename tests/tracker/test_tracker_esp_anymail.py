"""django-anymail's webhook test payloads, replayed: every case signed afresh as its provider
would sign it, posted to a running tracker with a real nats-server, and the stored events
compared with what anymail's own tests assert (tests/peer_corpora/SOURCES.md).

anymail and mailbeacon name event types differently; ``ANYMAIL_TO_MAILBEACON`` is the one
table between them (docs/tracker.md "Compared with django-anymail" shows the same), and ``CASE_DIFFERENCES``
the cases where mailbeacon deliberately stores something else, each with its reason. A case
that maps otherwise fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.esp_payloads.harness import (
    TOPIC,
    mailgun_body,
    mailgun_legacy_form,
    post,
    postmark_headers,
    running_tracker,
    sendgrid_headers,
    sns_headers,
    sns_resigned,
    stream_events,
)
from tracker.webhooks.esp.mailgun import LEGACY_REFUSED

CORPUS = Path(__file__).resolve().parents[1] / "peer_corpora" / "anymail"
CASES = sorted(path.relative_to(CORPUS).with_suffix("").as_posix() for path in CORPUS.glob("*/*.json"))

# anymail's event type → mailbeacon's (None: acknowledged, nothing stored), and why they differ.
ANYMAIL_TO_MAILBEACON: dict[str, str | None] = {
    "queued": None,  # the provider took it on; the proxy's own `sent` already says so
    "sent": None,  # the same: mailbeacon's `sent` is the proxy's relay, not a second one
    "rejected": "failed",  # the provider refused to send it: for mailbeacon the copy failed
    "failed": "failed",
    "bounced": "bounced",
    "deferred": "deferred",
    "delivered": "delivered",
    "autoresponded": None,  # an out-of-office reply says nothing about delivery
    "opened": "opened",
    "clicked": "clicked",
    "complained": "complained",
    "unsubscribed": "unsubscribed",
    "subscribed": None,  # no such event: mailbeacon's own suppression stays until an operator lifts it
    "inbound": None,  # not a tracking event
    "unknown": None,  # never mapped to a guessed type
}

# Cases where mailbeacon stores other events than the table gives: (type, recipient) stored, why.
CASE_DIFFERENCES: dict[str, tuple[list[tuple[str, str]], str]] = {
    "postmark/bounce_unsubscribe_variant": (
        [],
        "the record names neither an address nor a tracking id: there is no copy to attach it to",
    ),
}
# Legacy Mailgun webhooks (form-encoded, before 2018; "legacy, not scored" in SOURCES.md) are
# refused with a 406, the one answer Mailgun does not retry, and a reason naming the JSON webhooks.
LEGACY = "mailgun_legacy/"


def _case(name: str) -> dict[str, Any]:
    case: dict[str, Any] = json.loads((CORPUS / f"{name}.json").read_text())
    return case


def _request(case: dict[str, Any]) -> tuple[str, bytes, dict[str, str], dict[str, Any]]:
    """Provider path, body and headers of a case signed afresh, and the tracker settings it needs."""
    payload = case["payload"]
    provider = case["provider"]
    if provider == "sendgrid":
        body = json.dumps(payload).encode()
        return "sendgrid", body, sendgrid_headers(body), {}
    if provider == "mailgun" and case["format"] == "form":
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return "mailgun", mailgun_legacy_form(payload), headers, {}
    if provider == "mailgun":
        return "mailgun", mailgun_body(payload["event-data"]), {"Content-Type": "application/json"}, {}
    if provider == "postmark":
        return "postmark", json.dumps(payload).encode(), postmark_headers(), {}
    assert provider == "amazon_ses", provider
    message = sns_resigned(payload)
    topics = sorted({TOPIC, message["TopicArn"]})
    return "ses", json.dumps(message).encode(), sns_headers(message), {"ses_topic_arns": ",".join(topics)}


def expected_events(case: dict[str, Any]) -> list[tuple[str, str | None]]:
    """What mailbeacon stores for a case: anymail's assertions through the table. A recipient
    anymail's test did not assert is None (not compared)."""
    if case["id"] in CASE_DIFFERENCES:
        return [(kind, recipient) for kind, recipient in CASE_DIFFERENCES[case["id"]][0]]
    mapped = [(ANYMAIL_TO_MAILBEACON[e["type"]], e["recipient"]) for e in case["anymail_expected"]]
    return sorted((kind, recipient) for kind, recipient in mapped if kind is not None)


def test_every_corpus_case_is_replayed_and_every_type_is_in_the_table() -> None:
    listed = re.findall(r"^\| `([a-z_]+/[a-z_]+)`", (CORPUS.parent / "SOURCES.md").read_text(), re.M)
    assert sorted(listed) == CASES
    assert len(CASES) == 46
    kinds = {e["type"] for name in CASES for e in _case(name)["anymail_expected"]}
    assert kinds <= ANYMAIL_TO_MAILBEACON.keys()
    assert set(CASE_DIFFERENCES) <= set(CASES)


@pytest.mark.parametrize("name", CASES)
async def test_anymail_payload_maps_as_anymail_maps_it(tmp_path: Path, nats_url: str, name: str) -> None:
    case = _case(name)
    provider, body, headers, settings = _request(case)
    async with running_tracker(tmp_path, nats_url, **settings) as tracker, aiohttp.ClientSession() as http:
        status, answer = await post(http, f"{tracker.url}/webhooks/{provider}", body, headers)
    stored = await stream_events(nats_url)
    if name.startswith(LEGACY):
        assert (status, answer) == (406, {"status": "error", "error": LEGACY_REFUSED})
        assert stored == []
        return
    assert status == 200, answer
    expected = expected_events(case)
    got = sorted((e.type.value, e.recipient) for e in stored)
    assert [kind for kind, _ in got] == [kind for kind, _ in expected], answer
    for (_, recipient), (_, wanted) in zip(got, expected, strict=True):
        assert recipient is not None  # every stored event can find its copy
        if wanted is not None:
            assert recipient == wanted.lower()
    for event in stored:
        # The provider's own time is kept, however old the recorded payload is.
        assert "stated_time" not in event.metadata
        assert event.metadata["payload"]
