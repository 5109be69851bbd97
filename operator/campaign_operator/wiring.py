"""kopf wiring: NATS, HTTP and the Kubernetes API around the plain functions of this package.

Auto-pause writes ``spec.paused: true`` into the Campaign resource itself (so ``kubectl get
campaigns`` shows it and people resume by setting it back) and, in the same step, into the
KV bucket, so the proxies defer the campaign's mail without waiting for the update handler's
round trip through the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import aiohttp
import kopf
from aiohttp import web
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from campaign_operator import guardrails, metrics
from campaign_operator.resource import ANNOTATION_PREFIX, FINALIZER, GROUP, PLURAL, VERSION
from campaign_operator.statistics_client import StatisticsClient, StatisticsUnavailable
from campaign_operator.status import Headline, InvalidStatistics, numbers_changed
from mailbeacon.bus.campaign_store import CampaignStore
from mailbeacon.bus.jetstream import connect, ensure_campaign_bucket
from mailbeacon.bus.nats_auth import NatsLogin
from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec
from mailbeacon.contract.settings import Settings
from mailbeacon.web.server import add_health_routes, bound_port, serve

log = logging.getLogger(__name__)
T = TypeVar("T")


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's settings for this operator (also applied when started with ``kopf run``)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # A Campaign deleted while its timer reads statistics: look again every second for the
    # tick to finish (kopf's default of 60 s would hold the finalizer, and kubectl, that long).
    settings.background.cancellation_polling = 1.0
    # No watching of CRDs and namespaces: the operator needs RBAC only for Campaigns and Events.
    settings.scanning.disabled = True
    # Handler failures still become Events; routine successes (every timer tick) do not.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "mailbeacon-operator"
    settings.posting.event_name_prefix = "mailbeacon-"


def parse_spec(spec: Any) -> CampaignSpec:
    try:
        return CampaignSpec.model_validate(dict(spec or {}))
    except ValidationError as exc:
        # The CRD's schema refuses such specs; reaching here means the two drifted apart.
        raise kopf.PermanentError(f"spec is not a valid campaign spec: {exc}") from exc


def campaign_key(namespace: str | None, name: str) -> CampaignKey:
    if not namespace:  # the CRD is namespaced; a cluster-scoped body would be a bug elsewhere
        raise kopf.PermanentError(f"Campaign {name} has no namespace")
    return CampaignKey(namespace, name)


def export_known(key: CampaignKey, campaign: CampaignSpec, status: Mapping[str, Any]) -> None:
    """The campaign's guardrail and pause series without the aggregator: its spec, and the
    verdicts on the numbers its status last showed (none while it never showed any)."""
    last = Headline.from_status(status)
    metrics.export(key, campaign, None if last is None else guardrails.judge(campaign.guardrails, last))


STOPPED = object()


async def until_stopped(work: Awaitable[T], stopped: Any) -> T | object:
    """``work``'s result, or :data:`STOPPED` as soon as kopf signals the timer to stop.

    A hung aggregator must not hold a deleted Campaign's finalizer until the HTTP timeout.
    """
    if stopped is None:
        return await work
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(_wait(stopped))
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return STOPPED
    return task.result()


async def _wait(stopped: Any) -> None:
    await stopped.wait()


def now_utc() -> datetime:
    return datetime.now(UTC)


class CampaignOperator:
    """The handlers, sharing one NATS connection, one HTTP session and the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self.store: CampaignStore | None = None
        self.http: aiohttp.ClientSession | None = None
        self.statistics: StatisticsClient | None = None
        self.health: web.AppRunner | None = None
        self.health_port: int | None = None

    @property
    def ready(self) -> bool:
        return self.store is not None and self.nc is not None and self.nc.is_connected

    async def startup(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)
        if not self.settings.nats.url:
            raise kopf.PermanentError("MAILBEACON_NATS_URL is required: the operator writes specs to NATS")
        app = web.Application()
        add_health_routes(app, ready=lambda: self.ready, registry=metrics.REGISTRY)
        self.health = await serve(app, self.settings.operator.listen)
        self.health_port = bound_port(self.health)
        self.nc = await connect(
            self.settings.nats.url, "mailbeacon-operator", NatsLogin.from_settings(self.settings)
        )
        self.store = CampaignStore(await ensure_campaign_bucket(self.nc.jetstream(), self.settings))
        self.http = aiohttp.ClientSession()
        self.statistics = StatisticsClient(
            self.settings.aggregator.base_url(),
            self.http,
            token=self.settings.aggregator.client_token(read_only=True),  # it only reads
        )
        log.info(
            "campaign operator ready: statistics from %s every %ss",
            self.statistics.base_url,
            self.settings.operator.status_interval,
        )

    async def cleanup(self, **_: Any) -> None:
        if self.http is not None:
            await self.http.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.health is not None:
            await self.health.cleanup()
        self.nc = self.store = self.http = self.statistics = self.health = None

    def _store(self) -> CampaignStore:
        if self.store is None:
            raise kopf.TemporaryError("not connected to NATS yet", delay=1)
        return self.store

    async def write_spec(
        self,
        *,
        spec: kopf.Spec,
        status: kopf.Status,
        name: str,
        namespace: str | None,
        meta: kopf.Meta,
        patch: kopf.Patch,
        **_: Any,
    ) -> None:
        """Create, update and resume: the spec goes to the KV bucket the proxies watch."""
        key = campaign_key(namespace, name)
        campaign = parse_spec(spec)
        await self._store().put(key, campaign)
        export_known(key, campaign, status)  # at once, whether or not the aggregator answers
        # Patch only on a change: a patch that changes nothing gets no new resourceVersion,
        # and kopf would wait for one (settings.persistence.consistency_timeout).
        if status.get("observedGeneration") != meta.get("generation"):
            patch.status["observedGeneration"] = meta.get("generation")
        log.info("campaign %s: spec written to the campaign bucket", key)

    async def remove_spec(self, *, name: str, namespace: str | None, **_: Any) -> None:
        """Deletion: the proxies forget the campaign; its statistics stay in the aggregator."""
        key = campaign_key(namespace, name)
        await self._store().delete(key)
        metrics.forget(key)
        log.info("campaign %s: removed from the campaign bucket", key)

    async def refresh_status(
        self,
        *,
        body: kopf.Body,
        spec: kopf.Spec,
        status: kopf.Status,
        name: str,
        namespace: str | None,
        meta: kopf.Meta,
        patch: kopf.Patch,
        **kwargs: Any,
    ) -> None:
        """Timer: statistics into status, guardrail conditions, Events on flips, auto-pause."""
        if self.statistics is None:
            return
        key = campaign_key(namespace, name)
        campaign = parse_spec(spec)
        current = list(status.get("conditions") or [])
        generation = meta.get("generation")
        try:
            # kopf gives timers a "stopped" flag (not in its TimerFn protocol's signature).
            fetched = await until_stopped(self.statistics.fetch(key), kwargs.get("stopped"))
            if fetched is STOPPED:
                return  # the Campaign is being deleted (or the operator stops): its finalizer waits for us
            statistics = cast(dict[str, Any] | None, fetched)
            headline = Headline() if statistics is None else Headline.from_statistics(statistics)
        except (StatisticsUnavailable, InvalidStatistics) as exc:
            metrics.STATISTICS_ERRORS.inc()
            export_known(key, campaign, status)  # the alert rules keep their guardrails meanwhile
            log.warning("campaign %s: %s", key, exc)
            wanted = guardrails.statistics_condition(current, False, str(exc)[:300], now_utc(), generation)
            if guardrails.conditions_changed(current, wanted):
                patch.status["conditions"] = wanted
            return
        decision = guardrails.decide(campaign, headline, current, now_utc(), generation)
        metrics.export(key, campaign, decision.judgements)
        if decision.pause:
            # The bucket first, before anything is patched: the proxies defer the mail at once,
            # and if NATS fails here the condition is not recorded either, so the next tick
            # sees the same flip and pauses again.
            await self._store().put(key, campaign.model_copy(update={"paused": True}))
            patch.spec["paused"] = True
            metrics.AUTO_PAUSES.inc()
            metrics.PAUSED.labels(str(key)).set(1)
        if numbers_changed(status, headline) or guardrails.conditions_changed(current, decision.conditions):
            patch.status.update(headline.as_status())
            patch.status["conditions"] = decision.conditions
            patch.status["lastUpdateTime"] = now_utc().strftime("%Y-%m-%dT%H:%M:%SZ")
        for note in decision.notes:
            kopf.event(body, type=note.type, reason=note.reason, message=note.message)
            log.log(
                logging.WARNING if note.type == "Warning" else logging.INFO,
                "campaign %s: %s",
                key,
                note.message,
            )


