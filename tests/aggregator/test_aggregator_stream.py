"""Live statistics as Server-Sent Events: a pixel fetched from a real tracker reaches a
browser's stream through NATS and the aggregator within two seconds; the stream is guarded
like the API, capped per process, polled once per campaign however many follow it, kept
open by heartbeats and ended at once on shutdown. Real nats-server, SQL and HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import smtplib
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from aggregator.ingest.ingest import apply_batch
from aggregator.read import live
from aggregator.service import create_app
from aggregator.store.db import open_database
from aggregator.store.migrate import migrate
from mailbeacon.app.runner import AllInOne
from tests.auth_support import CAMPAIGN, FULL, READ, aggregators, seed
from tests.support import SmtpSink, eventually, make_settings


class EventStream:
    """A client of one stream: its ``statistics`` events and comment lines, as they come."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments = 0

    async def next_statistics(self, within: float) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            kind, data = "", ""
            while True:
                line = (await self.response.content.readline()).decode()
                if line == "":
                    raise EOFError("the stream ended")
                line = line.rstrip("\n")
                if line.startswith(":"):
                    self.comments += 1
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and kind == "statistics":
                    return dict(json.loads(data))

        return await asyncio.wait_for(read(), within)


@contextlib.asynccontextmanager
async def following(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> AsyncIterator[EventStream]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None), **kwargs) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-store"
        yield EventStream(response)


def _send(port: int, recipient: str) -> None:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "news@shop.example.com", recipient, "Live"
    mail["X-Campaign"] = "live"
    mail.set_content("Hello")
    mail.add_alternative("<html><body><p>Hello</p></body></html>", subtype="html")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(mail)


