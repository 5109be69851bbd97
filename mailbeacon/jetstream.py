"""NATS JetStream: connection, idempotent provisioning and event publishing.

Every component calls :func:`provision` at start; it creates the stream, the durable
consumer and the campaign and suppression KV buckets when missing and leaves them alone when they
already match, so replicas can start in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
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

from mailbeacon.events import SUBJECT_PREFIX, Event, EventType, subject_for
from mailbeacon.fast_batch import (
    FastBatchesUnavailable,
    ReplySink,
    hpub_command,
    publish_fast_batch,
    send_commands,
)
from mailbeacon.settings import Settings

log = logging.getLogger(__name__)

STREAM = "MAILBEACON_EVENTS"
CONSUMER = "aggregator"
KV_BUCKET = "mailbeacon_campaigns"
# (campaign, recipient) pairs that must not get mail again: see mailbeacon.suppressions.
SUPPRESSIONS_BUCKET = "mailbeacon_suppressions"
ALL_EVENTS = f"{SUBJECT_PREFIX}.>"
# The aggregator may hold a batch for a while on a slow database; redelivery before
# the commit would only cost a duplicate (dropped by event_id), never a wrong count.
CONSUMER_ACK_WAIT_SECONDS = 60.0


def redact_url(url: str) -> str:
    """The URL without its password or token, for logs and terminals."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{netloc}"))


