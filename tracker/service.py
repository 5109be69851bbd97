"""Wiring: the tracker app served on TRACKER_LISTEN, alone or in N worker processes.

``mailbeacon tracker`` starts serving before NATS answers: pixel and click events wait
in the publisher's buffer while a background task connects (retrying forever),
provisions the stream and attaches the publisher. On SIGTERM its /readyz answers 503 while it
serves on for SHUTDOWN_DELAY_SECONDS; then it stops accepting requests, releases held clicks,
and drains the buffer for SHUTDOWN_DRAIN_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.process import BaseProcess

from aiohttp import web
from nats.aio.client import Client as NATS

from mailbeacon.bus.jetstream import connect, provision, redact_url
from mailbeacon.bus.nats_auth import NatsLogin
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.bus.spool import Spool
from mailbeacon.contract.settings import Settings, parse_listen
from mailbeacon.contract.signing import NoSigningKey
from mailbeacon.web.http_guard import ConnectionLimits, descriptor_limit, effective_max_connections
from mailbeacon.web.server import bound_port, serve
from mailbeacon.web.shutdown import wait_for_signal
from tracker import metrics
from tracker.app import ENGAGEMENT_KEY, create_app
from tracker.webhooks import webhook_limits
from tracker.webhooks.esp.sns import HttpGet

log = logging.getLogger(__name__)

PROVISION_CHECK_SECONDS = 10.0


def connection_limits(settings: Settings) -> ConnectionLimits:
    """TRACKER_HEADER_TIMEOUT_SECONDS, and TRACKER_MAX_CONNECTIONS as the open-file limit allows."""
    fds = descriptor_limit()
    cap = effective_max_connections(settings.tracker.max_connections, fds)
    if cap < settings.tracker.max_connections:
        log.warning(
            "MAILBEACON_TRACKER_MAX_CONNECTIONS=%d does not fit the open-file limit (%s): at most %d "
            "connections per process (raise `ulimit -n` for more)",
            settings.tracker.max_connections,
            fds,
            cap,
        )
    return ConnectionLimits(header_timeout=settings.tracker.header_timeout_seconds, max_connections=cap)


def warn_about_webhooks(settings: Settings) -> None:
    """Once at start: webhook routes that refuse for want of credentials, and the opt-out."""
    missing = webhook_limits.missing_credentials(settings)
    if missing:
        log.warning("webhooks refused (503) until their credentials are set: %s", "; ".join(missing))
    exposed = webhook_limits.unauthenticated(settings)
    if exposed:
        log.warning(
            "MAILBEACON_ALLOW_UNAUTHENTICATED_WEBHOOKS=true: %s accept anyone's requests although the "
            "tracker listens on %s: forged bounces and complaints stop real mail",
            ", ".join(exposed),
            settings.tracker.listen,
        )


class TrackerService:
    def __init__(
        self,
        settings: Settings,
        publisher: EventPublisher,
        *,
        reuse_port: bool = False,
        sns_http_get: HttpGet | None = None,
    ) -> None:
        if not settings.secret_keys:
            raise NoSigningKey("MAILBEACON_SECRET_KEYS is not set: the tracker cannot verify click links")
        self.settings = settings
        self.publisher = publisher
        self.reuse_port = reuse_port
        self._sns_http_get = sns_http_get
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.limits: ConnectionLimits | None = None
        self.stopping = False

    async def start(self) -> None:
        self._app = create_app(
            self.settings, self.publisher, sns_http_get=self._sns_http_get, ready=lambda: not self.stopping
        )
        engagement = self._app[ENGAGEMENT_KEY]
        metrics.watch_publisher(self.publisher, lambda: engagement.hold.pending)
        self.limits = connection_limits(self.settings)
        metrics.watch_connections(self.limits)
        self._runner = await serve(
            self._app, self.settings.tracker.listen, reuse_port=self.reuse_port, limits=self.limits
        )
        self.port = bound_port(self._runner)
        log.info("tracker listening on port %s", self.port)
        warn_about_webhooks(self.settings)

    @property
    def held(self) -> int:
        """Pixel and click events not handed to the publisher yet (clicks sit out the scanner-burst window)."""
        return self._app[ENGAGEMENT_KEY].held if self._app is not None else 0

    def begin_stopping(self) -> None:
        """/readyz answers 503 from now on; pixels, clicks and webhooks are still served."""
        self.stopping = True

    async def stop(self) -> None:
        """Stop accepting requests (in-flight ones finish), then hand held events to the publisher."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._app is not None:
            self._app[ENGAGEMENT_KEY].flush()
            self._app = None


