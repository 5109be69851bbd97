"""Wiring: the tracker app served on TRACKER_LISTEN."""

from __future__ import annotations

import logging

from aiohttp import web

from mailbeacon.jetstream import EventPublisher
from mailbeacon.settings import Settings
from mailbeacon.signing import NoSigningKey
from mailbeacon.web import bound_port, serve
from tracker import metrics
from tracker.app import create_app

log = logging.getLogger(__name__)


class TrackerService:
    def __init__(self, settings: Settings, publisher: EventPublisher) -> None:
        if not settings.secret_keys:
            raise NoSigningKey("MAILBEACON_SECRET_KEYS is not set: the tracker cannot verify click links")
        self.settings = settings
        self.publisher = publisher
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        metrics.watch_publisher(self.publisher)
        self._runner = await serve(create_app(self.settings, self.publisher), self.settings.tracker_listen)
        self.port = bound_port(self._runner)
        log.info("tracker listening on port %s", self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
