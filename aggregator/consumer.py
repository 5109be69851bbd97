"""The durable JetStream pull consumer feeding :mod:`aggregator.ingest`.

Messages are acknowledged only after their batch's transaction committed, a whole batch
in one write. If the database fails, the batch is nak'ed and JetStream redelivers it; the
unique ``event_id`` makes any replay harmless. A malformed message is terminated (it would
fail forever) and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from aggregator import metrics
from aggregator.db import Database
from aggregator.decode import Incoming, InvalidEvent, decode
from aggregator.feed import ACK, TERM, Delivery, PullFeed, delivery_info, nak
from aggregator.ingest import adopt_parked, apply_prepared, count_parked
from aggregator.prepare import prepare
from mailbeacon.jetstream import CONSUMER, STREAM

log = logging.getLogger(__name__)

ADOPT_EVERY_SECONDS = 2.0


class EventConsumer:
    """Takes batches from the pull feed and stores them, ``pipeline`` batches at a time.

    While one batch's transaction runs in the database, the next one is already being
    decoded and prepared. The transactions themselves run one at a time: a batch then
    sees the messages the previous one created, instead of parking their events for
    :func:`adopt_parked` (with two at once, about one event in twenty took that slower
    path). Exactness never depends on this: other replicas commit concurrently anyway.
    """

    def __init__(self, js: JetStreamContext, db: Database, batch_size: int = 5000, pipeline: int = 2) -> None:
        # The pull feed publishes raw pull requests, so it needs the connection under js.
        nc: NATS = js._nc
        self.nc = nc
        self.db = db
        self.feed = PullFeed(nc, STREAM, CONSUMER, batch_size)
        self.pipeline = pipeline
        self._in_flight: set[asyncio.Task[None]] = set()
        self._storing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.db_ok = True
        self.processed = 0

    @property
    def healthy(self) -> bool:
        return self.feed.connected and self.db_ok

    async def start(self) -> None:
        await self.feed.start()
        self._task = asyncio.create_task(self._run(), name="aggregator-consumer")

    async def _run(self) -> None:
        last_adopt = 0.0
        while not self._stopping:
            try:
                while len(self._in_flight) >= self.pipeline:
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                taken = await self.feed.take(wait=0.5)
                if taken:
                    task = asyncio.create_task(self._process(taken), name="aggregator-batch")
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
            except Exception:
                log.exception("consumer loop failed; continuing")
                await asyncio.sleep(1.0)
            if time.monotonic() - last_adopt > ADOPT_EVERY_SECONDS:
                last_adopt = time.monotonic()
                await self._adopt()
        if self._in_flight:
            await asyncio.wait(self._in_flight)

    async def _process(self, taken: list[Delivery]) -> None:
        events: list[Incoming] = []
        valid: list[bytes] = []
        malformed: list[bytes] = []
        for reply, payload in taken:
            try:
                events.append(decode(payload))
            except InvalidEvent as exc:
                # A malformed message would be redelivered forever; log it and drop it.
                metrics.INVALID.inc()
                log.error("dropping malformed event (%s): %s", reply.decode(errors="replace"), exc)
                malformed.append(reply)
                continue
            valid.append(reply)
        if malformed:
            await self.feed.settle(malformed, TERM)
        if not events:
            return
        # Made ready before the transaction, while the previous batch may still hold the database.
        batch = prepare(events, self.db.dialect == "postgresql")
        try:
            async with self._storing:
                started = time.perf_counter()
                result = await apply_prepared(self.db, batch)
        except Exception:
            self.db_ok = False
            metrics.BATCH_FAILURES.inc()
            log.exception("batch of %d events not stored; they will be redelivered", len(events))
            await self.feed.settle(valid, nak(1.0))
            await asyncio.sleep(0.5)
            return
        self.db_ok = True
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        await self.feed.settle(valid, ACK)
        self.processed += len(events)
        metrics.record_batch(result, len(events))
        info = delivery_info(valid[-1])
        if info is not None:
            metrics.LAG.set(info.pending)
            metrics.LAG_SECONDS.set(max(0.0, (datetime.now(UTC) - info.stored_at).total_seconds()))

    async def _adopt(self) -> None:
        try:
            result = await adopt_parked(self.db)
            metrics.record_batch(result, 0)
            metrics.PARKED.set(await count_parked(self.db))
        except Exception as exc:
            log.warning("adopting parked events failed: %s", exc)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, timeout=15)
            self._task = None
        await self.feed.stop()
