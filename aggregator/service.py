"""Wiring: database, JetStream consumer, campaign mirror and the web app on AGGREGATOR_LISTEN."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from pathlib import Path

from aiohttp import web
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from aggregator import metrics
from aggregator.auth.policy import AuthConfigError, AuthPolicy, policy_from_settings
from aggregator.auth.web import guard, install
from aggregator.ingest.consumer import EventConsumer
from aggregator.ingest.parked import bound_parked
from aggregator.ingest.suppressions import SuppressionRecorder
from aggregator.read.api import DB_KEY, add_api_routes
from aggregator.read.event_pages import add_event_page_routes
from aggregator.read.live import DEFAULT_MAX_STREAMS, add_stream_routes
from aggregator.read.outbox_pages import add_outbox_routes
from aggregator.read.pages import add_page_routes, layout
from aggregator.read.statistics import list_campaigns, provider_snapshot
from aggregator.store.db import Database, open_database, sqlite_url
from aggregator.store.migrate import ensure_schema
from aggregator.store.models import CAMPAIGNS
from aggregator.store.retention import prune
from mailbeacon.bus.campaign_store import CampaignStore
from mailbeacon.bus.jetstream import ensure_suppression_bucket
from mailbeacon.bus.nats_auth import NatsLogin
from mailbeacon.bus.suppressions import SuppressionList
from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec
from mailbeacon.contract.events import utcnow
from mailbeacon.contract.settings import Settings
from mailbeacon.web.server import add_health_routes, bound_port, json_errors, serve

log = logging.getLogger(__name__)

STATISTICS_METRICS_SECONDS = 10.0
RETENTION_EVERY_SECONDS = 3600.0
PARKED_EVERY_SECONDS = 30.0


def database_url(settings: Settings) -> str:
    return settings.aggregator.database_url_value() or sqlite_url(settings.data_dir)


def auth_policy(settings: Settings) -> AuthPolicy:
    """The aggregator's access policy; a one-line SystemExit when the settings would leave it
    open beyond loopback or contradict each other (docs/aggregator.md "Authentication")."""
    try:
        return policy_from_settings(settings)
    except AuthConfigError as exc:
        raise SystemExit(f"mailbeacon aggregator: {exc}") from None


def create_app(
    db: Database,
    outbox_dir: Path | None,
    ready: bool | None = None,
    auth: AuthPolicy | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
) -> web.Application:
    """The API and pages; ``auth`` None is the loopback default: open, nothing configured."""
    app = web.Application(middlewares=[json_errors, guard])
    install(app, auth or AuthPolicy())
    app[DB_KEY] = db
    add_api_routes(app)
    add_stream_routes(app, db, max_streams)
    add_page_routes(app)
    add_event_page_routes(app)  # here, not in add_page_routes: event pages import pages (layout)
    if outbox_dir is not None:
        add_outbox_routes(app, outbox_dir)
    else:

        async def no_outbox(request: web.Request) -> web.Response:
            return layout(
                request,
                "Outbox",
                "<h1>Outbox</h1><p>Mail is relayed to the real upstream (UPSTREAM_SMTP).</p>",
            )

        app.router.add_get("/outbox/", no_outbox)
    return app


class AggregatorService:
    def __init__(self, settings: Settings, js: JetStreamContext, kv: KeyValue | None) -> None:
        self.settings = settings
        self.js = js
        self.auth = auth_policy(settings)  # before anything is opened: a refusal leaves nothing behind
        self.db = open_database(database_url(settings))
        # Campaign keys whose spec has privacy.anonymizeIp, kept current from the KV bucket.
        self.anonymized: set[str] = set()
        self.consumer = EventConsumer(
            js,
            self.db,
            settings.aggregator.ingest_batch_size,
            anonymized=self.anonymized,
            login=NatsLogin.from_settings(settings),
        )
        self.campaigns = CampaignStore(kv, on_change=self._campaign_changed) if kv is not None else None
        self.suppressions: SuppressionRecorder | None = None
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port: int | None = None
        self.stopping = False

    async def _campaign_changed(self, key: CampaignKey, spec: CampaignSpec | None) -> None:
        if spec is not None and spec.privacy.anonymize_ip:
            self.anonymized.add(str(key))
        else:
            self.anonymized.discard(str(key))
        if spec is None:
            return  # a deleted Campaign keeps its statistics
        metrics.campaign_seen(str(key))  # its event counters exist from now on, at zero
        insert = self.db.insert
        async with self.db.writing() as conn:
            await conn.execute(
                insert(CAMPAIGNS)
                .values(key=str(key), namespace=key.namespace, name=key.name, first_seen_at=utcnow())
                .on_conflict_do_nothing(index_elements=["key"])
            )

    async def start(self) -> None:
        await ensure_schema(self.db, self.settings.aggregator.migrate_on_start)
        if self.campaigns is not None:
            await self.campaigns.start()
        bucket = await ensure_suppression_bucket(self.js, self.settings)
        self.suppressions = SuppressionRecorder(self.db, SuppressionList(bucket))
        await self.suppressions.start()
        self.consumer.before_ack = self.suppressions.record
        await self.consumer.start()
        self._tasks = [
            asyncio.create_task(self._publish_statistics(), name="aggregator-statistics-metrics"),
            asyncio.create_task(self._bound_parked(), name="aggregator-parked-events"),
        ]
        retention_days = self.settings.aggregator.event_retention_days
        stream_days = self.settings.nats.stream_max_age_days
        if retention_days is not None:
            keep = timedelta(days=retention_days)
            if retention_days <= stream_days:
                # A replay of the stream could bring back events whose ids were pruned.
                log.warning(
                    "EVENT_RETENTION_DAYS (%s) should exceed STREAM_MAX_AGE_DAYS (%s): events replayed from "
                    "the stream after their pruning would count again",
                    retention_days,
                    stream_days,
                )
            self._tasks.append(asyncio.create_task(self._retention(keep), name="aggregator-retention"))
        if self.auth.opted_out:
            log.warning(
                "MAILBEACON_API_AUTH=none: the aggregator's API and pages (recipients, addresses, "
                "statistics) are open to anyone who reaches %s",
                self.settings.aggregator.listen,
            )
        self.app = app = create_app(
            self.db,
            self.settings.aggregator.outbox_dir,
            auth=self.auth,
            max_streams=self.settings.aggregator.max_streams,
        )
        add_health_routes(
            app, ready=lambda: self.consumer.healthy and not self.stopping, registry=metrics.REGISTRY
        )
        self._runner = await serve(app, self.settings.aggregator.listen)
        self.port = bound_port(self._runner)
        log.info("aggregator listening on port %s", self.port)

    async def _publish_statistics(self) -> None:
        """Campaign gauges for Prometheus, read from the database every few seconds."""
        while True:
            try:
                metrics.CAMPAIGNS.update(await list_campaigns(self.db))
                metrics.DOMAINS.update(await provider_snapshot(self.db))
            except Exception as exc:
                log.warning("reading statistics for the metrics failed: %s", exc)
            await asyncio.sleep(STATISTICS_METRICS_SECONDS)

    async def _retention(self, keep: timedelta) -> None:
        while True:
            try:
                metrics.PRUNED.inc(await prune(self.db, keep))
            except Exception as exc:
                log.warning("pruning old events failed: %s", exc)
            await asyncio.sleep(RETENTION_EVERY_SECONDS)

    async def _bound_parked(self) -> None:
        """Expire and cap parked events (aggregator.ingest.parked); replicas doing it at once delete the same ones."""
        ttl = timedelta(hours=self.settings.aggregator.parked_event_ttl_hours)
        while True:
            await asyncio.sleep(PARKED_EVERY_SECONDS)
            try:
                await bound_parked(
                    self.db, ttl, self.settings.aggregator.parked_event_limit, self.consumer.ingested_until()
                )
            except Exception as exc:
                log.warning("expiring parked events failed: %s", exc)

    def begin_stopping(self) -> None:
        """/readyz answers 503 from now on; the API, the pages and ingest go on until ``stop``."""
        self.stopping = True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.consumer.stop()
        if self.suppressions is not None:
            await self.suppressions.stop()
        if self.campaigns is not None:
            await self.campaigns.stop()
        await self.db.dispose()
