"""Live statistics: ``GET /api/campaigns/{ns}/{name}/stream`` as Server-Sent Events
(docs/aggregator.md, "Live statistics").

One watcher per followed campaign and process reads the campaign's ``updated_at`` (one row
by its key) once a second, however many browsers follow it. Only when it moved are the
statistics read, once per view (per day or hour, time zone) someone follows, and handed to
every subscriber of that view; the pages' live updates render from the same snapshot. A
replica sees what the others ingested: the change is in the shared database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from aiohttp import web
from sqlalchemy import select

from aggregator.read import series, statistics
from aggregator.read.api import flag, known_campaign
from aggregator.read.series import BadZone
from aggregator.store.db import Database
from aggregator.store.models import STATS
from mailbeacon.web.server import json_error

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
MIN_GAP_SECONDS = 1.0  # at most one update a second per stream
HEARTBEAT_SECONDS = 15.0  # a comment line, so proxies and load balancers keep the stream open
CHECK_SECONDS = 1.0  # how often an idle stream looks whether its browser is still there
DEFAULT_MAX_STREAMS = 100


@dataclass(frozen=True)
class View:
    """What a subscriber follows besides the campaign: opens per hour or day, and the time
    zone of the engagement heatmap (None: UTC)."""

    hourly: bool = False
    tz: str | None = None


def parse_zone(value: str | None) -> str | None:
    """``?tz=``: an IANA zone name (``Europe/Berlin``), or None for UTC; BadZone otherwise
    (the statistics read's own rule, aggregator.read.series.parse_zone)."""
    zone = series.parse_zone(value)
    return None if zone is UTC else str(value).strip()


def zone_applied(view: View) -> str | None:
    """The time zone the statistics read computes the heatmap in for ``view`` (None: UTC)."""
    return view.tz


async def read_view(db: Database, campaign: str, view: View) -> dict[str, Any]:
    return await statistics.read_statistics(db, campaign, hourly=view.hourly, zone=series.parse_zone(view.tz))


@dataclass(eq=False)
class Subscriber:
    campaign: str
    view: View
    latest: str | None = None  # the newest payload not yet sent; older ones are skipped
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, payload: str) -> None:
        self.latest = payload
        self.wake.set()

    async def next(self, within: float) -> str | None:
        """The newest payload, or None after ``within`` seconds (or when the hub closes)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), within)
        self.wake.clear()
        payload, self.latest = self.latest, None
        return payload


@dataclass(eq=False)
class _Watch:
    subscribers: set[Subscriber] = field(default_factory=set)
    stamp: object = None
    snapshots: dict[View, tuple[object, dict[str, Any], str]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


class StatisticsHub:
    """The watchers of one process, and its cap on concurrent streams."""

    def __init__(self, db: Database, max_streams: int = DEFAULT_MAX_STREAMS, poll: float = POLL_SECONDS):
        self.db = db
        self.max_streams = max_streams
        self.poll = poll
        self.closing = False
        self._watches: dict[str, _Watch] = {}

    @property
    def streams(self) -> int:
        return sum(len(w.subscribers) for w in self._watches.values())

    def full(self) -> bool:
        return self.streams >= self.max_streams

    async def _stamp(self, campaign: str) -> object:
        """When the campaign's counters last moved: compared for equality only."""
        async with self.db.read_engine.connect() as conn:
            return await conn.scalar(select(STATS.c.updated_at).where(STATS.c.campaign == campaign))

    async def _snapshot(self, campaign: str, watch: _Watch, view: View, stamp: object) -> str:
        kept = watch.snapshots.get(view)
        if kept is not None and kept[0] == stamp and stamp is not None:
            return kept[2]
        data = await read_view(self.db, campaign, view)
        payload = json.dumps(data, separators=(",", ":"))
        watch.snapshots[view] = (stamp, data, payload)
        return payload

    def snapshot(self, campaign: str, view: View) -> dict[str, Any] | None:
        """The statistics last streamed for this view, while someone follows it: at most one
        poll (a second) old. The live page updates render from it instead of the database."""
        watch = self._watches.get(campaign)
        kept = watch.snapshots.get(view) if watch is not None else None
        return kept[1] if kept is not None else None

    async def subscribe(self, campaign: str, view: View) -> Subscriber:
        """A new stream's subscriber, offered the current statistics at once."""
        subscriber = Subscriber(campaign, view)
        watch = self._watches.setdefault(campaign, _Watch())
        watch.subscribers.add(subscriber)  # counted against the cap before anything is awaited
        try:
            stamp = await self._stamp(campaign)
            subscriber.offer(await self._snapshot(campaign, watch, view, stamp))
        except BaseException:
            self.unsubscribe(subscriber)
            raise
        if watch.task is None:
            watch.stamp = stamp
            watch.task = asyncio.create_task(
                self._follow(campaign, watch), name=f"statistics-stream {campaign}"
            )
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        watch = self._watches.get(subscriber.campaign)
        if watch is None:
            return
        watch.subscribers.discard(subscriber)
        if not watch.subscribers:
            del self._watches[subscriber.campaign]
            if watch.task is not None:
                watch.task.cancel()

    async def _follow(self, campaign: str, watch: _Watch) -> None:
        while watch.subscribers:
            await asyncio.sleep(self.poll)
            try:
                stamp = await self._stamp(campaign)
                if stamp == watch.stamp:
                    continue
                watch.stamp = stamp
                for view in {s.view for s in watch.subscribers}:
                    payload = await self._snapshot(campaign, watch, view, stamp)
                    for subscriber in [s for s in watch.subscribers if s.view == view]:
                        subscriber.offer(payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away for a moment: try again next second
                log.warning("reading statistics for the live stream of %s failed: %s", campaign, exc)

    async def close(self, _: web.Application | None = None) -> None:
        """Shutdown: every stream ends at once (its handler returns) and the watchers stop."""
        self.closing = True
        for watch in list(self._watches.values()):
            for subscriber in watch.subscribers:
                subscriber.wake.set()
            if watch.task is not None:
                watch.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch.task


HUB_KEY = web.AppKey("statistics_hub", StatisticsHub)
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx (and ingress-nginx) would hold the events back otherwise
}


