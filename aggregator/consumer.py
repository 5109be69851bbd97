"""The durable JetStream pull consumer feeding :mod:`aggregator.ingest`.

Messages are acknowledged only after their batch's transaction committed. If the
database fails, nothing is acknowledged and JetStream redelivers the batch after the
ack wait; the unique ``event_id`` makes that replay harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from pydantic import ValidationError

from aggregator import metrics
from aggregator.db import Database
from aggregator.ingest import adopt_parked, apply_batch, count_parked
from mailbeacon.events import Event
from mailbeacon.jetstream import CONSUMER, STREAM

log = logging.getLogger(__name__)

ADOPT_EVERY_SECONDS = 2.0


class EventConsumer:
    def __init__(self, js: JetStreamContext, db: Database, batch_size: int = 500) -> None:
        self.js = js
        self.db = db
        self.batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.healthy = False
        self.processed = 0

    async def start(self) -> None:
        self._subscription = await self.js.pull_subscribe_bind(CONSUMER, STREAM)
        self._task = asyncio.create_task(self._run(), name="aggregator-consumer")

    async def _run(self) -> None:
        last_adopt = 0.0
        while not self._stopping:
            try:
                messages = await self._subscription.fetch(self.batch_size, timeout=1.0)
            except (NatsTimeout, TimeoutError):
                messages = []
            except Exception as exc:
                self.healthy = False
                log.warning("fetch from %s failed: %s", STREAM, exc)
                await asyncio.sleep(1.0)
                continue
            self.healthy = True
            if messages:
                await self._process(messages)
            if time.monotonic() - last_adopt > ADOPT_EVERY_SECONDS:
                last_adopt = time.monotonic()
                await self._adopt()

    async def _process(self, messages: list[Msg]) -> None:
        events: list[Event] = []
        valid: list[Msg] = []
        for msg in messages:
            try:
                events.append(Event.from_json(msg.data))
                valid.append(msg)
            except (ValidationError, ValueError) as exc:
                # A malformed message would be redelivered forever; log it and drop it.
                metrics.INVALID.inc()
                log.error("dropping malformed event on %s: %s", msg.subject, exc)
                await msg.term()
        started = time.perf_counter()
        try:
            result = await apply_batch(self.db, events)
        except Exception:
            metrics.BATCH_FAILURES.inc()
            log.exception("batch of %d events not stored; they will be redelivered", len(events))
            for msg in valid:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)
            await asyncio.sleep(0.5)
            return
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        for msg in valid:
            with contextlib.suppress(Exception):
                await msg.ack()
        self.processed += len(events)
        metrics.record_batch(result)
        if messages:
            metadata = messages[-1].metadata
            metrics.LAG.set(metadata.num_pending)

    async def _adopt(self) -> None:
        try:
            await adopt_parked(self.db)
            metrics.PARKED.set(await count_parked(self.db))
        except Exception as exc:
            log.warning("adopting parked events failed: %s", exc)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=10)
            self._task = None
        with contextlib.suppress(Exception):
            await self._subscription.unsubscribe()
