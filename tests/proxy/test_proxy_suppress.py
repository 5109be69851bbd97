"""Suppressions as pure functions (the bucket key, the proxy's decision and reply), and the
bucket mirror against a real nats-server."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from mailbeacon.bus.jetstream import SUPPRESSIONS_BUCKET, ensure_suppression_bucket, provision
from mailbeacon.bus.suppressions import SuppressionList, suppression_key, suppression_value
from mailbeacon.contract.events import Event, EventType
from smtp_proxy.relay.outcome import decide
from smtp_proxy.relay.suppress import Suppressed, suppression_reasons
from smtp_proxy.relay.upstream import CopyResult
from tests.support import eventually, make_settings

CAMPAIGN = "default/spring-sale"
T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
TIDS = [f"{n}{n}{n}{n}{n}{n}{n}{n}-1111-4111-8111-111111111111" for n in range(1, 6)]


def test_key_is_the_sha256_of_campaign_and_lower_cased_recipient() -> None:
    key = suppression_key(CAMPAIGN, "Ann@Example.COM")
    assert key == hashlib.sha256(b"default/spring-sale\nann@example.com").hexdigest()
    assert key == suppression_key(CAMPAIGN, " ann@example.com")  # the contract's recipient form
    assert key != suppression_key("default/other", "ann@example.com")
    assert key != suppression_key(CAMPAIGN, "ben@example.com")
    # The separator keeps "a/b" + "c" apart from "a/bc" + "" (no ambiguous concatenation).
    assert suppression_key("a/b", "c@x") != suppression_key("a/bc", "@x")
    # SMTPUTF8 lets undecodable bytes reach the proxy as lone surrogates: the key is the one
    # of the address as the event stores it, not an exception that would defer the message.
    stored = Event(event_id="e", type=EventType.SENT, recipient="Ann\udcff@x.de").recipient
    assert stored == "ann\ufffd@x.de"
    assert suppression_key(CAMPAIGN, "Ann\udcff@x.de") == suppression_key(CAMPAIGN, stored)


def test_value_says_why_and_since_when_and_never_names_the_address() -> None:
    value = suppression_value("complained", T0)
    assert json.loads(value) == {"type": "complained", "at": "2026-11-27T12:00:00+00:00"}
    with pytest.raises(ValueError):
        suppression_value("opened", T0)


def lookup_of(table: dict[tuple[str, str], str]):  # type: ignore[no-untyped-def]
    return lambda campaign, recipient: table.get((campaign, recipient.lower()))


def test_only_the_suppressed_pairs_of_this_campaign_are_held_back() -> None:
    lookup = lookup_of(
        {(CAMPAIGN, "ann@example.com"): "unsubscribed", ("default/other", "ben@example.com"): "complained"}
    )
    recipients = ["Ann@example.com", "ben@example.com"]
    assert suppression_reasons(CAMPAIGN, recipients, lookup) == ["unsubscribed", None]
    assert suppression_reasons("default/other", recipients, lookup) == [None, "complained"]
    assert suppression_reasons(None, recipients, lookup) == [None, None]  # untracked mail: never
    assert suppression_reasons(CAMPAIGN, recipients, None) == [None, None]  # HONOUR_UNSUBSCRIBES off


def sent(rcpt: str) -> CopyResult:
    return CopyResult(rcpt, 250, "2.0.0 queued")


def test_others_go_out_and_the_app_gets_250_with_a_failed_event_per_suppressed_copy() -> None:
    held = [Suppressed("ann@example.com", TIDS[0], "unsubscribed")]
    outcome = decide([sent("ben@example.com")], CAMPAIGN, [TIDS[1]], "<m@x>", held)
    assert outcome.reply.startswith("250 ") and "1 of 2 copies accepted" in outcome.reply
    assert outcome.result == "partial"
    by_type = {(e.type, e.recipient): e for e in outcome.events}
    assert set(by_type) == {(EventType.SENT, "ben@example.com"), (EventType.FAILED, "ann@example.com")}
    failed = by_type[(EventType.FAILED, "ann@example.com")]
    assert failed.reason == "recipient unsubscribed from this campaign"
    assert failed.event_id == f"proxy:failed:{TIDS[0]}" and failed.tracking_id == TIDS[0]
    assert failed.campaign == CAMPAIGN and failed.metadata["suppressed"] == "unsubscribed"


def test_every_recipient_suppressed_is_a_permanent_550() -> None:
    one = decide([], CAMPAIGN, [], "", [Suppressed("ann@example.com", TIDS[0], "complained")])
    assert one.reply.startswith("550 5.7.1 ") and "complained" in one.reply and CAMPAIGN in one.reply
    assert one.result == "suppressed"
    assert [e.reason for e in one.events] == ["recipient complained about this campaign (spam report)"]
    both = decide(
        [],
        CAMPAIGN,
        [],
        "",
        [
            Suppressed("ann@example.com", TIDS[0], "unsubscribed"),
            Suppressed("ben@example.com", TIDS[1], "unsubscribed"),
        ],
    )
    assert both.reply.startswith("550 5.7.1 Not sent: all 2 recipients unsubscribed from this campaign")
    assert len(both.events) == 2


def test_a_deferred_message_records_its_suppressed_copies_on_the_retry_only() -> None:
    held = [Suppressed("ann@example.com", TIDS[0], "unsubscribed")]
    deferred = decide([CopyResult("ben@example.com", 421, "4.4.2 try later")], CAMPAIGN, [TIDS[1]], "", held)
    assert deferred.reply.startswith("421 ") and deferred.events == []  # the app retries the whole message
    refused = decide(
        [CopyResult("ben@example.com", 550, "5.1.1 no such user")], CAMPAIGN, [TIDS[1]], "", held
    )
    assert refused.reply.startswith("550 5.1.1")  # the upstream's answer for the copy it refused
    assert sorted(e.recipient or "" for e in refused.events) == ["ann@example.com", "ben@example.com"]


def test_without_suppressions_the_answer_is_unchanged() -> None:
    outcome = decide([sent("ann@example.com")], CAMPAIGN, [TIDS[0]], "")
    assert outcome.reply == "250 2.0.0 OK: 1 copies accepted" and outcome.result == "accepted"


async def test_the_mirror_loads_follows_and_forgets(nc: NATS, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    await provision(nc.jetstream(), settings)
    await provision(nc.jetstream(), settings)  # idempotent, like every replica starting
    kv = await nc.jetstream().key_value(SUPPRESSIONS_BUCKET)
    writer = SuppressionList(kv)
    await writer.put(CAMPAIGN, "ann@example.com", "unsubscribed", T0)
    await kv.put("not-a-digest", b"{}")  # foreign keys are ignored, never a crash
    reader = SuppressionList(await ensure_suppression_bucket(nc.jetstream(), settings))
    await reader.start()
    try:
        assert reader.reason(CAMPAIGN, "ANN@example.com") == "unsubscribed" and len(reader) == 1
        assert reader.reason("default/other", "ann@example.com") is None
        await writer.put(CAMPAIGN, "ann@example.com", "complained", T0)
        await writer.put(CAMPAIGN, "ben@example.com", "unsubscribed", T0)

        async def followed() -> bool:
            return reader.reason(CAMPAIGN, "ann@example.com") == "complained" and len(reader) == 2

        await eventually(followed)
        # An operator lifts a suppression by deleting its key (e.g. the recipient re-subscribed).
        await kv.delete(suppression_key(CAMPAIGN, "ann@example.com"))
        await eventually(lambda: _async(reader.reason(CAMPAIGN, "ann@example.com") is None))
        keys = await kv.keys()
        assert all("@" not in key for key in keys)  # no address in NATS
    finally:
        await reader.stop()


async def _async(value: bool) -> bool:
    return value
