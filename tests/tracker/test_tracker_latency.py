"""``mailbeacon_tracker_request_seconds``: the tracker's answer times, by a fixed route name."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mailbeacon.contract.signing import click_url, pixel_url
from tests.esp_payloads.harness import BROWSER_UA, running_tracker
from tests.support import SECRET, metric_value
from tracker.metrics import LATENCY_BUCKETS, ROUTES, RequestLatency

TIDS = [f"7c0e3a52-41d2-4f4b-9a51-0c6f2b8e1d{n:02d}" for n in range(10)]
METRIC = "mailbeacon_tracker_request_seconds"


def histogram(exposition: str, route: str) -> dict[str, float]:
    """``le`` -> cumulative count, plus ``count`` and ``sum``, of one route."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name.startswith(METRIC) and sample.labels.get("route") == route:
                key = sample.labels.get("le") or sample.name.removeprefix(f"{METRIC}_")
                found[key] = sample.value
    return found


async def test_pixel_click_and_webhook_answers_are_timed_by_route(tmp_path: Path, nats_url: str) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        site, keys = tracker.settings.site_url, [SECRET.encode()]

        async def exposition() -> str:
            async with http.get(f"{tracker.url}/metrics") as response:
                return await response.text()

        before = await exposition()
        for tid in TIDS[:3]:
            async with http.get(pixel_url(site, tid), headers={"User-Agent": BROWSER_UA}) as response:
                assert response.status == 200
        for tid in TIDS[3:5]:
            url = click_url(site, keys, tid, f"https://shop.example.com/item/{tid}")
            async with http.get(url, allow_redirects=False, headers={"User-Agent": BROWSER_UA}) as response:
                assert response.status == 302
        forged = f"{site}/track/click/{TIDS[5]}/?url=https://evil.example.net/&sig=forged"
        async with http.get(forged, allow_redirects=False) as response:
            assert response.status == 400  # refused answers are timed too
        async with http.post(f"{site}/webhooks/sendgrid", data=b"[]") as response:
            assert response.status == 401
        async with http.post(f"{site}/webhooks/{TIDS[6]}", data=b"{}") as response:
            assert response.status == 404  # an unknown provider in the path becomes no label
        after = await exposition()

    for route, expected in (("pixel", 3), ("click", 3), ("webhook", 2), ("unsubscribe", 0)):
        old, new = histogram(before, route), histogram(after, route)
        assert new["count"] - old["count"] == expected, route
        assert new["+Inf"] == new["count"], route
        cumulative = [new[repr(bound)] for bound in LATENCY_BUCKETS]
        assert cumulative == sorted(cumulative), route
        assert new["sum"] >= old["sum"] and (expected == 0 or new["sum"] > old["sum"]), route
    # Answered from memory: a pixel takes well under 100 ms even on a busy test machine.
    assert (
        metric_value(after, f"{METRIC}_bucket", route="pixel", le="0.1")
        - metric_value(before, f"{METRIC}_bucket", route="pixel", le="0.1")
        == 3
    )
    # Labels are route names only: never a tracking id, a URL or a path segment.
    routes = {
        sample.labels["route"]
        for family in text_string_to_metric_families(after)
        for sample in family.samples
        if sample.name.startswith(METRIC)
    }
    assert routes == set(ROUTES)
    assert not any(tid in line for line in after.splitlines() if line.startswith(METRIC) for tid in TIDS)


async def test_each_answer_lands_in_the_bucket_of_its_duration() -> None:
    latency = RequestLatency()  # not registered: its own counts only

    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.03)
        return web.Response()

    async def failing(_: web.Request) -> web.StreamResponse:
        raise RuntimeError("handler failed")

    timed_slow, timed_failing = latency.timed("webhook", slow), latency.timed("pixel", failing)
    request = object()
    await timed_slow(request)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):  # the handler's failure passes through, timed
        await timed_failing(request)  # type: ignore[arg-type]
    family = next(iter(latency.collect()))
    samples = {(s.name, s.labels["route"], s.labels.get("le")): s.value for s in family.samples}
    assert samples[(f"{METRIC}_bucket", "webhook", "0.025")] == 0  # at least 30 ms ...
    assert samples[(f"{METRIC}_bucket", "webhook", "10.0")] == 1  # ... and counted once
    assert samples[(f"{METRIC}_count", "webhook", None)] == 1
    assert samples[(f"{METRIC}_sum", "webhook", None)] >= 0.03
    assert samples[(f"{METRIC}_count", "pixel", None)] == 1  # a failed answer still counts
    assert samples[(f"{METRIC}_bucket", "pixel", "0.1")] == 1
    assert samples[(f"{METRIC}_count", "click", None)] == 0
