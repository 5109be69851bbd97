"""Pixel loads and clicks are judged and encoded a millisecond after their answer, together.

The handlers answer at once; their events reach the publisher in one pass per millisecond
(cheaper: the work stays in the CPU's caches). Nothing answered may be lost on the way:
not at shutdown, not when one request of a batch cannot be judged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.signing import click_url, pixel_url
from tests.esp_payloads.harness import BROWSER_UA, running_tracker, stream_events
from tests.support import SECRET, eventually, make_settings
from tracker import classify
from tracker.app import ENGAGEMENT_KEY
from tracker.engagement import engagement
from tracker.engagement.arrivals import DELAY_SECONDS, Arrivals

_judge = classify.judge


def judge_unless_odd(
    kind: classify.Engagement, method: str, user_agent: str | None, *rest: object
) -> classify.Verdict:
    """The classifier, failing for requests whose user agent is "odd"."""
    if user_agent == "odd":
        raise RuntimeError("simulated classification failure")
    return _judge(kind, method, user_agent, *rest)  # type: ignore[arg-type]


async def test_arrivals_of_one_moment_are_handed_over_together_in_order() -> None:
    batches: list[list[int]] = []
    arrivals: Arrivals[int] = Arrivals(batches.append)
    for item in range(5):
        arrivals.add(item)
    assert (batches, arrivals.pending) == ([], 5)  # the requests were answered; nothing judged yet
    await asyncio.sleep(2 * DELAY_SECONDS)
    arrivals.add(5)
    await asyncio.sleep(2 * DELAY_SECONDS)
    assert batches == [[0, 1, 2, 3, 4], [5]]
    assert arrivals.pending == 0


async def test_flush_hands_over_at_once_and_only_once() -> None:
    batches: list[list[str]] = []
    arrivals: Arrivals[str] = Arrivals(batches.append)
    arrivals.add("pixel")
    arrivals.flush()
    assert batches == [["pixel"]]
    await asyncio.sleep(2 * DELAY_SECONDS)  # the cancelled timer hands over nothing more
    arrivals.flush()
    assert batches == [["pixel"]]


async def test_a_request_that_cannot_be_judged_costs_no_other_its_event(
    tmp_path: Path, nats_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its answer went out already; its event is counted as dropped and logged, and the other
    pixel loads and clicks judged in the same pass are stored."""
    monkeypatch.setattr(classify, "judge", judge_unless_odd)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    async with running_tracker(tmp_path, nats_url, click_burst_seconds=0.05) as tracker:
        site, keys = tracker.settings.site_url, [SECRET.encode()]
        async with aiohttp.ClientSession() as http:

            async def get(url: str, agent: str) -> int:
                async with http.get(url, headers={"User-Agent": agent}, allow_redirects=False) as response:
                    return response.status

            answers = await asyncio.gather(
                get(pixel_url(site, ids[0]), BROWSER_UA),
                get(pixel_url(site, ids[1]), "odd"),
                get(click_url(site, keys, ids[2], "https://shop.example.com/"), BROWSER_UA),
                get(pixel_url(site, ids[3]), BROWSER_UA),
            )
        assert answers == [200, 200, 302, 200]
        await eventually(lambda: asyncio.sleep(0, tracker.publisher.published == 3))
        assert tracker.publisher.dropped == 1
    stored = await stream_events(nats_url)
    assert Counter(e.type.value for e in stored) == {"opened": 2, "clicked": 1}
    assert sorted(e.tracking_id or "" for e in stored) == sorted([ids[0], ids[2], ids[3]])
    assert "could not be judged" in caplog.text


async def test_failures_while_judging_or_releasing_give_back_their_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pixel that cannot be judged and a held click that cannot be encoded, among others
    handed over together: each costs its own event only, counted as dropped, and the room
    the click had reserved in the buffer is given back."""
    encode = engagement.engagement_message

    def encode_unless_odd(event_type: object, tracking_id: str, *rest: object) -> object:
        if tracking_id == "00000000-0000-4000-8000-00000000000c":
            raise RuntimeError("simulated encoding failure")
        return encode(event_type, tracking_id, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(engagement, "engagement_message", encode_unless_odd)
    monkeypatch.setattr(classify, "judge", judge_unless_odd)
    publisher = EventPublisher(None, buffer_limit=100)
    tracker = engagement.Engagement(make_settings(tmp_path), publisher)
    browser = CIMultiDictProxy(CIMultiDict({"User-Agent": BROWSER_UA}))
    odd = CIMultiDictProxy(CIMultiDict({"User-Agent": "odd"}))
    ids = [f"00000000-0000-4000-8000-00000000000{digit}" for digit in "abcd"]
    link = "https://shop.example.com/"
    try:
        tracker.arrivals.add((ids[0], None, 1e9, 1.0, "GET", browser, "198.51.100.7"))
        tracker.arrivals.add((ids[1], None, 1e9, 1.0, "GET", odd, "198.51.100.7"))
        tracker.arrivals.add((ids[2], link, 1e9, 1.0, "GET", browser, "198.51.100.7"))
        tracker.arrivals.add((ids[3], link, 1e9, 1.0, "GET", browser, "198.51.100.7"))
        tracker.flush()  # judged, then the held clicks released
        assert (publisher.buffered, publisher.dropped, publisher.reserved) == (2, 2, 0)
        assert tracker.held == 0
    finally:
        await publisher.close(drain_timeout=0.1)


async def test_stopping_hands_over_requests_still_noted(tmp_path: Path, nats_url: str) -> None:
    """Requests answered just before shutdown, not judged yet, are stored all the same."""
    ids = [str(uuid.uuid4()) for _ in range(2)]
    async with running_tracker(tmp_path, nats_url, click_burst_seconds=30) as tracker:
        noted = tracker.service._app[ENGAGEMENT_KEY]  # type: ignore[index]
        noted.arrivals = Arrivals(noted._hand_over, delay=60)  # not before shutdown
        site, keys = tracker.settings.site_url, [SECRET.encode()]
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http:
            async with http.get(pixel_url(site, ids[0])) as response:
                assert response.status == 200
            url = click_url(site, keys, ids[1], "https://shop.example.com/")
            async with http.get(url, allow_redirects=False) as response:
                assert response.status == 302
        assert noted.arrivals.pending == 2
    stored = await stream_events(nats_url)
    assert sorted((e.type.value, e.tracking_id) for e in stored) == [("clicked", ids[1]), ("opened", ids[0])]
