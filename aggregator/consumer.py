"""The durable JetStream pull consumer feeding :mod:`aggregator.ingest`.

Messages are acknowledged only after their batch's transaction committed. If the
database fails, the batch is nak'ed and JetStream redelivers it; the unique
``event_id`` makes any replay harmless. A malformed message is terminated (it would
fail forever) and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError

from aggregator import metrics
from aggregator.db import Database
from aggregator.feed import PullFeed
from aggregator.ingest import adopt_parked, apply_batch, count_parked
from mailbeacon.events import Event
from mailbeacon.jetstream import CONSUMER, STREAM

log = logging.getLogger(__name__)

ADOPT_EVERY_SECONDS = 2.0


def _lag_seconds(msg: Msg) -> float | None:
    try:
        stored = msg.metadata.timestamp
    except Exception:
        return None
    if not isinstance(stored, datetime):
        return None
    return max(0.0, (datetime.now(UTC) - stored.astimezone(UTC)).total_seconds())


def decode(msg: Msg) -> Event | Exception:
    """The event in a message, or why it is not one (decided once, on arrival)."""
    try:
        return Event.from_json(msg.data)
    except (ValidationError, ValueError) as exc:
        return exc


class EventConsumer:
    """Takes batches from the pull feed and stores them, ``pipeline`` batches at a time.

    While one batch's transaction runs in the database, the next one is already being
    prepared; exactness never depends on the order in which batches commit.
    """

    def __init__(self, js: JetStreamContext, db: Database, batch_size: int = 2000, pipeline: int = 2) -> None:
        # The pull feed publishes raw pull requests, so it needs the connection under js.
        nc: NATS = js._nc
        self.nc = nc
        self.db = db
        self.feed: PullFeed[Event | Exception] = PullFeed(nc, STREAM, CONSUMER, batch_size, decode)
        self.pipeline = pipeline
        self._in_flight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.db_ok = True
        self.processed = 0
        # Runs after a batch committed and before it is acknowledged (suppressions); when it
        # fails, the batch is redelivered and the hook runs again on the duplicates.
        self.before_ack: Callable[[Sequence[Event]], Awaitable[None]] | None = None

    @property
    def healthy(self) -> bool:
        return bool(self.nc.is_connected) and self.db_ok

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

    async def _process(self, taken: list[tuple[Msg, Event | Exception]]) -> None:
        events: list[Event] = []
        valid: list[Msg] = []
        for msg, decoded in taken:
            if isinstance(decoded, Event):
                events.append(decoded)
                valid.append(msg)
                continue
            # A malformed message would be redelivered forever; log it and drop it.
            metrics.INVALID.inc()
            log.error("dropping malformed event on %s: %s", msg.subject, decoded)
            with contextlib.suppress(Exception):
                await msg.term()
        if not events:
            return
        started = time.perf_counter()
        try:
            result = await apply_batch(self.db, events)
        except Exception:
            self.db_ok = False
            metrics.BATCH_FAILURES.inc()
            log.exception("batch of %d events not stored; they will be redelivered", len(events))
            for msg in valid:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)
            await asyncio.sleep(0.5)
            return
        self.db_ok = True
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        if self.before_ack is not None:
            try:
                await self.before_ack(events)
            except Exception as exc:
                log.warning("batch stored, but its suppressions not (%s); it will be redelivered", exc)
                for msg in valid:
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=1.0)
                return
        for msg in valid:
            with contextlib.suppress(Exception):
                await msg.ack()
        self.processed += len(events)
        metrics.record_batch(result, len(events))
        last = valid[-1]
        with contextlib.suppress(Exception):
            metrics.LAG.set(last.metadata.num_pending)
        lag = _lag_seconds(last)
        if lag is not None:
            metrics.LAG_SECONDS.set(lag)

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
