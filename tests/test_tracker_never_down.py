"""Never down: pixel and click keep answering while NATS is unreachable, and nothing is lost or doubled.

These run the production path (``StandaloneTracker``: serve first, connect to NATS in the
background) against a real nats-server that is stopped by its PID and restarted on the
same port and store directory.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from mailbeacon.embedded_nats import EmbeddedNats
from mailbeacon.signing import click_url, pixel_url
from tests.esp_payloads.harness import BROWSER_UA, FakeSns, sendgrid_headers, stream_events, webhook_settings
from tests.support import SECRET, eventually, free_port, make_settings, metric_value
from tracker.service import StandaloneTracker


@asynccontextmanager
async def standalone(tmp_path: Path, nats_url: str, **overrides: Any) -> AsyncIterator[StandaloneTracker]:
    settings = make_settings(tmp_path, nats_url=nats_url, **webhook_settings(tmp_path, **overrides))
    tracker = StandaloneTracker(settings, sns_http_get=FakeSns().get)
    await tracker.start()
    try:
        yield tracker
    finally:
        await tracker.stop()


async def metrics(http: aiohttp.ClientSession, tracker: StandaloneTracker) -> str:
    async with http.get(f"http://127.0.0.1:{tracker.service.port}/metrics") as response:
        return await response.text()


class Load:
    """Clients opening and clicking, each request for a fresh copy, counting every answer."""

    def __init__(self, tracker: StandaloneTracker, clients: int = 12) -> None:
        self.site = tracker.settings.site_url
        self.keys = [SECRET.encode()]
        self.clients = clients
        self.answers: Counter[int] = Counter()
        self.sent: list[str] = []  # tracking ids of requests that were answered as they should be
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self, index: int) -> None:
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http:
            while not self._stop.is_set():
                tracking_id = str(uuid.uuid4())
                if index % 2:
                    url = click_url(self.site, self.keys, tracking_id, "https://shop.example.com/")
                    expected = 302
                else:
                    url, expected = pixel_url(self.site, tracking_id), 200
                async with http.get(url, allow_redirects=False) as response:
                    await response.read()
                    self.answers[response.status] += 1
                    if response.status == expected:
                        self.sent.append(tracking_id)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_stopping_nats_under_load_loses_and_doubles_nothing(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    async with standalone(tmp_path, nats_server.url) as tracker, aiohttp.ClientSession() as http:
        await eventually(lambda: asyncio.sleep(0, tracker.publisher.connected))
        load = Load(tracker)
        load.start()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(nats_server.stop)  # SIGTERM to the nats-server PID
        await asyncio.sleep(1.5)
        during = await metrics(http, tracker)
        assert metric_value(during, "mailbeacon_tracker_nats_connected") == 0
        assert metric_value(during, "mailbeacon_tracker_buffered_events") > 0
        served_while_down = sum(load.answers.values())
        await asyncio.to_thread(nats_server.start)  # same port, same store directory
        await asyncio.sleep(1.0)
        await load.stop()
        assert set(load.answers) == {200, 302}, load.answers  # no request failed, before, during or after
        assert len(load.sent) > served_while_down > 50

        async def drained() -> bool:
            return (
                tracker.publisher.connected and tracker.publisher.buffered == 0 and tracker.service.held == 0
            )

        await eventually(drained, within=20)
        assert metric_value(await metrics(http, tracker), "mailbeacon_tracker_dropped_events") == 0
    stored = await stream_events(nats_server.url)
    per_copy = Counter(event.tracking_id for event in stored)
    assert set(per_copy) == set(load.sent)  # every answered request's event arrived ...
    assert set(per_copy.values()) == {1}  # ... exactly once
    assert len({event.event_id for event in stored}) == len(stored) == len(load.sent)


async def test_a_tracker_started_while_nats_is_down_serves_and_catches_up(tmp_path: Path) -> None:
    port = free_port()
    nats = EmbeddedNats(tmp_path / "late-nats", port=port)
    tid = str(uuid.uuid4())
    body = json.dumps([{"event": "delivered", "email": "a@example.com", "sg_event_id": "late-1"}]).encode()
    try:
        async with (
            standalone(tmp_path, f"nats://127.0.0.1:{port}") as tracker,
            aiohttp.ClientSession() as http,
        ):
            site = tracker.settings.site_url
            async with http.get(pixel_url(site, tid)) as response:
                assert (response.status, response.content_type) == (200, "image/gif")
            url = click_url(site, [SECRET.encode()], tid, "https://shop.example.com/")
            async with http.get(url, allow_redirects=False) as response:
                assert response.status == 302
            started = time.monotonic()
            async with http.post(
                f"{site}/webhooks/sendgrid", data=body, headers=sendgrid_headers(body)
            ) as response:
                assert response.status == 503  # the provider keeps it and retries
                assert time.monotonic() - started < 1.0  # and is told at once
            await asyncio.to_thread(nats.start)

            async def both_stored() -> list[Any]:
                events = await stream_events(nats.url)  # the tracker provisioned the stream itself
                assert len(events) == 2
                return events

            events = await eventually(both_stored, within=20)
            async with http.post(
                f"{site}/webhooks/sendgrid", data=body, headers=sendgrid_headers(body)
            ) as response:
                assert response.status == 200
    finally:
        nats.stop()
    assert sorted(e.type.value for e in events) == ["clicked", "opened"]


async def test_graceful_shutdown_drains_and_a_full_buffer_counts_drops(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    async with aiohttp.ClientSession() as http:
        tracker = StandaloneTracker(
            make_settings(
                tmp_path, nats_url=nats_server.url, event_buffer_limit=40, shutdown_drain_seconds=15
            )
        )
        await tracker.start()
        try:
            await eventually(lambda: asyncio.sleep(0, tracker.publisher.connected))
            await asyncio.to_thread(nats_server.stop)
            site = tracker.settings.site_url
            ids = [str(uuid.uuid4()) for _ in range(60)]
            for tid in ids:
                async with http.get(pixel_url(site, tid)) as response:
                    assert response.status == 200  # even the ones that no longer fit
            exposition = await metrics(http, tracker)
            assert metric_value(exposition, "mailbeacon_tracker_buffered_events") == 40
            assert metric_value(exposition, "mailbeacon_tracker_dropped_events") == 20
            await asyncio.to_thread(nats_server.start)
        finally:
            await tracker.stop()  # returns once the buffer is published (or the drain time is up)
    stored = await stream_events(nats_server.url)
    assert sorted(e.tracking_id or "" for e in stored) == sorted(ids[:40])
