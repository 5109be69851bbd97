"""Never down: pixel and click keep answering while NATS is unreachable, and nothing is lost or doubled.

These run the production path (``StandaloneTracker``: serve first, connect to NATS in the
background) against a real nats-server that is stopped by its PID and restarted on the
same port and store directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailbeacon.app.embedded_nats import EmbeddedNats
from mailbeacon.contract.signing import click_url, pixel_url
from tests.esp_payloads.harness import BROWSER_UA, FakeSns, sendgrid_headers, stream_events, webhook_settings
from tests.support import SECRET, eventually, free_port, make_settings, metric_value
from tracker import service as tracker_service
from tracker.engagement import arrivals
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
    # The events of requests answered so far reach the publisher within DELAY_SECONDS (on
    # this loop: that timer is due before this sleep ends).
    await asyncio.sleep(2 * arrivals.DELAY_SECONDS)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


async def test_held_clicks_count_against_the_buffer_limit_and_none_is_lost_at_shutdown(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """Clicks sitting out the burst window take their room in the buffer when they arrive:
    a click that does not fit is counted as dropped then, and every click that was held
    is stored when shutdown releases them into the buffer."""
    settings = make_settings(
        tmp_path,
        nats_url=nats_server.url,
        event_buffer_limit=40,
        shutdown_drain_seconds=15,
        click_burst_seconds=30,  # held until shutdown
    )
    async with aiohttp.ClientSession() as http:
        tracker = StandaloneTracker(settings)
        await tracker.start()
        try:
            await eventually(lambda: asyncio.sleep(0, tracker.publisher.connected))
            await asyncio.to_thread(nats_server.stop)
            site = settings.site_url
            opened = [str(uuid.uuid4()) for _ in range(30)]
            for tid in opened:
                async with http.get(pixel_url(site, tid)) as response:
                    assert response.status == 200
            clicked = [str(uuid.uuid4()) for _ in range(20)]
            for tid in clicked:
                url = click_url(site, [SECRET.encode()], tid, "https://shop.example.com/")
                async with http.get(url, allow_redirects=False) as response:
                    assert response.status == 302  # the redirect never depends on room for the event
            exposition = await metrics(http, tracker)
            assert metric_value(exposition, "mailbeacon_tracker_buffered_events") == 30
            assert metric_value(exposition, "mailbeacon_tracker_held_clicks") == 10
            assert metric_value(exposition, "mailbeacon_tracker_dropped_events") == 10
            await asyncio.to_thread(nats_server.start)
        finally:
            await tracker.stop()
        assert tracker.publisher.dropped == 10  # releasing the held clicks dropped none of them
    stored = await stream_events(nats_server.url)
    assert Counter(e.type.value for e in stored) == {"opened": 30, "clicked": 10}
    assert sorted(e.tracking_id or "" for e in stored) == sorted(opened + clicked[:10])


@pytest.mark.slow
async def test_cli_tracker_with_workers_shares_the_port_and_drains_on_sigterm(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """``mailbeacon tracker --workers 2`` as operators run it: SO_REUSEPORT workers, SIGTERM drains."""
    port = free_port()
    env = {
        **os.environ,
        "MAILBEACON_NATS_URL": nats_server.url,
        "MAILBEACON_SECRET_KEYS": SECRET,
        "MAILBEACON_TRACKER_LISTEN": f"127.0.0.1:{port}",
        "MAILBEACON_SITE_URL": f"http://127.0.0.1:{port}",
        "MAILBEACON_CLICK_BURST_SECONDS": "5",  # clicks are still held when SIGTERM arrives
    }
    command = [str(Path(sys.executable).parent / "mailbeacon"), "tracker", "--workers", "2"]
    process = await asyncio.create_subprocess_exec(*command, env=env, start_new_session=True)
    ids = [str(uuid.uuid4()) for _ in range(40)]
    try:
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http:

            async def serving() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(serving, within=30)
            site = f"http://127.0.0.1:{port}"
            for index, tid in enumerate(ids):
                # A fresh connection per request, so the kernel spreads them over both workers.
                async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as once:
                    if index % 2:
                        url = click_url(site, [SECRET.encode()], tid, "https://shop.example.com/")
                        async with once.get(url, allow_redirects=False) as response:
                            assert response.status == 302
                    else:
                        async with once.get(pixel_url(site, tid)) as response:
                            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stored = await stream_events(nats_server.url)
    assert sorted(e.tracking_id or "" for e in stored) == sorted(ids)


async def test_a_nats_that_lost_its_store_gets_the_stream_back(
    tmp_path: Path, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracker_service, "PROVISION_CHECK_SECONDS", 0.2)
    ids = [str(uuid.uuid4()) for _ in range(10)]
    async with standalone(tmp_path, nats_server.url) as tracker, aiohttp.ClientSession() as http:
        await eventually(lambda: asyncio.sleep(0, tracker.publisher.connected))
        await asyncio.to_thread(nats_server.stop)
        shutil.rmtree(nats_server.store_dir / "jetstream")  # a pod without a persistent volume
        await asyncio.to_thread(nats_server.start)
        for tid in ids:
            async with http.get(pixel_url(tracker.settings.site_url, tid)) as response:
                assert response.status == 200

        async def stored() -> list[Any]:
            events = await stream_events(nats_server.url)
            assert len(events) == len(ids)
            return events

        events = await eventually(stored, within=20)
    assert sorted(e.tracking_id or "" for e in events) == sorted(ids)
