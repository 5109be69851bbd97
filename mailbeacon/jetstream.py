"""NATS JetStream: connection, idempotent provisioning and event publishing.

Every component calls :func:`provision` at start; it creates the stream, the durable
consumer and the campaign KV bucket when missing and leaves them alone when they
already match, so replicas can start in any order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from mailbeacon.events import SUBJECT_PREFIX, Event
from mailbeacon.settings import Settings

log = logging.getLogger(__name__)

STREAM = "MAILBEACON_EVENTS"
CONSUMER = "aggregator"
KV_BUCKET = "mailbeacon_campaigns"
ALL_EVENTS = f"{SUBJECT_PREFIX}.>"
# The aggregator may hold a batch for a while on a slow database; redelivery before
# the commit would only cost a duplicate (dropped by event_id), never a wrong count.
CONSUMER_ACK_WAIT_SECONDS = 60.0


async def connect(url: str, name: str) -> NATS:
    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats: disconnected from %s", url)

    async def on_reconnect() -> None:
        log.info("nats: reconnected to %s", url)

    return await nats.connect(
        servers=[url],
        name=name,
        connect_timeout=2,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )


def stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=[ALL_EVENTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.stream_max_age_days * 86400,
        duplicate_window=settings.stream_duplicate_window_seconds,
        num_replicas=settings.stream_replicas,
    )


def consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=ALL_EVENTS,
        ack_wait=CONSUMER_ACK_WAIT_SECONDS,
        max_ack_pending=20000,
    )


async def ensure_stream(js: JetStreamContext, settings: Settings) -> None:
    wanted = stream_config(settings)
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(config=wanted)
        log.info("created stream %s", STREAM)
        return
    have = info.config
    if (
        have.subjects != wanted.subjects
        or have.max_age != wanted.max_age
        or have.duplicate_window != wanted.duplicate_window
    ):
        # Storage and replicas cannot be changed in place; retention settings can.
        update = StreamConfig.from_response(have.as_dict())
        update.subjects = wanted.subjects
        update.max_age = wanted.max_age
        update.duplicate_window = wanted.duplicate_window
        await js.update_stream(config=update)
        log.info("updated stream %s", STREAM)


async def ensure_consumer(js: JetStreamContext) -> None:
    try:
        await js.consumer_info(STREAM, CONSUMER)
    except NotFoundError:
        await js.add_consumer(STREAM, config=consumer_config())
        log.info("created consumer %s", CONSUMER)


async def ensure_campaign_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    try:
        return await js.key_value(KV_BUCKET)
    except BucketNotFoundError:
        config = KeyValueConfig(bucket=KV_BUCKET, history=5, replicas=settings.stream_replicas)
        return await js.create_key_value(config=config)


async def provision(js: JetStreamContext, settings: Settings) -> KeyValue:
    await ensure_stream(js, settings)
    await ensure_consumer(js)
    return await ensure_campaign_bucket(js, settings)


class EventPublisher:
    """Publishes events to JetStream with ``Nats-Msg-Id`` so a republish is deduplicated.

    :meth:`publish` waits for JetStream's acknowledgement and raises when there is none.
    :meth:`publish_later` never waits: the event joins a bounded in-memory buffer that a
    background task flushes, retrying until NATS is back. Republishing after an ambiguous
    failure is safe because both JetStream and the aggregator drop repeated event ids.
    """

    def __init__(self, js: JetStreamContext, *, buffer_limit: int = 100_000, timeout: float = 5.0) -> None:
        self._js = js
        self._timeout = timeout
        self._buffer: deque[Event] = deque()
        self._buffer_limit = buffer_limit
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.dropped = 0
        self.published = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def publish(self, event: Event) -> None:
        await self._js.publish(
            event.subject,
            event.to_json(),
            timeout=self._timeout,
            headers={"Nats-Msg-Id": event.event_id},
        )
        self.published += 1

    def publish_later(self, event: Event) -> bool:
        """Queue the event; False when the buffer was full and the event was dropped."""
        if len(self._buffer) >= self._buffer_limit:
            self.dropped += 1
            log.error("event buffer full (%d): dropped a %s event", self._buffer_limit, event.type)
            return False
        self._buffer.append(event)
        self._wakeup.set()
        if self._task is None:
            self._task = asyncio.create_task(self._flush_forever(), name="event-publisher")
        return True

    async def publish_or_buffer(self, event: Event) -> None:
        """Publish now if JetStream answers; otherwise keep it for the background flusher."""
        if not self._buffer:
            try:
                await self.publish(event)
                return
            except Exception as exc:  # any NATS failure means "not stored yet"
                log.warning("publishing %s event failed (%s); buffering it", event.type, exc)
        self.publish_later(event)

    async def _flush_once(self, batch_size: int = 256) -> bool:
        batch = [self._buffer.popleft() for _ in range(min(batch_size, len(self._buffer)))]
        results: list[Any] = await asyncio.gather(
            *(self.publish(event) for event in batch), return_exceptions=True
        )
        failed = [
            event for event, result in zip(batch, results, strict=True) if isinstance(result, Exception)
        ]
        self._buffer.extendleft(reversed(failed))
        return not failed

    async def _flush_forever(self) -> None:
        backoff = 0.1
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if await self._flush_once():
                backoff = 0.1
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Flush what is buffered (bounded by ``drain_timeout``), then stop the flusher."""
        self._closing = True
        self._wakeup.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_timeout)
        except TimeoutError:
            log.error("shutting down with %d unpublished events", len(self._buffer))
            self._task.cancel()
        self._task = None