class NatsLink:
    """Connects in the background and attaches the publisher once JetStream is provisioned."""

    def __init__(self, settings: Settings, publisher: EventPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.nc: NATS | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tracker-nats-link")

    async def _run(self) -> None:
        url = self.settings.nats.url or ""
        delay = 0.5
        while True:
            try:
                # connect() retries unreachable servers forever; provisioning may still fail.
                self.nc = self.nc or await connect(
                    url, "mailbeacon-tracker", NatsLogin.from_settings(self.settings)
                )
                await provision(self.nc.jetstream(), self.settings)
            except Exception as exc:
                log.warning("NATS not ready (%s); pixel and click events are buffered meanwhile", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.publisher.attach(self.nc.jetstream())
            log.info("connected to NATS at %s", redact_url(url))  # never its password or token
            break
        while True:
            # A NATS that came back with an empty store (no persistent volume) has no stream:
            # events would pile up in the buffer. Provisioning again is idempotent and cheap.
            await asyncio.sleep(PROVISION_CHECK_SECONDS)
            if self.publisher.buffered and self.publisher.connected:
                try:
                    await provision(self.nc.jetstream(), self.settings)
                except Exception as exc:
                    log.warning("re-provisioning JetStream failed: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


class StandaloneTracker:
    """One tracker process: serves at once, connects to NATS in the background, drains on stop."""

    def __init__(
        self, settings: Settings, *, reuse_port: bool = False, sns_http_get: HttpGet | None = None
    ) -> None:
        self.settings = settings
        self.publisher = EventPublisher(
            None, buffer_limit=settings.tracker.event_buffer_limit, spool=Spool.under(settings.data_dir)
        )
        self.service = TrackerService(
            settings, self.publisher, reuse_port=reuse_port, sns_http_get=sns_http_get
        )
        self.link = NatsLink(settings, self.publisher)

    async def start(self) -> None:
        # Events the last stop spooled go into the buffer ahead of any new one, published
        # first once NATS answers; serving does not wait for NATS.
        self.publisher.load_spool()
        await self.service.start()
        self.link.start()

    def begin_stopping(self) -> None:
        self.service.begin_stopping()

    async def stop(self) -> None:
        """One drain deadline for both: finishing requests, then publishing (and spooling)."""
        deadline = time.monotonic() + self.settings.shutdown_drain_seconds
        await self.service.stop()
        await self.publisher.close(drain_timeout=max(0.0, deadline - time.monotonic()))
        await self.link.close()


async def serve_standalone(settings: Settings, *, reuse_port: bool = False) -> None:
    tracker = StandaloneTracker(settings, reuse_port=reuse_port)
    await tracker.start()
    # Everything alive now lives as long as the process: keep it out of the collector's
    # scans, and collect less often (every request allocates a few short-lived objects).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        await wait_for_signal(settings.shutdown_delay_seconds, tracker.begin_stopping)
    finally:
        await tracker.stop()


def _worker(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    asyncio.run(serve_standalone(settings, reuse_port=True))


def run_tracker(settings: Settings, workers: int = 1) -> None:
    """``mailbeacon tracker [--workers N]``: N processes share the port through SO_REUSEPORT.

    The parent only supervises: it restarts a worker that died and forwards SIGTERM/SIGINT;
    each worker then keeps serving for SHUTDOWN_DELAY_SECONDS (its /readyz answering 503, on
    the port they share) before it stops.
    """
    if not settings.nats.url:
        raise SystemExit("mailbeacon tracker: MAILBEACON_NATS_URL is required (or use `mailbeacon up`)")
    if workers <= 1:
        asyncio.run(serve_standalone(settings))
        return
    if parse_listen(settings.tracker.listen)[1] == 0:
        raise SystemExit("mailbeacon tracker --workers needs a fixed port in MAILBEACON_TRACKER_LISTEN")
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start_worker(index: int) -> BaseProcess:
        process = context.Process(target=_worker, args=(settings,), name=f"tracker-{index}")
        process.start()
        return process

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    processes = [start_worker(index) for index in range(workers)]
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stopping:
        for index, process in enumerate(processes):
            if not process.is_alive() and not stopping:
                log.error("tracker worker %s exited with %s; restarting it", process.name, process.exitcode)
                processes[index] = start_worker(index)
        time.sleep(0.5)
    for process in processes:
        process.join(settings.shutdown_delay_seconds + settings.shutdown_drain_seconds + 10)
        if process.is_alive():
            process.kill()
