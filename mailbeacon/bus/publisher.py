"""Publishing events to JetStream: at once with an acknowledgement, or buffered and flushed.

Buffered events are kept as ready protocol frames (:data:`mailbeacon.bus.fast_batch.Outgoing`):
each is encoded once, when it is buffered, however often a flush has to send it again. They
go out as fast batches, or event by event over the same raw frames where the stream refuses
those: 8-9 (fast batches) or 3-5 (event by event) times less CPU per event than nats-py's
``js.publish_async`` (measured 2026-12-07, see :mod:`mailbeacon.bus.fast_batch`). Events a caller
waits for (:meth:`EventPublisher.publish`: webhooks, the proxy) use nats-py's ``js.publish``.

What is still unpublished when the publisher closes goes to the spool
(:mod:`mailbeacon.bus.spool`), and comes back first at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from mailbeacon.bus.fast_batch import (
    FastBatchesUnavailable,
    Outgoing,
    ReplySink,
    hpub,
    outgoing,
    publish_fast_batch,
    send_commands,
)
from mailbeacon.bus.jetstream import client_of
from mailbeacon.bus.spool import Spool, SpoolLedger
from mailbeacon.contract.events import Event, EventType, subject_for

log = logging.getLogger(__name__)

# Buffered events are published in batches of up to _FLUSH_BATCH, waiting a few milliseconds
# for a batch to fill: buffered events are not latency-critical, the requests behind them are.
_FLUSH_BATCH = 512
_FLUSH_LINGER_SECONDS = 0.01
_FLUSH_CHUNK = 64  # events written per event-loop turn
_FAST_BATCH_RETRY_SECONDS = 300.0


# Event's JSON serializer called directly: the bytes of Event.to_json() without pydantic's
# round trip through str.
_event_json = Event.__pydantic_serializer__.to_json
SUBJECTS = {event_type: subject_for(event_type).encode() for event_type in EventType}


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
        self,
        js: JetStreamContext | None,
        *,
        buffer_limit: int = 100_000,
        timeout: float = 5.0,
        spool: Spool | None = None,
    ) -> None:
        self._js = js
        self._timeout = timeout
        self._buffer: deque[Outgoing] = deque()
        self._buffer_limit = buffer_limit
        self._reserved = 0  # room reserved for events not handed over yet
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
        self._inflight: dict[str, Outgoing] = {}
        self._refused: list[Outgoing] = []
        self._all_acked: asyncio.Future[None] | None = None
        # Buffered events go out as fast batches (one acknowledgement per batch); when the
        # stream refuses them, event by event until this time (monotonic) to try again.
        self._fast_batches_after = 0.0
        # Where unpublished events go at close, and the files taken from it at start while
        # some of their events are not acknowledged yet.
        self._spool = spool
        self._ledger: SpoolLedger | None = None
        self._spool_published = asyncio.Event()
        self._spool_published.set()
        self.spool_skipped = 0  # unreadable spool lines met at start

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def connected(self) -> bool:
        """True when a JetStream context is attached and its connection is up."""
        if self._js is None:
            return False
        return bool(client_of(self._js).is_connected)

    @property
    def jetstream(self) -> JetStreamContext | None:
        """The JetStream context while connected (for KV buckets on the same connection), else None."""
        return self._js if self.connected else None

    @property
    def max_payload(self) -> int | None:
        """The largest message the connected NATS server takes (its ``max_payload``), else None."""
        return int(client_of(self._js).max_payload) if self._js is not None and self.connected else None

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
        """Queue the event; False when it was dropped (a full buffer, or text JSON cannot carry,
        which could never be stored)."""
        try:
            payload = _event_json(event)
        except ValueError as exc:
            self.dropped += 1
            log.error("dropping event %s that cannot be encoded: %s", event.event_id, exc)
            return False
        return self.publish_encoded_later(outgoing(SUBJECTS[event.type], event.event_id, payload))

    def _admit(self) -> bool:
        """Whether one more event fits: buffered events and reserved room count against the
        limit. A refused event is counted as dropped."""
        if len(self._buffer) + self._reserved < self._buffer_limit:
            return True
        self.dropped += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= 10.0:  # one line per 10 s, not one per request
            self._drop_logged_at = now
            log.error("event buffer full (%d): %d events dropped so far", self._buffer_limit, self.dropped)
        return False

    def reserve(self) -> bool:
        """Room for an event its producer keeps a while before handing it over with
        ``publish_encoded_later(..., reserved=True)`` (a click held for the burst window), so
        that it is refused, and counted as dropped, when it arrives rather than when it is
        handed over. False when there is no room."""
        if not self._admit():
            return False
        self._reserved += 1
        return True

    @property
    def reserved(self) -> int:
        """Room reserved for events not handed over yet."""
        return self._reserved

    def discard(self, *, reserved: bool = False) -> None:
        """An event its producer could not hand over after all (it could not be encoded):
        counted as dropped, and its room, if ``reserved``, given back."""
        if reserved:
            self._reserved -= 1
        self.dropped += 1

    def publish_encoded_later(self, message: Outgoing, *, reserved: bool = False) -> bool:
        """:meth:`publish_later` for an event its producer encoded itself (the tracker's pixel
        and click events); ``reserved`` when :meth:`reserve` made its room."""
        if reserved:
            self._reserved -= 1
        elif not self._admit():
            return False
        self._buffer.append(message)
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
        message = self._inflight.pop(msg.subject, None)
        if message is None:
            return  # a late answer for a batch already given up on (and requeued)
        # JetStream answers {"stream":..,"seq":..[,"duplicate":true]} or {"error":..}; a 503
        # status means no stream listens on the subject (yet).
        if (msg.headers and msg.headers.get("Status") == "503") or b'"error"' in msg.data:
            self._refused.append(message)
        else:
            self.published += 1
            if self._ledger is not None:
                self._stored_spooled(message)
        if not self._inflight and self._all_acked is not None and not self._all_acked.done():
            self._all_acked.set_result(None)

    async def _flush_once(self, batch_size: int = _FLUSH_BATCH) -> bool:
        """Publish a batch and wait (bounded) for JetStream to acknowledge it; whatever is not
        surely stored goes back to the front of the buffer (republishing is deduplicated)."""
        assert self._js is not None
        nc = client_of(self._js)
        batch = [self._buffer.popleft() for _ in range(min(batch_size, len(self._buffer)))]
        if self.fast_batches:
            return await self._flush_fast(nc, batch)
        return await self._flush_one_by_one(nc, batch)

    @property
    def fast_batches(self) -> bool:
        """Whether buffered events currently go out as fast batches."""
        return time.monotonic() >= self._fast_batches_after

    async def _flush_one_by_one(self, nc: NATS, batch: list[Outgoing]) -> bool:
        """Each event with its own acknowledgement (a stream that takes no fast batches).

        Pipelined: each event goes out with its own reply subject under one inbox that a
        single subscription reads, so an event costs one protocol command and one
        acknowledgement instead of a request with its own future and timer.
        """
        if self._acks_nc is not nc:
            self._reply_prefix = nc.new_inbox() + "."
            self._acks = await nc.subscribe(self._reply_prefix + "*", future=ReplySink(self._on_ack))  # type: ignore[arg-type]
            self._acks_nc = nc
        self._refused = []
        self._all_acked = asyncio.get_running_loop().create_future()
        unsent: list[Outgoing] = []
        try:
            for start in range(0, len(batch), _FLUSH_CHUNK):
                chunk = batch[start : start + _FLUSH_CHUNK]
                commands, replies = [], []
                for message in chunk:
                    self._sequence += 1
                    reply = f"{self._reply_prefix}{self._sequence}"
                    self._inflight[reply] = message
                    replies.append(reply)
                    commands.append(hpub(message, reply.encode()))
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

    async def _flush_fast(self, nc: NATS, batch: list[Outgoing]) -> bool:
        """Publish a batch as one JetStream fast batch."""
        try:
            stored = await publish_fast_batch(nc, batch, self._timeout)
        except FastBatchesUnavailable as exc:
            # Nothing is lost (at most the first event was stored, and its republication is
            # deduplicated): these go event by event, and fast batches are tried again later.
            self._fast_batches_after = time.monotonic() + _FAST_BATCH_RETRY_SECONDS
            log.info("JetStream refused a fast batch (%s); publishing event by event for a while", exc)
            return await self._flush_one_by_one(nc, batch)
        except BaseException:  # cancelled at shutdown, or the connection failed: all of them again
            self._buffer.extendleft(reversed(batch))
            raise
        self.published += stored
        if self._ledger is not None:
            for message in batch[:stored]:
                self._stored_spooled(message)
        self._buffer.extendleft(reversed(batch[stored:]))
        return stored == len(batch)

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

    # -- the spool ------------------------------------------------------------------------

    def load_spool(self) -> int:
        """Take the spool files no other process holds and put their frames at the front of
        the buffer, ahead of any new event; the number of frames. Called before serving."""
        if self._spool is None:
            return 0
        ledger = SpoolLedger(self._spool, self._spool.claim_all())
        self.spool_skipped += ledger.skipped
        frames = ledger.take_frames()
        if not frames:
            return 0
        # Ahead of everything, and regardless of the limit: they were accepted before the stop.
        # They count against it for new events, so memory (and the next spool) stays bounded.
        self._buffer.extendleft(reversed(frames))
        self._ledger = ledger
        self._spool_published.clear()
        log.info(
            "publishing %d events kept in %d spool files at the last stop%s",
            len(frames),
            len(ledger.claims),
            f" ({ledger.skipped} unreadable lines skipped)" if ledger.skipped else "",
        )
        self._wakeup.set()
        if self._task is None:
            self._task = asyncio.create_task(self._flush_forever(), name="event-publisher")
        return len(frames)

    async def spool_published(self) -> None:
        """Returns once every frame :meth:`load_spool` took is acknowledged by JetStream."""
        await self._spool_published.wait()

    @property
    def spooled(self) -> int:
        """Frames from the spool not acknowledged yet."""
        return self._ledger.remaining if self._ledger is not None else 0

    def _stored_spooled(self, message: Outgoing) -> None:
        assert self._ledger is not None
        if self._ledger.stored(message):
            self._ledger = None
            self._spool_published.set()
            log.info("the events of the spool are all published")

    def _write_spool(self) -> None:
        """At close: whatever is unpublished into one new spool file."""
        if self._spool is None:
            if self._buffer:
                log.error("shutting down with %d unpublished events", len(self._buffer))
            return
        if self._spool.keep(self._buffer, self._ledger):
            self._buffer.clear()
        self._ledger = None
        self._spool_published.set()

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Flush what is buffered, retrying until ``drain_timeout`` is over, then stop the
        flusher and spool whatever is still unpublished."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task  # its batch in flight returns to the buffer, to be spooled
            self._task = None
        self._write_spool()
