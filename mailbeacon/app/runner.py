"""The composition root: one component, or the whole system in one process (`mailbeacon up`).

This is the only place (with the command line) that imports the components; they never
import each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nats.aio.client import Client as NATS
from pydantic import SecretStr

from mailbeacon.app.devstate import UpState, remove_state, write_state
from mailbeacon.app.embedded_nats import EmbeddedNats
from mailbeacon.app.outbox import Outbox
from mailbeacon.bus.campaign_store import CampaignStore
from mailbeacon.bus.jetstream import connect, ensure_suppression_bucket, provision
from mailbeacon.bus.nats_auth import NatsLogin
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.bus.spool import Spool
from mailbeacon.bus.suppressions import SuppressionList
from mailbeacon.contract.settings import MIN_SECRET_KEY_LENGTH, Settings, parse_listen
from mailbeacon.web.shutdown import wait_for_signal

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None: ...
    def begin_stopping(self) -> None:
        """SIGTERM came: /readyz answers 503 from now on, serving goes on until ``stop``."""

    async def stop(self) -> None: ...


def nats_url_file(settings: Settings) -> Path:
    return settings.data_dir / "nats.url"


def ensure_secret_key(settings: Settings) -> Settings:
    """Embedded mode: a signing key kept under DATA_DIR, so links survive restarts."""
    if settings.secret_keys:
        return settings
    path = settings.data_dir / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    key = path.read_text().strip()
    if len(key) < MIN_SECRET_KEY_LENGTH:
        # Not replaced silently: links already sent were signed with it and would stop working.
        raise SystemExit(
            f"{path} holds a signing key shorter than {MIN_SECRET_KEY_LENGTH} characters: "
            f"delete the file (a new key is generated; links already sent stop verifying) or set "
            f"MAILBEACON_SECRET_KEYS to a key of at least {MIN_SECRET_KEY_LENGTH} characters"
        )
    return settings.model_copy(update={"secret_keys": [SecretStr(key)]})


@dataclass
class Addresses:
    smtp: str
    tracker: str
    aggregator: str
    nats: str
    outbox: Path | None
    proxy_http: str = ""  # the proxy's /healthz, /readyz and /metrics


def _http(listen: str, port: int | None) -> str:
    host, configured = parse_listen(listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # listening everywhere: reachable here on loopback
    return f"http://[{host}]:{port or configured}" if ":" in host else f"http://{host}:{port or configured}"


class AllInOne:
    """Embedded NATS (unless NATS_URL), SQLite (unless DATABASE_URL), outbox (unless UPSTREAM_SMTP)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nats: EmbeddedNats | None = None
        self.outbox: Outbox | None = None
        self.nc: NATS | None = None
        self.publisher: EventPublisher | None = None
        self.store: CampaignStore | None = None
        self.components: list[Component] = []
        self.state_written = False

    async def start(self) -> Addresses:
        from aggregator.service import AggregatorService
        from smtp_proxy.service import ProxyService
        from tracker.service import TrackerService

        settings = ensure_secret_key(self.settings)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        nats_url = settings.nats.url
        if nats_url is None:
            self.nats = EmbeddedNats(settings.data_dir / "nats")
            # Started from this (the main) thread: the child's parent-death signal follows it.
            nats_url = self.nats.start()
            nats_url_file(settings).write_text(nats_url)
        updates: dict[str, object] = {
            "nats_url": nats_url,
            "auto_create_campaigns": True,
            "migrate_on_start": True,
        }
        if settings.proxy.upstream_smtp is None:
            self.outbox = Outbox(settings.data_dir / "outbox")
            await self.outbox.start()
            updates |= {"upstream_smtp": SecretStr(self.outbox.url), "outbox_dir": self.outbox.directory}
        settings = settings.model_copy(update=updates)
        self.nc = await connect(nats_url, "mailbeacon-up", NatsLogin.from_settings(settings))
        js = self.nc.jetstream()
        kv = await provision(js, settings)
        self.publisher = EventPublisher(js, spool=Spool.under(settings.data_dir))
        # What the last stop could not publish goes first, before anything is served.
        if self.publisher.load_spool():
            await self.publisher.spool_published()
        if self.outbox is not None:
            # The outbox is the final mailbox here: a kept copy is a delivered one.
            self.outbox.on_delivery = self.publisher.publish_or_buffer
        derive_site = "site_url" not in self.settings.model_fields_set
        if derive_site and parse_listen(settings.tracker.listen)[1]:
            # Links must reach this tracker wherever TRACKER_LISTEN puts it.
            settings = settings.model_copy(update={"site_url": _http(settings.tracker.listen, None)})
        self.store = CampaignStore(kv)
        await self.store.start()
        aggregator = AggregatorService(settings, js, kv)
        tracker = TrackerService(settings, self.publisher)
        for component in (aggregator, tracker):
            await component.start()
            self.components.append(component)
        tracker_url = _http(settings.tracker.listen, tracker.port)
        if derive_site:  # port 0: known only now
            settings = settings.model_copy(update={"site_url": tracker_url})
        suppressions = SuppressionList(await ensure_suppression_bucket(js, settings))
        # Each component serves its own /metrics on its own port (the proxy's on PROXY_HTTP_LISTEN):
        # one scrape target per component, as in a cluster, so no sum counts an event twice.
        proxy = ProxyService(settings, self.publisher, self.store, suppressions=suppressions)
        await proxy.start()
        self.components.append(proxy)
        host, _ = parse_listen(settings.proxy.smtp_listen)
        addresses = Addresses(
            smtp=f"{host}:{proxy.port}",
            tracker=tracker_url,
            aggregator=_http(settings.aggregator.listen, aggregator.port),
            nats=nats_url,
            outbox=self.outbox.directory if self.outbox else None,
            proxy_http=_http(settings.proxy.http_listen, proxy.http_port),
        )
        try:
            write_state(
                settings,
                UpState(os.getpid(), addresses.smtp, addresses.tracker, addresses.aggregator, nats_url),
            )
            self.state_written = True
        except OSError as exc:
            log.warning("other commands will not find this mailbeacon up (%s): set their addresses", exc)
        return addresses

    def begin_stopping(self) -> None:
        for component in self.components:
            component.begin_stopping()

    async def stop(self) -> None:
        # Proxy and tracker first, then flush their events (spooling what NATS does not take
        # by the drain deadline), then the aggregator.
        deadline = time.monotonic() + self.settings.shutdown_drain_seconds
        for component in reversed(self.components):
            if component is self.components[0] and self.publisher is not None:
                if self.outbox is not None:
                    await self.outbox.settle()  # its last deliveries, before the publisher closes
                await self.publisher.close(drain_timeout=max(0.0, deadline - time.monotonic()))
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", type(component).__name__)
        self.components.clear()
        if self.store is not None:
            await self.store.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.outbox is not None:
            await self.outbox.stop()
        if self.nats is not None:
            self.nats.stop()
            nats_url_file(self.settings).unlink(missing_ok=True)
        if self.state_written:
            remove_state(self.settings, os.getpid())


async def run_component(
    settings: Settings, build: Callable[[Settings, NATS], Awaitable[Component]], name: str
) -> None:
    """One component as its container runs it: connect, provision, serve until SIGTERM."""
    if not settings.nats.url:
        raise SystemExit(f"mailbeacon {name}: MAILBEACON_NATS_URL is required (or use `mailbeacon up`)")
    nc = await connect(settings.nats.url, f"mailbeacon-{name}", NatsLogin.from_settings(settings))
    component = await build(settings, nc)
    await component.start()
    try:
        await wait_for_signal(settings.shutdown_delay_seconds, component.begin_stopping)
    finally:
        await component.stop()
        await close_connection(nc)


async def close_connection(nc: NATS) -> None:
    """Drain the connection when NATS is there, else just close it (draining a connection
    that is reconnecting raises): a stop with NATS down is an orderly stop too."""
    try:
        if nc.is_connected:
            await asyncio.wait_for(nc.drain(), 5.0)
    except Exception as exc:
        log.info("NATS connection not drained (%s); closing it", exc)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
