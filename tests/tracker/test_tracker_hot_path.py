"""The pixel and click fast path keeps the contract: the same events, JSON and answers, only cheaper.

Pixel and click events are encoded without pydantic and published as raw protocol
commands; these tests hold both to what validation and nats-py would have produced, and check the
request shapes the fast path must not stumble on (bytes that are not UTF-8, signatures
outside base64, methods and paths nobody serves).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from mailbeacon.bus.fast_batch import Outgoing, hpub_command, outgoing
from mailbeacon.bus.jetstream import ALL_EVENTS, STREAM, connect, provision
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.events import Event, EventType, subject_for
from mailbeacon.contract.signing import click_url, pixel_url, sign_click
from tests.esp_payloads.harness import BROWSER_UA, running_tracker, stream_events
from tests.support import SECRET, eventually, make_settings, raw_http
from tracker import classify
from tracker.engagement import engagement
from tracker.engagement.engagement import EventIds, encodable, engagement_message, json_now

TID = "3d6f0f8e-9b1c-4c8e-8f3a-6a2b1c0d9e01"
VERDICTS = [
    classify.HUMAN,
    classify.honeypot(),
    classify.burst(3, 0.4),
    classify.Verdict("prefetch", "Sec-Purpose: pr\udcffefetch"),  # quotes a header's raw bytes
]


def payload_of(message: Outgoing) -> bytes:
    """The event JSON of a ready message, checked to be framed as the generic path frames it."""
    subject, event_id, frame, header_size = message
    payload = frame[header_size:]
    assert message == outgoing(subject, event_id, payload)
    assert subject == Event.model_validate_json(payload).subject.encode()
    return payload


@settings(max_examples=300, deadline=None)
@given(
    event_type=st.sampled_from([EventType.OPENED, EventType.CLICKED]),
    user_agent=st.none() | st.text(max_size=80),
    ip=st.none() | st.sampled_from(["198.51.100.7", "2001:db8::1", "17.58.63.0"]),
    # Surrogates included: a query string may decode to them.
    url=st.none()
    | st.text(st.characters(blacklist_categories=()), max_size=60).map(
        lambda text: f"https://shop.example.com/{text}"
    ),
    verdict=st.sampled_from(VERDICTS),
    occurred_at=st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
)
def test_fast_events_equal_validated_ones_byte_for_byte(
    event_type: EventType,
    user_agent: str | None,
    ip: str | None,
    url: str | None,
    verdict: classify.Verdict,
    occurred_at: datetime,
) -> None:
    agent = encodable(user_agent) if user_agent else None
    # The time as pydantic writes it: held clicks carry it in that form.
    stamp = json.loads(Event(event_id="t", type=event_type, occurred_at=occurred_at).to_json())["occurred_at"]
    message = engagement_message(event_type, TID, ip, agent, verdict, "pixel", url, stamp)
    validated = Event(
        event_id=message[1],
        type=event_type,
        tracking_id=TID,
        occurred_at=occurred_at,
        ip=ip,
        user_agent=agent,
        url=url,
        machine=verdict.machine_kind is not None,
        machine_kind=verdict.machine_kind,
        source="pixel",
        metadata={"machine_evidence": verdict.evidence} if verdict.machine_kind else {},
    )
    assert payload_of(message) == validated.to_json()


@pytest.mark.parametrize(
    "now", [None, 1_795_000_000.0, 1_795_000_000.000_001, 1_795_000_000.999_999, 1_795_000_000.999_999_7]
)
def test_now_is_written_as_pydantic_writes_it(now: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if now is not None:
        monkeypatch.setattr(engagement.time, "time", lambda: now)
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = json_now()
    moment = datetime.fromisoformat(stamp)
    event = Event(event_id="e1", type=EventType.OPENED, occurred_at=moment)
    assert f'"occurred_at":"{stamp}"'.encode() in event.to_json()
    if now is None:
        assert before <= moment <= datetime.now(UTC)
    else:
        assert moment == datetime.fromtimestamp(now, UTC)


def test_an_engagement_without_a_time_is_stamped_now() -> None:
    before = datetime.now(UTC)
    event = Event.from_json(
        payload_of(engagement_message(EventType.OPENED, TID, None, None, classify.HUMAN, "pixel"))
    )
    assert before <= event.occurred_at <= datetime.now(UTC)
    assert (event.ip, event.user_agent, event.machine, event.metadata) == (None, None, False, {})


def test_text_that_is_not_utf8_becomes_replacement_characters() -> None:
    raw = b"Mozilla/5.0 \xff\xfe caf\xc3\xa9".decode("utf-8", "surrogateescape")  # as aiohttp decodes it
    assert encodable(raw) == "Mozilla/5.0 \ufffd\ufffd café"
    assert encodable(BROWSER_UA) is BROWSER_UA


def test_engagement_ids_are_unique_hex_and_a_restart_draws_a_new_prefix() -> None:
    ids = EventIds()
    first = [ids() for _ in range(1000)]
    assert len(set(first)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in first)
    ids.restart()  # what a forked child does
    assert ids()[:20] != first[0][:20]


async def test_raw_publish_commands_are_what_nats_py_sends(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nc = await connect(nats_url, "hpub-test")
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    try:
        monkeypatch.setattr(nc, "_send_command", capture)
        subject, reply, payload = subject_for(EventType.OPENED), "_INBOX.abc.17", b'{"event_id":"x"}'
        for event_id in ("a" * 32, "webhook:sendgrid:evt 1", " padded ", "line\r\nbreak"):
            await nc.publish(subject, payload, reply=reply, headers={"Nats-Msg-Id": event_id})
            assert sent.pop() == hpub_command(subject.encode(), reply.encode(), event_id, payload)
    finally:
        monkeypatch.undo()
        await nc.close()


async def _raw_events(nats_url: str) -> list[bytes]:
    nc = await connect(nats_url, "raw-reader")
    try:
        js = nc.jetstream()
        total = (await js.stream_info(STREAM)).state.messages
        reader = await js.pull_subscribe(ALL_EVENTS, stream=STREAM)
        data: list[bytes] = []
        while len(data) < total:
            data += [message.data for message in await reader.fetch(batch=total - len(data), timeout=5)]
        return data
    finally:
        await nc.close()


async def test_published_json_is_the_validated_serialization(tmp_path: Path, nats_url: str) -> None:
    """What lands in JetStream is byte for byte what pydantic would write for the same event."""
    async with running_tracker(tmp_path, nats_url, click_burst_seconds=0.2) as tracker:
        site, keys = tracker.settings.site_url, [SECRET.encode()]
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http:
            async with http.get(pixel_url(site, TID)) as response:
                assert response.status == 200
            url = click_url(site, keys, TID, 'https://shop.example.com/ünïcode?q="quoted"')
            async with http.get(url, allow_redirects=False) as response:
                assert response.status == 302
            async with http.head(pixel_url(site, TID)) as response:
                assert response.status == 200

        async def three() -> list[bytes]:
            data = await _raw_events(nats_url)
            assert len(data) == 3
            return data

        stored = await eventually(three, within=10)
    for data in stored:
        assert Event.model_validate_json(data).to_json() == data
    kinds = sorted((e.type.value, e.machine_kind or "human") for e in map(Event.from_json, stored))
    assert kinds == [("clicked", "human"), ("opened", "head_request"), ("opened", "human")]


async def test_header_bytes_that_are_not_utf8_never_block_the_buffer(tmp_path: Path, nats_url: str) -> None:
    """Such a header used to make an event JSON cannot carry, stuck at the head of the buffer."""
    odd = "4f2c1a9e-7d3b-4e6f-9a8b-0c1d2e3f4a5b"
    async with running_tracker(tmp_path, nats_url) as tracker:
        port, site = int(tracker.url.rsplit(":", 1)[1]), tracker.settings.site_url
        path = pixel_url(site, odd).removeprefix(site).encode()
        answer = await raw_http(
            port,
            b"GET " + path + b" HTTP/1.1\r\nHost: t\r\nUser-Agent: Mozilla/5.0 \xff\xfe\r\n"
            b"Sec-Purpose: prefetch \xc0\r\nConnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 200")
        async with (
            aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http,
            http.get(pixel_url(site, TID)) as response,
        ):
            assert response.status == 200

        async def both() -> list[Event]:
            events = await stream_events(nats_url)
            assert len(events) == 2
            return events

        events = {e.tracking_id: e for e in await eventually(both, within=10)}
    assert events[odd].user_agent == "Mozilla/5.0 \ufffd\ufffd"
    assert events[odd].machine_kind == "prefetch"
    assert events[odd].metadata["machine_evidence"] == "Sec-Purpose: prefetch \ufffd"
    assert events[TID].machine is False


async def test_an_event_that_cannot_be_encoded_is_dropped_not_retried_forever(
    tmp_path: Path, nats_url: str
) -> None:
    nc: NATS = await connect(nats_url, "publisher-test")
    try:
        await provision(nc.jetstream(), make_settings(tmp_path))
        publisher = EventPublisher(nc.jetstream())
        # Validation makes a lone surrogate U+FFFD; an event built without it can still hold one.
        broken = Event.model_construct(
            event_id="broken-1", type=EventType.OPENED, tracking_id=TID, user_agent="\udcff"
        )
        fine = Event(event_id="fine-1", type=EventType.OPENED, tracking_id=TID, occurred_at=datetime.now(UTC))
        publisher.publish_later(broken)
        publisher.publish_later(fine)
        await publisher.close(drain_timeout=10)
        assert (publisher.dropped, publisher.published, publisher.buffered) == (1, 1, 0)
    finally:
        await nc.close()
    assert [e.event_id for e in await stream_events(nats_url)] == ["fine-1"]


async def test_clicks_on_two_links_within_the_window_keep_their_own_evidence(
    tmp_path: Path, nats_url: str
) -> None:
    """A HEAD check and a GET on another link of one copy: a burst, but HEAD stays HEAD."""
    links = ["https://shop.example.com/a", "https://shop.example.com/b"]
    async with running_tracker(tmp_path, nats_url, click_burst_seconds=0.5) as tracker:
        site, keys = tracker.settings.site_url, [SECRET.encode()]
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http:
            async with http.head(click_url(site, keys, TID, links[0]), allow_redirects=False) as response:
                assert response.status == 302
            async with http.get(click_url(site, keys, TID, links[1]), allow_redirects=False) as response:
                assert response.status == 302

        async def both() -> list[Event]:
            events = await stream_events(nats_url)
            assert len(events) == 2
            return events

        events = {e.url: e for e in await eventually(both, within=10)}
    assert events[links[0]].machine_kind == "head_request"
    assert events[links[1]].machine_kind == "burst"
    assert "2 different links" in events[links[1]].metadata["machine_evidence"]


async def test_errors_are_json_without_a_middleware(tmp_path: Path, nats_url: str) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        site = tracker.settings.site_url
        answers: list[tuple[int, str | None, Any]] = []
        for method, path in (
            ("GET", "/no/such/page"),
            ("POST", f"/track/pixel/{TID}/"),
            ("DELETE", "/healthz"),
            ("GET", f"/track/pixel/{TID}/extra"),
        ):
            async with http.request(method, f"{site}{path}") as response:
                answers.append((response.status, response.headers.get("Allow"), await response.json()))
        # A signature outside base64's alphabet is a forged link, not a server error.
        signature = sign_click([SECRET.encode()], TID, "https://shop.example.com/")
        async with http.get(
            f"{site}/track/click/{TID}/",
            params={"url": "https://shop.example.com/", "sig": signature[:-1] + "é"},
            allow_redirects=False,
        ) as response:
            forged = (response.status, response.content_type)
    assert [(status, allow) for status, allow, _ in answers] == [
        (404, None),
        (405, "GET,HEAD"),
        (405, "GET,HEAD"),
        (404, None),
    ]
    assert all(body["status"] == "error" and body["error"] for _, _, body in answers)
    assert forged == (400, "text/html")


@pytest.mark.parametrize("route", ["pixel", "click"])
async def test_a_pixel_or_click_that_fails_is_a_timed_json_503(
    route: str, tmp_path: Path, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pixel and click run without a coroutine of their own; a failure inside still gets the
    tracker's JSON answer (never aiohttp's 500 with a traceback) and is counted in the histogram."""

    def broken(*_: object) -> None:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engagement, "canonical_tracking_id", broken)
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        site, keys = tracker.settings.site_url, [SECRET.encode()]
        url = (
            pixel_url(site, TID)
            if route == "pixel"
            else click_url(site, keys, TID, "https://shop.example.com/")
        )

        async def observed() -> float:
            async with http.get(f"{site}/metrics") as response:
                text = await response.text()
            line = f'mailbeacon_tracker_request_seconds_count{{route="{route}"}} '
            return float(next(row for row in text.splitlines() if row.startswith(line)).split()[-1])

        before = await observed()
        async with http.get(url, allow_redirects=False) as response:
            answer = (response.status, response.content_type, await response.json())
        after = await observed()
    assert answer == (
        503,
        "application/json",
        {"status": "error", "error": "temporarily unavailable, retry later"},
    )
    assert after == before + 1