def register(registry: kopf.OperatorRegistry, settings: Settings) -> CampaignOperator:
    """Register the Campaign handlers in ``registry``; the returned object holds their state."""
    operator = CampaignOperator(settings)
    # kopf's own minimal logins: the pod's service account in a cluster, KUBECONFIG outside.
    # (No Kubernetes client library is installed, so kopf would find no credentials otherwise.)
    kopf.on.login(registry=registry, id="service-account")(kopf.login_with_service_account)
    kopf.on.login(registry=registry, id="kubeconfig")(kopf.login_with_kubeconfig)
    kopf.on.startup(registry=registry)(operator.startup)
    kopf.on.cleanup(registry=registry)(operator.cleanup)
    resource = (GROUP, VERSION, PLURAL)
    # One function object for the three causes, so kopf runs it once when they coincide
    # (a Campaign created while the operator was down is both new and resumed).
    write_spec = operator.write_spec
    kopf.on.create(*resource, registry=registry, id="write-spec")(write_spec)
    kopf.on.update(*resource, registry=registry, id="write-spec", field="spec")(write_spec)
    kopf.on.resume(*resource, registry=registry, id="write-spec")(write_spec)
    kopf.on.delete(*resource, registry=registry, id="remove-spec")(operator.remove_spec)
    kopf.timer(
        *resource,
        registry=registry,
        id="refresh-status",
        interval=settings.operator.status_interval,
        initial_delay=min(1.0, settings.operator.status_interval),
    )(operator.refresh_status)
    if settings.operator.injection_listen:
        from campaign_operator.injection.webhook import register_injection

        register_injection(registry, settings)  # docs/kubernetes.md "Injection by annotation"
    return operator
