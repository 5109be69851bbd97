"""A real aggregator with tokens for the authentication tests (test_aggregator_auth,
test_aggregator_login, test_aggregator_auth_clients)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict
from nats.aio.client import Client as NATS

from aggregator.ingest.ingest import apply_batch
from aggregator.service import AggregatorService
from mailbeacon.bus.jetstream import provision
from mailbeacon.contract.events import Event, EventType
from tests.support import make_settings

FULL = "full-access-token-0123456789abcdef"
READ = "read-only-token-0123456789abcdef"
CAMPAIGN = "default/auth"
RECIPIENT = "ann@example.com"
TRACKING_ID = "5b1f0a8e-6c1d-4c59-9a57-3c2f1e0d9b7a"


@dataclass
class Running:
    base: str
    service: AggregatorService
    http: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, CIMultiDict[str], str]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, self.base + path, headers=headers, allow_redirects=False, **kwargs
        ) as response:
            return response.status, CIMultiDict(response.headers), await response.text()


Start = Callable[..., Awaitable[Running]]


def seed() -> list[Event]:
    start = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    return [
        Event(
            event_id="auth-sent",
            type=EventType.SENT,
            tracking_id=TRACKING_ID,
            campaign=CAMPAIGN,
            recipient=RECIPIENT,
            occurred_at=start,
        ),
        Event(
            event_id="auth-open",
            type=EventType.OPENED,
            tracking_id=TRACKING_ID,
            occurred_at=start + timedelta(minutes=5),
            source="pixel",
            ip="203.0.113.7",
            user_agent="Mozilla/5.0 (secret agent)",
        ),
    ]


@contextlib.asynccontextmanager
async def aggregators(tmp_path: Path, nc: NATS, nats_url: str) -> AsyncIterator[Start]:
    """Starts aggregators with the given settings on 0.0.0.0 (unless told otherwise), with
    tokens FULL and READ, an outbox and a campaign whose one copy was opened."""
    services: list[AggregatorService] = []
    # Cookies for 127.0.0.1 too (aiohttp keeps none for IP addresses by default).
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    outbox = tmp_path / "outbox"
    outbox.mkdir(exist_ok=True)
    (outbox / "one.eml").write_bytes(
        b"From: shop@example.com\r\nDelivered-To: ann@example.com\r\nSubject: hi\r\n\r\nHello\r\n"
    )

    async def starting(**overrides: Any) -> Running:
        values: dict[str, Any] = {
            "nats_url": nats_url,
            "aggregator_listen": "0.0.0.0:0",
            "outbox_dir": str(outbox),
            "migrate_on_start": True,
            "api_tokens": FULL,
            "api_read_tokens": READ,
        }
        values.update(overrides)
        settings = make_settings(tmp_path, **values)
        service = AggregatorService(settings, nc.jetstream(), await provision(nc.jetstream(), settings))
        await service.start()
        services.append(service)
        await apply_batch(service.db, seed())
        return Running(f"http://127.0.0.1:{service.port}", service, http)

    try:
        yield starting
    finally:
        await http.close()
        for service in services:
            await service.stop()