def test_client_text_gets_the_sanitation_validation_applies() -> None:
    """A NUL or an oversized value would make the store refuse the whole batch it arrives in."""
    agent = "Mozilla/5.0\x00" + "x" * 10_000
    url = "https://shop.example.com/%00?q=\x00" + "y" * 9_000
    verdict = classify.Verdict("prefetch", "Sec-Purpose: pre\x00fetch")
    payload = payload_of(
        engagement_message(EventType.CLICKED, TID, "198.51.100.7", agent, verdict, "click", url)
    )
    event = Event.model_validate_json(payload)
    assert event.to_json() == payload  # what validation would have made of the same values
    assert event.user_agent == ("Mozilla/5.0" + "x" * 10_000)[:1000]
    assert event.url is not None and "\x00" not in event.url and len(event.url) == 8000
    assert event.metadata["machine_evidence"] == "Sec-Purpose: prefetch"


async def test_a_pixel_with_a_nul_or_huge_user_agent_is_stored_clean(tmp_path: Path, nats_url: str) -> None:
    huge = "c4a8b2e0-1f3d-4b5a-8c7e-9d0f1a2b3c4d"
    async with running_tracker(tmp_path, nats_url) as tracker:
        port, site = int(tracker.url.rsplit(":", 1)[1]), tracker.settings.site_url
        answers = []
        for tracking_id, agent in ((TID, b"Mozilla/5.0 (X11)\x00 evil"), (huge, b"A" * 8000)):
            path = pixel_url(site, tracking_id).removeprefix(site).encode()
            answers.append(
                await raw_http(
                    port,
                    b"GET " + path + b" HTTP/1.1\r\nHost: t\r\nUser-Agent: " + agent + b"\r\n"
                    b"Connection: close\r\n\r\n",
                )
            )
        assert answers[1].startswith(b"HTTP/1.1 200")

        async def stored() -> list[bytes]:
            data = await _raw_events(nats_url)
            assert len(data) == sum(answer.startswith(b"HTTP/1.1 200") for answer in answers)
            return data

        raw = await eventually(stored, within=10)
    for data in raw:
        event = Event.model_validate_json(data)
        assert event.to_json() == data  # already in the stored shape: validation changes nothing
        assert event.user_agent is not None and "\x00" not in event.user_agent
        assert len(event.user_agent) <= 1000
    # aiohttp's parser refuses a NUL in a header before any handler runs (a NUL can still come
    # from a decoded query: see the unit test above and the click tests on control characters).
    assert answers[0].split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