def view_from(request: web.Request) -> View:
    """``?hourly=`` and ``?tz=`` of a request; a 400 with a JSON reason when malformed."""
    try:
        return View(flag(request, "hourly"), parse_zone(request.query.get("tz")))
    except BadZone as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"status": "error", "error": str(exc)}), content_type="application/json"
        ) from exc


async def stream(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    campaign = await known_campaign(request)
    view = view_from(request)
    if hub.closing or hub.full():
        refusal = json_error(503, "too many live statistics streams on this aggregator; retry later")
        refusal.headers["Retry-After"] = "10"
        return refusal
    subscriber = await hub.subscribe(campaign, view)
    response = web.StreamResponse(headers=STREAM_HEADERS)
    try:
        await response.prepare(request)
        await response.write(b"retry: 5000\n\n")  # how long an EventSource waits to reconnect
        sent_at, written_at = float("-inf"), time.monotonic()
        # A browser that went away is noticed within a second (aiohttp does not cancel the
        # handler), so its slot under the cap frees at once.
        while not hub.closing and request.transport is not None and not request.transport.is_closing():
            payload = await subscriber.next(CHECK_SECONDS)
            if hub.closing:
                break
            if payload is None:
                if time.monotonic() - written_at >= HEARTBEAT_SECONDS:
                    await response.write(b": keepalive\n\n")
                    written_at = time.monotonic()
                continue
            gap = sent_at + MIN_GAP_SECONDS - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
                payload = subscriber.latest or payload  # what came meanwhile replaces it
                subscriber.latest = None
                subscriber.wake.clear()
            await response.write(f"event: statistics\ndata: {payload}\n\n".encode())
            sent_at = written_at = time.monotonic()
        await response.write_eof()
    except ConnectionError:  # the browser went away
        pass
    finally:
        hub.unsubscribe(subscriber)
    return response


def add_stream_routes(app: web.Application, db: Database, max_streams: int) -> None:
    hub = StatisticsHub(db, max_streams)
    app[HUB_KEY] = hub
    app.on_shutdown.append(hub.close)
    app.router.add_get("/api/campaigns/{ns}/{name}/stream", stream)
