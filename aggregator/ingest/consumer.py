"""The durable JetStream pull consumer feeding :mod:`aggregator.ingest.ingest`.

Messages are acknowledged only after their batch's transaction committed, a whole batch
in one write. If the database fails, the batch is nak'ed and JetStream redelivers it; the
unique ``event_id`` makes any replay harmless. A malformed message is terminated (it would
fail forever) and counted. So is an event the database refuses while it works (a
"poison" event, which would otherwise stall the stream): the batch is halved until that
one event is isolated, and everything else is stored. An event is given up on only with
proof that it, not the database, is at fault: another event of its batch was stored, or
the database called its value invalid. A database that answers but stores nothing
(read-only after a failover, a full disk) gets the batch again later, however long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext
from sqlalchemy import text
from sqlalchemy.exc import DataError

from aggregator import metrics
from aggregator.ingest.decode import Incoming, InvalidEvent, decode
from aggregator.ingest.feed import ACK, TERM, Delivery, PullFeed, delivery_info, nak
from aggregator.ingest.ingest import adopt_parked, apply_prepared, count_parked, look_up_stored
from aggregator.ingest.prepare import Prepared, prepare, prepare_yielding
from aggregator.ingest.privacy import NOBODY, Anonymized
from aggregator.store.db import Database
from mailbeacon.bus.jetstream import CONSUMER, STREAM, client_of
from mailbeacon.bus.nats_auth import NatsLogin
from mailbeacon.contract.events import utcnow

log = logging.getLogger(__name__)

ADOPT_EVERY_SECONDS = 2.0
# Each adoption looks at the events parked since the previous one began, less this margin
# (replicas' clocks, batches prepared a while before they commit); once a minute at all of
# them (one skipped because another transaction held it may be older). The parked count
# for the gauge is refreshed every few rounds: both read up to PARKED_EVENT_LIMIT rows.
ADOPT_MARGIN = timedelta(seconds=60)
ADOPT_ALL_EVERY_SECONDS = 60.0
COUNT_PARKED_EVERY_SECONDS = 10.0
MAX_RETRY_DELAY_SECONDS = 30.0
# Events decoded between two chances for the batch in the database to go on.
DECODE_SLICE = 32
# How long after events were put back for redelivery address-only webhooks still wait for
# them: their redelivery, and the batch storing them.
REDELIVERY_MARGIN_SECONDS = 2.0


def _refuses_the_value(failure: Exception) -> bool:
    """Whether the database said the data itself is wrong (SQLSTATE class 22, "data
    exception": a NUL in text, a value out of range), not that it cannot write."""
    reason = getattr(failure, "orig", None) or failure
    state = getattr(reason, "sqlstate", None) or getattr(reason, "pgcode", None)
    return isinstance(failure, DataError) or (isinstance(state, str) and state.startswith("22"))


def arrivals(events: Sequence[Incoming], replies: Sequence[bytes]) -> dict[str, datetime]:
    """When the stream stored each address-only event: JetStream's own time, from the
    acknowledgement subject, which no publisher can set (it bounds the event's time, see
    :mod:`aggregator.store.attribution`). Other events need no arrival: this costs one test each."""
    arrived: dict[str, datetime] = {}
    for event, reply in zip(events, replies, strict=True):
        if event.tracking_id is None and event.recipient is not None:
            info = delivery_info(reply)
            if info is not None:
                arrived[event.event_id] = info.stored_at
    return arrived


def _why(failure: Exception) -> str:
    """The driver's reason, without the statement and its thousands of parameters."""
    reason = getattr(failure, "orig", None) or failure
    return f"{type(reason).__name__}: {str(reason).splitlines()[0] if str(reason) else ''}"[:500]


class EventConsumer:
    """Takes batches from the pull feed and stores them, ``pipeline`` batches at a time.

    While one batch's transaction runs in the database, the next one is already being
    decoded and prepared. On PostgreSQL a batch is split into ``lanes`` by tracking id,
    each stored in a transaction of its own, concurrently: the lanes touch different
    messages, so they wait for each other only at the end, for the shared counter rows,
    and the database works on two cores. Within a lane, transactions run one at a time,
    in the order the batches were taken: a batch then sees the messages the previous one
    created, instead of parking their events for :func:`adopt_parked` (with two batches
    at once, about one event in twenty took that slower path). Address-only webhooks
    belong to the latest copy sent to the address, which any lane may be storing: they
    are stored after every lane of their batch, and while events put back for redelivery
    (a failed store) may still return, they wait for them too. Counting each event once
    never depends on this order (other replicas commit concurrently anyway); attributing
    an address-only webhook relies on its copy's ``sent`` being stored first.
    """

    def __init__(
        self,
        js: JetStreamContext,
        db: Database,
        batch_size: int = 5000,
        pipeline: int | None = None,
        anonymized: Anonymized = NOBODY,
        lanes: int | None = None,
        login: NatsLogin | None = None,
    ) -> None:
        # The pull feed publishes raw pull requests, so it needs the connection under js (and
        # the login, for its own lean connection).
        nc = client_of(js)
        self.nc = nc
        self.db = db
        self.feed = PullFeed(nc, STREAM, CONSUMER, batch_size, login=login)
        # SQLite has one writer: a second lane would only wait for it.
        self.lanes = lanes or (2 if db.dialect == "postgresql" else 1)
        # With lanes, a batch ends with its address-only events after both lanes: one
        # batch more in flight keeps the lanes busy meanwhile (20,970 against 19,009
        # events/s in the PostgreSQL benchmark).
        self.pipeline = pipeline or (3 if self.lanes > 1 else 2)
        # Chains of transactions, each in the order batches were taken: the lanes, then
        # (with several lanes) the address-only events of each batch.
        self._chains = self.lanes + 1 if self.lanes > 1 else 1
        self.anonymized = anonymized  # campaigns with privacy.anonymizeIp (kept current by the service)
        self._in_flight: set[asyncio.Task[None]] = set()
        # Per chain: done when the latest batch taken has been stored (or given up) there.
        self._last_turns: list[asyncio.Future[None] | None] = [None] * self._chains
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Until then, events put back for redelivery may still be on their way back.
        self._redelivery_due = 0.0
        self.db_ok = True
        self.processed = 0
        self._adopted_since: datetime | None = None  # the window of the next adoption
        self._adopted_all = self._counted = -float("inf")  # monotonic times
        # How far ingest has got in the stream, for the expiry of parked events.
        self._caught_up = False
        self._stored_until: datetime | None = None
        # Runs after a batch committed and before it is acknowledged (suppressions); when it
        # fails, the batch is redelivered and the hook runs again on the duplicates.
        self.before_ack: Callable[[Sequence[Incoming]], Awaitable[None]] | None = None

    @property
    def healthy(self) -> bool:
        return self.feed.connected and self.db_ok

    def ingested_until(self) -> datetime | None:
        """Up to when the stream's events are stored: now, when the stream held nothing more
        at the last look; else the arrival of the newest event stored; None before either is
        known (just started). Parked events expire by this clock (:mod:`aggregator.ingest.parked`),
        so an aggregator catching up on a backlog (after an outage longer than the TTL)
        never expires an event whose copy's ``sent`` is still waiting in the stream."""
        return utcnow() if self._caught_up and self.feed.connected else self._stored_until

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
                if not taken and self.feed.connected:
                    self._caught_up = True
                if taken:
                    loop = asyncio.get_running_loop()
                    turns: list[asyncio.Future[None]] = [loop.create_future() for _ in range(self._chains)]
                    task = asyncio.create_task(
                        self._process(taken, self._last_turns, turns), name="aggregator-batch"
                    )
                    self._last_turns = list(turns)
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

    async def _process(
        self,
        taken: list[Delivery],
        previous: Sequence[asyncio.Future[None] | None],
        turns: Sequence[asyncio.Future[None]],
    ) -> None:
        """Decode a batch and store each chain of it after the previous batch's in that chain."""
        try:
            try:
                events, replies = await self._decode(taken)
            except Exception:
                log.exception("decoding a batch of %d events failed; it will be redelivered", len(taken))
                await self._put_back([reply for reply, _ in taken], 1.0)
                return
            chains: list[tuple[list[Incoming], list[bytes]]] = [([], []) for _ in range(self._chains)]
            for event, reply in zip(events, replies, strict=True):
                # A message's events share a lane, so the lane that stores its ``sent`` stores
                # them after it; address-only events go last (with one lane, in it).
                tid = event.tracking_id
                chain = chains[hash(tid) % self.lanes] if tid else chains[-1]
                chain[0].append(event)
                chain[1].append(reply)
            lane_turns = list(turns[: self.lanes])
            await asyncio.gather(
                *(
                    self._store_in_turn(
                        part, part_replies, [before, *(lane_turns if n >= self.lanes else [])], turn
                    )
                    for n, ((part, part_replies), before, turn) in enumerate(
                        zip(chains, previous, turns, strict=True)
                    )
                ),
                return_exceptions=True,  # each chain settles its own messages; one failing stops none
            )
        finally:
            for turn in turns:
                if not turn.done():
                    turn.set_result(None)

    async def _store_in_turn(
        self,
        events: list[Incoming],
        replies: list[bytes],
        waits: Sequence[asyncio.Future[None] | None],
        turn: asyncio.Future[None],
    ) -> None:
        """Prepare events while the batches they must follow are stored, then store them."""
        try:
            postgres = self.db.dialect == "postgresql"
            batch = await prepare_yielding(events, postgres, arrivals(events, replies)) if events else None
            if batch is not None:
                with contextlib.suppress(Exception):  # only a shortcut: the transaction looks up itself
                    await look_up_stored(self.db, batch)
            for wait in waits:
                if wait is not None:
                    # Stored in the order taken: a batch stored before the one holding the
                    # ``sent`` of its messages would park their events for adoption (or give
                    # an address-only event to an older copy).
                    await wait
            if batch is not None and time.monotonic() < self._redelivery_due:
                batch, events, replies = await self._hold_back_address_only(events, replies, batch)
            if batch is not None:
                await self._store(events, replies, batch)
        except Exception:
            # Nothing here should raise; if it does, JetStream gets the events again rather
            # than waiting out the acknowledgement deadline (a nak of an event already
            # acknowledged changes nothing).
            log.exception(
                "storing a batch of %d events failed; what is not stored will be redelivered", len(events)
            )
            with contextlib.suppress(Exception):
                await self._put_back(replies, 1.0)
        finally:
            if not turn.done():
                turn.set_result(None)

    async def _put_back(self, replies: list[bytes], delay: float) -> None:
        """Have JetStream redeliver these after ``delay`` seconds."""
        self._redelivery_due = max(self._redelivery_due, time.monotonic() + delay + REDELIVERY_MARGIN_SECONDS)
        await self.feed.settle(replies, nak(delay))

    async def _hold_back_address_only(
        self, events: list[Incoming], replies: list[bytes], batch: Prepared
    ) -> tuple[Prepared | None, list[Incoming], list[bytes]]:
        """Events put back for redelivery (the database failed) may hold the ``sent`` of the
        copy an address-only webhook belongs to. Attributed now, the webhook would go to an
        older copy for good; it comes back after them instead. Returns what to store now."""
        held = [n for n, event in enumerate(events) if not event.tracking_id and event.recipient]
        if not held:
            return batch, events, replies
        wait = self._redelivery_due - time.monotonic()
        log.info("%d address-only events wait %.1f s for events put back for redelivery", len(held), wait)
        await self.feed.settle([replies[n] for n in held], nak(max(wait, 0.1)))
        skip = set(held)
        events = [event for n, event in enumerate(events) if n not in skip]
        replies = [reply for n, reply in enumerate(replies) if n not in skip]
        rest = prepare(events, self.db.dialect == "postgresql", arrivals(events, replies)) if events else None
        return rest, events, replies

    async def _decode(self, taken: list[Delivery]) -> tuple[list[Incoming], list[bytes]]:
        """The valid events with their acknowledgement subjects; malformed ones are terminated."""
        events: list[Incoming] = []
        valid: list[bytes] = []
        malformed: list[bytes] = []
        for n, (reply, payload) in enumerate(taken, 1):
            if n % DECODE_SLICE == 0:
                # Let the batch in the database go on: its next statement waits for this loop.
                await asyncio.sleep(0)
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
        return events, valid

    async def _store(self, events: list[Incoming], replies: list[bytes], batch: Prepared) -> None:
        """Store a batch; if the database refuses it while it answers, find the events it
        refuses by halving the batch, store the rest, and terminate those events."""
        failure = await self._try_store(events, replies, batch)
        if failure is None:
            return
        if not await self._database_answers():
            await self._retry_later(events, replies, failure)
            return
        log.debug("batch of %d events refused (%s); storing it in halves", len(events), _why(failure))
        suspects: list[tuple[Incoming, bytes, Exception]] = []
        stored_any = await self._halve(events, replies, failure, suspects)
        for event, reply, why in suspects:
            # Once more, in case the failure was transient (a deadlock, a lost race).
            again = await self._try_store([event], [reply])
            if again is None:
                stored_any = True
                continue
            if stored_any or _refuses_the_value(again):
                # The database stores other events and refuses this one every time: it
                # would stall the stream.
                metrics.REJECTED.inc()
                log.error(
                    "rejecting event %s: the database refuses to store it (%s)", event.event_id, _why(again)
                )
                await self.feed.settle([reply], TERM)
            else:
                # Nothing of the batch could be stored and nothing says the values are at
                # fault: a database that answers but does not write (a read-only standby
                # after failover, a full disk). Wait for it; never drop events for it.
                await self._retry_later([event], [reply], why)

    async def _halve(
        self,
        events: list[Incoming],
        replies: list[bytes],
        failure: Exception,
        suspects: list[tuple[Incoming, bytes, Exception]],
    ) -> bool:
        """Store what can be stored of a refused batch; collect the single events refused.

        True when some part of it was stored: proof that the database writes.
        """
        if len(events) == 1:
            suspects.append((events[0], replies[0], failure))
            return False
        middle = len(events) // 2
        stored_any = False
        for part, part_replies in ((events[:middle], replies[:middle]), (events[middle:], replies[middle:])):
            refused = await self._try_store(part, part_replies)
            if refused is None or await self._halve(part, part_replies, refused, suspects):
                stored_any = True
        return stored_any

    async def _try_store(
        self, events: list[Incoming], replies: list[bytes], batch: Prepared | None = None
    ) -> Exception | None:
        """Store and acknowledge the batch (``batch``: the events prepared); the exception if
        its transaction failed (nothing stored)."""
        if batch is None:
            batch = prepare(events, self.db.dialect == "postgresql", arrivals(events, replies))
        try:
            started = time.perf_counter()
            result = await apply_prepared(self.db, batch, self.anonymized)
        except Exception as exc:
            metrics.BATCH_FAILURES.inc()
            return exc
        self.db_ok = True
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        if self.before_ack is not None:
            try:
                await self.before_ack(events)
            except Exception as exc:
                log.warning("batch stored, but its suppressions not (%s); it will be redelivered", exc)
                await self.feed.settle(replies, nak(1.0))
                return None
        await self.feed.settle(replies, ACK)
        self.processed += len(events)
        metrics.record_batch(result, len(events))
        info = delivery_info(replies[-1])
        if info is not None:
            metrics.LAG.set(info.pending)
            metrics.LAG_SECONDS.set(max(0.0, (datetime.now(UTC) - info.stored_at).total_seconds()))
            self._caught_up = info.pending == 0
            if self._stored_until is None or info.stored_at > self._stored_until:
                self._stored_until = info.stored_at
        return None

    async def _database_answers(self) -> bool:
        try:
            async with self.db.writing() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def _retry_later(self, events: list[Incoming], replies: list[bytes], failure: Exception) -> None:
        """The database is unavailable: nak, with a delay growing with the deliveries so far.

        No message is ever given up on for this (the consumer has no ``max_deliver``):
        an outage of any length loses nothing.
        """
        self.db_ok = False
        info = delivery_info(replies[0])
        delay = min(MAX_RETRY_DELAY_SECONDS, 2.0 ** ((info.delivered if info else 1) - 1))
        log.error(
            "batch of %d events not stored (%s); redelivery in %.0f s", len(events), _why(failure), delay
        )
        await self._put_back(replies, delay)
        await asyncio.sleep(0.5)

    async def _adopt(self) -> None:
        now, started = time.monotonic(), utcnow()
        everything = now - self._adopted_all >= ADOPT_ALL_EVERY_SECONDS or self._adopted_since is None
        try:
            since = None if everything else self._adopted_since
            result = await adopt_parked(self.db, anonymized=self.anonymized, since=since)
            metrics.record_batch(result, 0)
            self._adopted_since = started - ADOPT_MARGIN
            if everything:
                self._adopted_all = now
            if now - self._counted >= COUNT_PARKED_EVERY_SECONDS:
                metrics.PARKED.set(await count_parked(self.db))
                self._counted = now
        except Exception as exc:
            log.warning("adopting parked events failed: %s", exc)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, timeout=15)
            self._task = None
        await self.feed.stop()
