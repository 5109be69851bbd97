"""Parked events are bounded: they expire, and there are never many more than a limit.

An event whose message is not known yet is stored *parked* (``applied = false``) and
applied when its copy's ``sent`` arrives. Most wait milliseconds; the ones that wait for
long name a copy that never existed (a pixel fetched with a made-up tracking id) or are
address-only webhooks no copy can take (:mod:`aggregator.store.attribution`). So, periodically,
outside the per-batch path:

- events parked longer than ``PARKED_EVENT_TTL_HOURS`` are deleted (expired);
- beyond ``PARKED_EVENT_LIMIT`` parked events, the oldest are deleted (dropped).

They never counted while parked and, deleted, nothing can count them later: not a
``refresh`` (it recounts applied events only), not a ``sent`` arriving afterwards. JetStream
could bring one back only by redelivering it, and it redelivers only what is not
acknowledged: a parked event was acknowledged when it was stored, and one whose
acknowledgement got lost comes back within the consumer's ack wait (60 s), long before the
TTL (at least an hour) is up, or, after a restart, before the expiry clock moves
(:meth:`aggregator.ingest.consumer.EventConsumer.ingested_until`). It then finds itself stored.

"Parked" and "oldest" are ``received_at`` order (when the event was stored; for an
address-only one, when the stream took it), through the partial index
``ix_events_parked_since``. Both deletions name a bound, never a number of rows: "parked
before T", "at or before the first one beyond the limit". Replicas doing the same round at
once therefore delete the same events, never twice as many; rows another transaction holds
(a replica's deletion, a ``sent`` applying them) are skipped (``SKIP LOCKED``). Each chunk
is a short transaction: on SQLite it holds the write lock ingest waits for.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from aggregator import metrics
from aggregator.store.bulk import Bulk
from aggregator.store.db import Database
from aggregator.store.models import PARKED_SINCE_WHERE
from aggregator.store.times import sqlite_time

log = logging.getLogger(__name__)

CHUNK = 2000


def waiting(false: str) -> str:
    """Parked events that wait for a message (not those kept only for the record); the
    predicate starts with the partial index's own, so the planner can use the index."""
    return f"{PARKED_SINCE_WHERE.format(false=false)} AND (tracking_id IS NOT NULL OR recipient IS NOT NULL)"


async def _delete_chunk(db: Database, bound: str, params: dict[str, Any]) -> Counter[str]:
    """Delete up to CHUNK of the oldest waiting events within ``bound``; how many of each type."""
    async with db.writing() as conn:
        sql = await Bulk.of(conn, db.dialect)
        await sql.planning_for_few_rows()
        if not sql.postgres:
            params = {k: sqlite_time(v) if isinstance(v, datetime) else v for k, v in params.items()}
        rows = await sql.run(
            f"DELETE FROM events WHERE id IN (SELECT id FROM {sql.waiting_events} "
            f"WHERE {waiting(sql.false)} AND {bound} ORDER BY received_at, id LIMIT {CHUNK}"
            f"{sql.lock_clause(skip_locked=True)}) RETURNING type",
            params,
        )
    return Counter(kind for (kind,) in rows)


async def _delete_within(db: Database, bound: str, params: dict[str, Any]) -> Counter[str]:
    removed: Counter[str] = Counter()
    while True:
        chunk = await _delete_chunk(db, bound, params)
        removed.update(chunk)
        if chunk.total() < CHUNK:
            return removed


async def expire_parked(db: Database, before: datetime) -> Counter[str]:
    """Delete the events parked before ``before``; how many of each type."""
    return await _delete_within(db, "received_at < :before", {"before": before})


async def drop_over_limit(db: Database, limit: int) -> Counter[str]:
    """Delete the oldest parked events beyond the newest ``limit``; how many of each type.

    The first event beyond the limit is found on the read connection (it walks up to
    ``limit`` entries of the index, like counting them, without holding SQLite's write
    lock); then it and everything older goes.
    """
    async with db.read_engine.connect() as conn:
        sql = await Bulk.of(conn, db.dialect)
        await sql.planning_for_few_rows()
        beyond = await sql.run(
            f"SELECT received_at, id FROM {sql.waiting_events} WHERE {waiting(sql.false)} "
            f"ORDER BY received_at DESC, id DESC LIMIT 1 OFFSET {int(limit)}"
        )
    if not beyond:
        return Counter()
    received_at, last = beyond[0]
    # Events stored in one batch share their received_at: the id orders them. (The first
    # term bounds the walk along the index; the second is the exact cut.)
    return await _delete_within(
        db, "received_at <= :at AND (received_at < :at OR id <= :id)", {"at": received_at, "id": int(last)}
    )


def _by_type(removed: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(removed.items()))


async def bound_parked(db: Database, ttl: timedelta, limit: int, until: datetime | None) -> None:
    """One round: expire what waited longer than ``ttl`` by the ingest clock ``until`` (none
    when it is not known yet), then drop the oldest beyond ``limit``. Counted in metrics and
    logged once per round, never per event."""
    if until is not None:
        expired = await expire_parked(db, until - ttl)
        if expired:
            for kind, n in expired.items():
                metrics.PARKED_EXPIRED.labels(kind).inc(n)
            log.info(
                "expired %d parked events that waited more than %g hours for their message: %s",
                expired.total(),
                ttl.total_seconds() / 3600,
                _by_type(expired),
            )
    dropped = await drop_over_limit(db, limit)
    if dropped:
        for kind, n in dropped.items():
            metrics.PARKED_DROPPED.labels(kind).inc(n)
        log.warning(
            "dropped the %d oldest parked events beyond PARKED_EVENT_LIMIT (%d): %s",
            dropped.total(),
            limit,
            _by_type(dropped),
        )