@pytest.mark.slow
async def test_one_pixel_fetch_reaches_the_stream_within_two_seconds(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    settings = make_settings(
        tmp_path, nats_url=nats_url, upstream_smtp=sink.url, database_url=f"sqlite:///{tmp_path / 'live.db'}"
    )
    system = AllInOne(settings)
    addresses = await system.start()
    try:
        smtp_port = int(addresses.smtp.rsplit(":", 1)[1])
        await asyncio.to_thread(_send, smtp_port, "ann@example.com")
        (copy,) = sink.messages
        tracking_id = next(
            line.split(b": ", 1)[1].decode().strip()
            for line in copy.content.splitlines()
            if line.startswith(b"X-Mailbeacon-Tracking-ID:")
        )
        url = f"{addresses.aggregator}/api/campaigns/default/live/stream"
        async with aiohttp.ClientSession() as http:

            async def sent_is_counted() -> bool:
                async with http.get(f"{addresses.aggregator}/api/campaigns/default/live/statistics") as r:
                    return r.status == 200 and (await r.json())["sent_count"] == 1

            await eventually(sent_is_counted, within=15)
            async with following(http, url) as events:
                first = await events.next_statistics(within=2)
                assert first["campaign"] == "default/live"
                assert (first["sent_count"], first["total_opens"]) == (1, 0)
                async with http.get(f"{addresses.tracker}/track/pixel/{tracking_id}/") as pixel:
                    assert pixel.status == 200
                fetched = time.monotonic()
                update = await events.next_statistics(within=2)
                took = time.monotonic() - fetched
                assert update["total_opens"] == 1 and update["unique_opens"] == 1, update
                assert took < 2.0
    finally:
        await system.stop()


@contextlib.asynccontextmanager
async def local_aggregator(
    tmp_path: Path, max_streams: int = 100
) -> AsyncIterator[tuple[str, web.AppRunner]]:
    db = open_database(f"sqlite:///{tmp_path / 'stream.db'}")
    await migrate(db)
    await apply_batch(db, seed())
    runner = web.AppRunner(create_app(db, None, max_streams=max_streams), shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", runner
    finally:
        await runner.cleanup()
        await db.dispose()


@pytest.mark.slow
async def test_streams_beyond_the_cap_are_refused_and_a_slot_frees_when_one_ends(tmp_path: Path) -> None:
    async with local_aggregator(tmp_path, max_streams=2) as (base, _), aiohttp.ClientSession() as http:
        url = f"{base}/api/campaigns/{CAMPAIGN}/stream"
        async with following(http, url) as one, following(http, url) as two:
            await one.next_statistics(within=2)
            await two.next_statistics(within=2)
            async with http.get(url) as third:
                assert third.status == 503 and third.headers["Retry-After"] == "10"
                assert "too many" in (await third.json())["error"]

        async def slot_free() -> bool:
            async with http.get(url) as again:
                return again.status == 200

        await eventually(slot_free, within=5)


async def test_bad_views_and_unknown_campaigns_get_json_errors(tmp_path: Path) -> None:
    async with local_aggregator(tmp_path) as (base, _), aiohttp.ClientSession() as http:
        for path, status in [
            (f"/api/campaigns/{CAMPAIGN}/stream?tz=Mars/Olympus", 400),
            (f"/api/campaigns/{CAMPAIGN}/stream?tz=../../etc/passwd", 400),
            (f"/api/campaigns/{CAMPAIGN}/stream?hourly=maybe", 400),
            ("/api/campaigns/default/nothing-here/stream", 404),
            ("/api/campaigns/Bad_Namespace/x/stream", 400),
        ]:
            async with http.get(base + path) as response:
                assert response.status == status, path
                assert "error" in await response.json()
        async with following(
            http, f"{base}/api/campaigns/{CAMPAIGN}/stream?tz=Europe/Berlin&hourly=true"
        ) as s:
            assert (await s.next_statistics(within=2))["campaign"] == CAMPAIGN


@pytest.mark.slow
async def test_many_followers_share_one_poll_and_see_each_change_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = {"stamp": 0, "statistics": 0}
    stamp, read_view = live.StatisticsHub._stamp, live.read_view

    async def counted_stamp(self: live.StatisticsHub, campaign: str) -> object:
        reads["stamp"] += 1
        return await stamp(self, campaign)

    async def counted_read(*args: Any) -> dict[str, Any]:
        reads["statistics"] += 1
        return await read_view(*args)

    monkeypatch.setattr(live.StatisticsHub, "_stamp", counted_stamp)
    monkeypatch.setattr(live, "read_view", counted_read)
    async with local_aggregator(tmp_path) as (base, runner), aiohttp.ClientSession() as http:
        url = f"{base}/api/campaigns/{CAMPAIGN}/stream"
        async with contextlib.AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(following(http, url)) for _ in range(5)]
            for s in streams:
                assert (await s.next_statistics(within=2))["total_opens"] == 1
            reads.update(stamp=0, statistics=0)
            await asyncio.sleep(3.2)
            assert 2 <= reads["stamp"] <= 4, reads  # one poll a second for all five
            assert reads["statistics"] == 0, reads  # nothing changed: nothing read, nothing sent
            db = runner.app[live.HUB_KEY].db
            extra = seed()[1].model_copy(update={"event_id": "stream-open-2"})
            await apply_batch(db, [extra])
            for s in streams:
                assert (await s.next_statistics(within=2.5))["total_opens"] == 2
            assert reads["statistics"] == 1, reads  # one read for the five


@pytest.mark.slow
async def test_heartbeats_keep_an_idle_stream_open_and_shutdown_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "HEARTBEAT_SECONDS", 0.3)
    monkeypatch.setattr(live, "CHECK_SECONDS", 0.1)
    async with contextlib.AsyncExitStack() as stack:
        base, runner = await stack.enter_async_context(local_aggregator(tmp_path))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        events = await stack.enter_async_context(following(http, f"{base}/api/campaigns/{CAMPAIGN}/stream"))
        await events.next_statistics(within=2)
        with pytest.raises(TimeoutError):
            await events.next_statistics(within=1.0)
        assert events.comments >= 2  # ": keepalive" lines while nothing changed
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 2.0  # not the 5 s shutdown timeout
        with pytest.raises(EOFError):
            await events.next_statistics(within=2)


async def test_the_stream_is_guarded_like_the_api(tmp_path: Path, nc: NATS, nats_url: str) -> None:
    async with aggregators(tmp_path, nc, nats_url) as start:
        running = await start()
        path = f"/api/campaigns/{CAMPAIGN}/stream"
        status, headers, _ = await running.call("GET", path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        async with following(
            running.http, running.base + path, headers={"Authorization": f"Bearer {READ}"}
        ) as s:
            assert (await s.next_statistics(within=2))["sent_count"] == 1
        # A browser's login session (cookie) follows it too, as the statistics page does.
        login = await running.http.get(running.base + "/login")
        csrf = login.cookies["mailbeacon_csrf"].value
        async with running.http.post(
            running.base + "/login",
            data={"token": FULL, "csrf_token": csrf, "next": "/"},
            allow_redirects=False,
        ) as response:
            assert response.status == 303
        async with following(running.http, running.base + path) as s:
            assert (await s.next_statistics(within=2))["sent_count"] == 1