async def connect(url: str, name: str) -> NATS:
    shown = redact_url(url)
    client = NATS()

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        if client.is_closed:  # our own close(): nothing an operator needs to hear about
            log.debug("nats: closed connection to %s", shown)
        else:
            log.warning("nats: disconnected from %s", shown)

    async def on_reconnect() -> None:
        log.info("nats: reconnected to %s", shown)

    await client.connect(
        servers=[url],
        name=name,
        connect_timeout=2,
        # Half a second between attempts: pixel/click buffers drain soon after NATS is back.
        # nats-py annotates this as int but sleeps on it as given.
        reconnect_time_wait=0.5,  # type: ignore[arg-type]
        max_reconnect_attempts=-1,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    return client


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


def takes_fast_batches(js: JetStreamContext) -> bool:
    """Whether the connected server knows fast-ingest batches (nats-server 2.14+)."""
    info = getattr(getattr(js, "_nc", None), "_server_info", None) or {}  # nats-py keeps it there
    try:
        major, minor = (int(part) for part in str(info.get("version", "0.0")).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 14)


async def ensure_stream(js: JetStreamContext, settings: Settings) -> None:
    wanted = stream_config(settings)
    # Fast batches let the tracker publish its pixel and click events with one
    # acknowledgement per batch (mailbeacon.fast_batch); older servers do not know them.
    fast = settings.stream_fast_batches and takes_fast_batches(js)
    wanted.allow_batched = True if fast else None
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(config=wanted)
        log.info("created stream %s", STREAM)
        return
    have = info.config
    # Retention is changed only by a process that was told it (STREAM_MAX_AGE_DAYS,
    # STREAM_DUPLICATE_WINDOW_SECONDS): a proxy sidecar in an app's pod, configured by the
    # app's team, must not reset what the release's tracker and aggregator set, nor the two
    # flip it back and forth on every restart.
    told = settings.model_fields_set
    max_age = wanted.max_age if "stream_max_age_days" in told else have.max_age
    window = wanted.duplicate_window if "stream_duplicate_window_seconds" in told else have.duplicate_window
    retention_changed = (
        have.subjects != wanted.subjects or have.max_age != max_age or have.duplicate_window != window
    )
    turn_on_fast = fast and not have.allow_batched
    if not (retention_changed or turn_on_fast):
        return
    # Storage and replicas cannot be changed in place; retention settings can. Fast batches
    # are only ever turned on: servers before 2.14 cannot run such a stream any more.
    update = StreamConfig.from_response(have.as_dict())
    update.subjects = wanted.subjects
    update.max_age = max_age
    update.duplicate_window = window
    update.allow_batched = True if (fast or have.allow_batched) else None
    try:
        await js.update_stream(config=update)
    except Exception as exc:
        if retention_changed:
            raise
        # A component not allowed to change the stream (a sidecar's narrower credentials)
        # goes on without fast batches.
        log.warning("could not allow fast batches on stream %s (%s); events go one by one", STREAM, exc)
        return
    log.info("updated stream %s", STREAM)


async def ensure_consumer(js: JetStreamContext) -> None:
    try:
        await js.consumer_info(STREAM, CONSUMER)
    except NotFoundError:
        await js.add_consumer(STREAM, config=consumer_config())
        log.info("created consumer %s", CONSUMER)


async def _ensure_bucket(js: JetStreamContext, settings: Settings, bucket: str, history: int) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        config = KeyValueConfig(bucket=bucket, history=history, replicas=settings.stream_replicas)
        return await js.create_key_value(config=config)


async def ensure_campaign_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    return await _ensure_bucket(js, settings, KV_BUCKET, history=5)


async def ensure_suppression_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    # Only the latest value of a key matters; a suppression is kept until someone deletes it.
    return await _ensure_bucket(js, settings, SUPPRESSIONS_BUCKET, history=1)


async def provision(js: JetStreamContext, settings: Settings) -> KeyValue:
    """Stream, consumer and both KV buckets; returns the campaign bucket."""
    await ensure_stream(js, settings)
    await ensure_consumer(js)
    await ensure_suppression_bucket(js, settings)
    return await ensure_campaign_bucket(js, settings)


# Buffered events are published in batches of up to _FLUSH_BATCH, waiting a few milliseconds
# for a batch to fill: buffered events are not latency-critical, the requests behind them are.
_FLUSH_BATCH = 512
_FLUSH_LINGER_SECONDS = 0.01
_FLUSH_CHUNK = 64  # events written per event-loop turn
_FAST_BATCH_RETRY_SECONDS = 300.0


# Event's JSON serializer called directly: the bytes of Event.to_json() without pydantic's
# round trip through str, for every buffered event.
_event_json = Event.__pydantic_serializer__.to_json
_SUBJECTS = {event_type: subject_for(event_type).encode() for event_type in EventType}


class PublisherNotConnected(ConnectionError):
    """Raised by :meth:`EventPublisher.publish` while there is no live NATS connection."""


class EventPublisher:
    """Publishes events to JetStream with ``Nats-Msg-Id`` so a republish is deduplicated.

    :meth:`publish` waits for JetStream's acknowledgement and raises when there is none.
    :meth:`publish_later` never waits: the event joins a bounded in-memory buffer that a
    background task flushes, retrying until NATS is back. Republishing after an ambiguous
    failure is safe because both JetStream and the aggregator drop repeated event ids.

    The publisher may be created before NATS is reachable (``js=None``) and given its
    JetStream context later with :meth:`attach`, so a component can serve while NATS is
    down. While the connection is down, :meth:`publish` fails at once instead of waiting
    for a timeout, and the flusher waits for the reconnect instead of piling messages
    into the client's reconnect buffer.
    """

    def __init__(
        self, js: JetStreamContext | None, *, buffer_limit: int = 100_000, timeout: float = 5.0
    ) -> None:
        self._js = js
        self._timeout = timeout
        self._buffer: deque[Event] = deque()
        self._buffer_limit = buffer_limit
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.dropped = 0
        self.published = 0
        self._drop_logged_at = -60.0
        # Pipelined flushing: acknowledgements of buffered events arrive on one wildcard inbox.
        self._acks: Subscription | None = None
        self._acks_nc: NATS | None = None
        self._reply_prefix = ""
        self._sequence = 0
        self._inflight: dict[str, Event] = {}
        self._refused: list[Event] = []
        self._all_acked: asyncio.Future[None] | None = None
        # Buffered events go out as fast batches (one acknowledgement per batch); when the
        # stream refuses them, event by event until this time (monotonic) to try again.
        self._fast_batches_after = 0.0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def connected(self) -> bool:
        """True when a JetStream context is attached and its connection is up."""
        if self._js is None:
            return False
        nc = getattr(self._js, "_nc", None)  # nats-py keeps the client there; no public accessor
        return bool(getattr(nc, "is_connected", True))

    def attach(self, js: JetStreamContext) -> None:
        """Give a publisher created without NATS its JetStream context; buffered events then flow."""
        self._js = js
        self._wakeup.set()

    async def publish(self, event: Event) -> None:
        if self._js is None or not self.connected:
            raise PublisherNotConnected("NATS is not connected")
        await self._js.publish(
            event.subject,
            _event_json(event),
            timeout=self._timeout,
            headers={"Nats-Msg-Id": event.event_id},
        )
        self.published += 1

    def publish_later(self, event: Event) -> bool:
        """Queue the event; False when the buffer was full and the event was dropped."""
        if len(self._buffer) >= self._buffer_limit:
            self.dropped += 1
            now = time.monotonic()
            if now - self._drop_logged_at >= 10.0:  # one line per 10 s, not one per request
                self._drop_logged_at = now
                log.error(
                    "event buffer full (%d): %d events dropped so far", self._buffer_limit, self.dropped
                )
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

    def _on_ack(self, msg: Msg) -> None:
        event = self._inflight.pop(msg.subject, None)
        if event is None:
            return  # a late answer for a batch already given up on (and requeued)
        # JetStream answers {"stream":..,"seq":..[,"duplicate":true]} or {"error":..}; a 503
        # status means no stream listens on the subject (yet).
        if (msg.headers and msg.headers.get("Status") == "503") or b'"error"' in msg.data:
            self._refused.append(event)
        else:
            self.published += 1
        if not self._inflight and self._all_acked is not None and not self._all_acked.done():
            self._all_acked.set_result(None)

    async def _flush_once(self, batch_size: int = _FLUSH_BATCH) -> bool:
        """Publish a batch pipelined and wait (bounded) for every acknowledgement.

        Each event goes out with its own reply subject under one inbox that a single
        subscription reads, so a buffered event costs one protocol command and one
        acknowledgement instead of a request with its own future and timer: the flusher
        keeps up with a busy tracker. Whatever is not acknowledged in time is put back and
        republished (deduplicated).
        """
        assert self._js is not None
        nc: NATS = self._js._nc  # nats-py keeps the client there; no public accessor
        if self._acks_nc is not nc:
            self._reply_prefix = nc.new_inbox() + "."
            self._acks = await nc.subscribe(self._reply_prefix + "*", future=ReplySink(self._on_ack))  # type: ignore[arg-type]
            self._acks_nc = nc
        batch = [self._buffer.popleft() for _ in range(min(batch_size, len(self._buffer)))]
        if self.fast_batches:
            return await self._flush_fast(nc, batch)
        return await self._flush_one_by_one(nc, batch)

    @property
    def fast_batches(self) -> bool:
        """Whether buffered events currently go out as fast batches."""
        return time.monotonic() >= self._fast_batches_after

    async def _flush_one_by_one(self, nc: NATS, batch: list[Event]) -> bool:
        """Each event with its own acknowledgement (a stream that takes no fast batches)."""
        self._refused = []
        self._all_acked = asyncio.get_running_loop().create_future()
        unsent: list[Event] = []
        try:
            for start in range(0, len(batch), _FLUSH_CHUNK):
                chunk = batch[start : start + _FLUSH_CHUNK]
                commands, replies = [], []
                for event in chunk:
                    payload = self._encoded(event)
                    if payload is None:
                        continue
                    self._sequence += 1
                    reply = f"{self._reply_prefix}{self._sequence}"
                    self._inflight[reply] = event
                    replies.append(reply)
                    commands.append(
                        hpub_command(_SUBJECTS[event.type], reply.encode(), event.event_id, payload)
                    )
                try:
                    await send_commands(nc, commands)
                except Exception as exc:
                    log.warning("publishing buffered events failed (%s); retrying", exc)
                    for reply in replies:
                        self._inflight.pop(reply, None)
                    unsent = batch[start:]
                    break
                await asyncio.sleep(0)  # let the requests that share this loop be served meanwhile
            if self._inflight:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_acked, self._timeout)
        finally:
            # Everything not acknowledged goes back to the front of the buffer, also when
            # this flush is cancelled at shutdown, so nothing leaves memory unstored.
            failed = [*self._refused, *self._inflight.values(), *unsent]
            self._inflight.clear()
            self._buffer.extendleft(reversed(failed))
        return not failed

    def _encoded(self, event: Event) -> bytes | None:
        """The event's JSON; None (and counted as dropped) for text JSON cannot carry, which
        would never be stored."""
        try:
            return _event_json(event)
        except ValueError as exc:
            self.dropped += 1
            log.error("dropping event %s that cannot be encoded: %s", event.event_id, exc)
            return None

    async def _flush_fast(self, nc: NATS, batch: list[Event]) -> bool:
        """Publish a batch as one JetStream fast batch; what is not surely stored goes back
        to the front of the buffer (republishing is deduplicated)."""
        messages, kept = [], []
        for event in batch:
            payload = self._encoded(event)
            if payload is None:
                continue
            messages.append((_SUBJECTS[event.type], event.event_id, payload))
            kept.append(event)
        try:
            stored = await publish_fast_batch(nc, messages, self._timeout)
        except FastBatchesUnavailable as exc:
            # Nothing is lost (at most the first event was stored, and its republication is
            # deduplicated): these go event by event, and fast batches are tried again later.
            self._fast_batches_after = time.monotonic() + _FAST_BATCH_RETRY_SECONDS
            log.info("JetStream refused a fast batch (%s); publishing event by event for a while", exc)
            return await self._flush_one_by_one(nc, kept)
        except BaseException:  # cancelled at shutdown, or the connection failed: all of them again
            self._buffer.extendleft(reversed(kept))
            raise
        self.published += stored
        self._buffer.extendleft(reversed(kept[stored:]))
        return stored == len(kept)

    async def _flush_forever(self) -> None:
        backoff = 0.1
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self.connected:
                # Wait for the reconnect (or attach) rather than time out message by message.
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), 0.1)
                continue
            if len(self._buffer) < _FLUSH_BATCH and not self._closing:
                # Let a few more events join the batch: one batch per busy loop iteration would
                # spend more on bookkeeping than on publishing.
                await asyncio.sleep(_FLUSH_LINGER_SECONDS)
            try:
                flushed = await self._flush_once()
            except Exception as exc:  # the flusher must outlive any NATS trouble
                log.warning("flushing buffered events failed (%s); retrying", exc)
                flushed = False
            if flushed:
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
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # its batch in flight returns to the buffer, to be counted
            log.error("shutting down with %d unpublished events", len(self._buffer))
        self._task = None
