"""Unsubscribes and complaints become suppressions the proxies enforce.

The tracker's unsubscribe event carries only a tracking id; the aggregator is the one
component that knows each copy's campaign and recipient. For every ``unsubscribed`` or
``complained`` event it stores, it puts the (campaign, recipient) pair into the KV bucket
``mailbeacon_suppressions`` (see :mod:`mailbeacon.bus.suppressions`), where proxies read it.

When a put happens, and what repairs a crash:

- events applied by their own batch: after the commit and before the batch is
  acknowledged, so a crash in between is repaired by the redelivery (the event is then a
  duplicate in SQL, but still found here by its id; puts are idempotent);
- events parked until their message is known, then applied by a later batch or by
  adoption (possibly on another replica): the replica that parked one checks it every
  few seconds until it is applied;
- whatever a crash lost on those paths, and suppressions older than this feature: at
  start, every stored unsubscribe and complaint whose pair the bucket lacks is put. A
  pair whose key an operator deleted (a lifted suppression: its delete marker stays in
  the bucket) is not brought back by old events, only by a new unsubscribe or complaint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, text

from aggregator import metrics
from aggregator.ingest.decode import Incoming
from aggregator.store.db import Database
from mailbeacon.bus.suppressions import REASONS, SuppressionList
from mailbeacon.contract.events import EventType

log = logging.getLogger(__name__)

CHECK_PARKED_SECONDS = 2.0
MAX_WATCHED = 10_000  # parked unsubscribes/complaints watched at once (they are few)
WATCH_SECONDS = 3600.0
_PUTS_AT_ONCE = 256
_IDS_PER_QUERY = 1000
_TYPES = {EventType.UNSUBSCRIBED.value, EventType.COMPLAINED.value}

# Each event with its message's campaign and recipient (NULL while the event is parked), and
# whether it can ever be applied (it names a message or at least an address).
_BY_EVENT_ID = text(
    "SELECT e.event_id, e.type, e.occurred_at, m.campaign, m.recipient, "
    "CASE WHEN e.tracking_id IS NULL AND e.recipient IS NULL THEN 0 ELSE 1 END "
    "FROM events e LEFT JOIN messages m ON m.tracking_id = e.tracking_id AND e.applied = :yes "
    "WHERE e.event_id IN :ids"
).bindparams(bindparam("ids", expanding=True), yes=True)
# The literal false (not a parameter) lets the planner use the partial index of parked events.
_PARKED = (
    "SELECT event_id FROM events WHERE applied = {false} AND type IN ('unsubscribed', 'complained') "
    "AND (tracking_id IS NOT NULL OR recipient IS NOT NULL) ORDER BY id DESC LIMIT {limit}"
)
_ALL_APPLIED = text(
    "SELECT e.type, e.occurred_at, m.campaign, m.recipient FROM events e "
    "JOIN messages m ON m.tracking_id = e.tracking_id "
    "WHERE e.type IN ('unsubscribed', 'complained') AND e.applied = :yes"
).bindparams(yes=True)


def _utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        return datetime.now(UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Pair = tuple[str, str, str, datetime]  # campaign, recipient, reason, at


class SuppressionRecorder:
    def __init__(self, db: Database, suppressions: SuppressionList) -> None:
        self.db = db
        self.suppressions = suppressions
        # Unsubscribes/complaints this replica parked, with when it began to watch them.
        self.watched: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def _put(self, pairs: Iterable[Pair]) -> None:
        unique = {(campaign, recipient): (reason, at) for campaign, recipient, reason, at in pairs}
        items = list(unique.items())
        for start in range(0, len(items), _PUTS_AT_ONCE):
            chunk = items[start : start + _PUTS_AT_ONCE]
            await asyncio.gather(*(self.suppressions.put(c, r, reason, at) for (c, r), (reason, at) in chunk))
            for _, (reason, _at) in chunk:
                metrics.SUPPRESSIONS_RECORDED.labels(reason).inc()

    async def _by_event_id(self, ids: Sequence[str]) -> list[Any]:
        rows: list[Any] = []
        async with self.db.read_engine.connect() as conn:
            for start in range(0, len(ids), _IDS_PER_QUERY):  # within every driver's parameter limit
                chunk = list(ids[start : start + _IDS_PER_QUERY])
                rows += (await conn.execute(_BY_EVENT_ID.bindparams(ids=chunk))).all()
        return rows

    async def record(self, events: Sequence[Incoming]) -> None:
        """After a batch committed, before it is acknowledged: put its unsubscribes and
        complaints, and watch those still parked. Raises when the bucket cannot be written
        (the batch is then redelivered)."""
        ids = [e.event_id for e in events if e.type in _TYPES]
        if not ids:
            return
        rows = await self._by_event_id(ids)
        pairs: list[Pair] = []
        now = time.monotonic()
        for event_id, kind, occurred_at, campaign, recipient, applicable in rows:
            if campaign is None or recipient is None:
                if applicable:
                    self._watch(event_id, now)
            elif kind in REASONS:
                pairs.append((campaign, recipient, kind, _utc(occurred_at)))
        await self._put(pairs)

    def _watch(self, event_id: str, now: float) -> None:
        """Watch a parked event; when full, give up the longest-watched one.

        The unsubscribe URL is public, so anyone can park events for copies that never
        existed: the newest are kept, since a genuine one is applied within seconds of its
        copy's ``sent`` (and anything given up is put by the catch-up at the next start).
        """
        if event_id in self.watched:
            return
        if len(self.watched) >= MAX_WATCHED:
            self.watched.pop(next(iter(self.watched)))
            metrics.SUPPRESSION_WATCH_OVERFLOW.inc()
        self.watched[event_id] = now

    async def check_parked(self) -> None:
        """Put the watched events that have been applied meanwhile (by any replica)."""
        if not self.watched:
            return
        ids = sorted(self.watched)
        rows = await self._by_event_id(ids)
        found = {row[0] for row in rows}
        applied = [row for row in rows if row[3] is not None and row[4] is not None]
        await self._put((c, r, k, _utc(at)) for _, k, at, c, r, _ in applied if k in REASONS)
        # Done with: applied ones, ids no longer stored (pruned by retention), and ids whose
        # copy never showed up (a recipient cannot unsubscribe from mail that was not sent:
        # such an id was forged or its message is gone; a restart looks at it once more).
        expired = time.monotonic() - WATCH_SECONDS
        done = {row[0] for row in applied} | (set(ids) - found)
        done |= {event_id for event_id, since in self.watched.items() if since < expired}
        for event_id in done:
            self.watched.pop(event_id, None)

    async def catch_up(self) -> int:
        """Put every stored unsubscribe and complaint whose pair the bucket lacks; how many."""
        async with self.db.read_engine.connect() as conn:
            false = "false" if self.db.dialect == "postgresql" else "0"
            parked = (
                (await conn.execute(text(_PARKED.format(false=false, limit=MAX_WATCHED)))).scalars().all()
            )
            now = time.monotonic()
            for event_id in reversed(parked):  # the newest last, so they are given up last
                self._watch(event_id, now)
            missing: list[Pair] = []
            result = await conn.stream(_ALL_APPLIED)
            async for kind, occurred_at, campaign, recipient in result:
                if kind in REASONS and not self.suppressions.has_entry(campaign, recipient):
                    missing.append((campaign, recipient, kind, _utc(occurred_at)))
        await self._put(missing)
        return len({(c, r) for c, r, _, _ in missing})

    async def start(self) -> None:
        """Load the bucket, then catch up and watch parked events in the background."""
        await self.suppressions.start()
        self._tasks = [asyncio.create_task(self._run(), name="aggregator-suppressions")]

    async def _run(self) -> None:
        while True:
            try:
                added = await self.catch_up()
                if added:
                    log.info("recorded %d suppressions missing from the bucket", added)
                break
            except Exception as exc:
                log.warning("catching up on suppressions failed (%s); retrying", exc)
                await asyncio.sleep(5.0)
        while True:
            await asyncio.sleep(CHECK_PARKED_SECONDS)
            try:
                await self.check_parked()
            except Exception as exc:
                log.warning("recording suppressions of adopted events failed: %s", exc)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.suppressions.stop()
