"""Applying batches of events to stored state, exactly once, with set-based statements.

One batch is one transaction of a fixed number of statements, whatever its size:

1. ``sent``/``failed`` events create their messages (``INSERT ... ON CONFLICT DO NOTHING
   RETURNING``: only the transaction that really created a message counts it).
2. The other events are resolved to their message: by tracking id, or for an
   address-only webhook the most recent message sent to that address by the time of
   the event, never later than its arrival (else one sent up to five minutes after it;
   else none: see :mod:`aggregator.store.attribution`). On PostgreSQL these messages are locked here,
   in one statement, in tracking-id order. Campaigns whose spec asks for it get the
   event's IP anonymized now that its campaign is known.
3. All events are inserted, and only the ones new to the table count, so a redelivered or
   duplicated event changes nothing. SQLite: ``INSERT ... ON CONFLICT (event_id) DO
   NOTHING``. PostgreSQL: the ids not found stored (looked up before the transaction or
   in it) are copied in with ``COPY`` under a savepoint, all or none; if another
   transaction stored one of them since the lookup, the unique index refuses the copy, it
   is undone, and ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` stores the rest. A
   stored id stays stored, so a lookup can only miss ids, never invent them: its answer
   makes the insert faster, never decides what counts. (Retention deleting an old event
   between the lookup and the copy drops its redelivery as a repeat; it counted once.)
   Events whose message is unknown are stored *parked* (``applied = false``).
4. Parked events waiting for a message created in step 1 are claimed
   (``SELECT ... FOR UPDATE SKIP LOCKED``, then ``UPDATE ... WHERE applied = false``).
5. One conditional UPDATE fills the messages' first-seen columns where still empty (or
   earlier, for out-of-order events) and returns, per message, which ones it filled
   (:class:`aggregator.ingest.effects.Seen`): those are the unique-count transitions.
6. Counters, per-link counts and open buckets are summed per batch and written as atomic
   upserts (``col = col + delta``), each in sorted key order.

Every "does this count?" decision is made by the database inside the writing statement
(or by the unique index refusing it), never by reading first and writing later, so
aggregator replicas sharing the database stay exact. Locks are taken in one global order
(new messages, touched messages, event ids in code-point order, then summed rows, each
sorted) and adoption never waits for a lock, so replicas do
not deadlock; on SQLite ``BEGIN IMMEDIATE`` serializes writers anyway.

An event parked by one replica while another was creating its message is settled by
:func:`adopt_parked`, which every replica runs every few seconds.

The statements live in :mod:`aggregator.ingest.transaction` (events) and :mod:`aggregator.ingest.tally`
(effects and counters); this module orders them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from aggregator.ingest.decode import EventFields
from aggregator.ingest.effects import Applied, Plan, plan
from aggregator.ingest.parked import waiting
from aggregator.ingest.prepare import (
    APPLIED,
    BOUNCE_KIND,
    CAMPAIGN,
    TRACKING_ID,
    UNKNOWN_CAMPAIGN,
    Prepared,
    prepare,
)
from aggregator.ingest.privacy import NOBODY, USER_AGENT, Anonymized, anonymize_row
from aggregator.ingest.tally import BatchResult
from aggregator.ingest.transaction import Target, Transaction
from aggregator.store.attribution import CLOCK_SKEW
from aggregator.store.bulk import Bulk
from aggregator.store.db import Database
from aggregator.store.readers import reader_of
from aggregator.store.times import sqlite_time
from mailbeacon.contract.events import EventType

__all__ = ["BatchResult", "adopt_parked", "apply_batch", "apply_prepared", "count_parked", "look_up_stored"]

_SENT, _FAILED = EventType.SENT, EventType.FAILED


async def apply_batch(
    db: Database, events: Iterable[EventFields], anonymized: Anonymized = NOBODY
) -> BatchResult:
    """Store and apply one batch in one transaction (see the module docstring)."""
    return await apply_prepared(db, prepare(list(events), db.dialect == "postgresql"), anonymized)


async def apply_prepared(db: Database, batch: Prepared, anonymized: Anonymized = NOBODY) -> BatchResult:
    """Store and apply a batch :func:`aggregator.ingest.prepare.prepare` made ready, in one transaction.

    ``anonymized``: the campaigns whose events keep only an anonymized IP.
    """
    async with db.writing() as conn:
        tx = Transaction(await Bulk.of(conn, db.dialect), batch.received_at, anonymized)
        await tx.sql.planning_for_few_rows()
        tx.result.duplicates += batch.repeats
        created = await tx.create_messages(batch)
        creators = {batch.creators[tid].event_id for tid in created}
        by_id, by_address = await tx.resolve(batch.tracking_ids, batch.addresses)
        rows = batch.rows
        applied: dict[str, Applied] = {}
        waiting: list[str] = []  # events naming a message not stored (yet): parked
        for e, row, reader in zip(batch.events, rows, batch.readers, strict=True):
            kind = e.type
            target: Target | None = None
            if kind is _SENT or kind is _FAILED:
                # Only the event that created its message counts; a second sent/failed for the
                # same copy is kept for the record.
                if e.event_id in creators:
                    row[CAMPAIGN] = e.campaign or UNKNOWN_CAMPAIGN
                    row[APPLIED] = True
            else:
                tid = e.tracking_id
                if tid:
                    target = by_id.get(tid)
                elif e.recipient:
                    target = by_address.get(batch.address_of[e.event_id])
                # else: names no message at all: kept for the record, never applied
                if target is not None:
                    row[TRACKING_ID] = target.tracking_id
                    row[CAMPAIGN] = target.campaign
                    row[APPLIED] = True
                elif tid or e.recipient:
                    waiting.append(e.event_id)
            # A parked event's campaign is not known yet: claim_parked anonymizes it when applied.
            if anonymized and row[CAMPAIGN] in anonymized:
                anonymize_row(row)
                if reader is not None:
                    reader = reader_of(row[USER_AGENT])  # the user agent as stored, which a recount reads
            if target is not None:
                applied[e.event_id] = Applied(
                    kind,
                    target.tracking_id,
                    target.campaign,
                    e.occurred_at,
                    e.machine,
                    row[BOUNCE_KIND],
                    e.url,
                    e.machine_kind,
                    reader,
                )
        # The effects of the events not known to be stored are planned while the database
        # works on the insert (SQLite, or a lookup inside the transaction); an event the
        # insert finds stored after all means planning again.
        known = batch.stored or set()
        expected = [a for event_id, a in applied.items() if event_id not in known]
        plans: list[Plan] = []
        new = await tx.insert_events(
            rows, meanwhile=lambda: plans.append(plan(expected)), stored=batch.stored
        )
        planned = plans[0]
        tx.result.duplicates += len(rows) - len(new)
        tx.result.parked += sum(1 for event_id in waiting if event_id in new)
        effects = [a for event_id, a in applied.items() if event_id in new]
        if len(effects) != len(expected):  # effects are among the expected ones: the same iff as many
            planned = plan(effects)
        if created:
            where, params = tx.sql.one_of("tracking_id", sorted(created))
            branches = [("events", where, params)]
            addresses = sorted({r for _, r in tx.new_recipients})
            if addresses:
                # Only events that arrived at most CLOCK_SKEW before the earliest of these
                # copies can be theirs: an address flooded with older ones costs nothing here.
                where, params = tx.sql.one_of("recipient", addresses)
                since = min(batch.creators[tid].occurred_at for tid in created) - CLOCK_SKEW
                params["since"] = since if tx.sql.postgres else sqlite_time(since)
                branches.append(
                    (
                        tx.sql.parked_events,
                        f"{where} AND tracking_id IS NULL AND received_at >= :since",
                        params,
                    )
                )
            adopted = await tx.claim_parked(branches)
            effects += adopted
            plan(adopted, into=planned)
        await tx.apply(effects, planned)
        await tx.flush()
    return tx.result


async def look_up_stored(db: Database, batch: Prepared) -> None:
    """PostgreSQL: find which of the batch's events are stored already, on a connection of
    its own, so that the lookup can run while the previous batch's transaction does.

    An id stored after this lookup makes the transaction's copy fail and fall back to an
    insert that skips stored ids, so a late answer costs time, never exactness.
    """
    if db.dialect != "postgresql" or not batch.rows:
        return
    async with db.read_engine.connect() as conn:
        sql = await Bulk.of(conn, db.dialect)
        where, params = sql.one_of("event_id", [row[0] for row in batch.rows])
        batch.stored = {row[0] for row in await sql.run(f"SELECT event_id FROM events WHERE {where}", params)}


async def adopt_parked(
    db: Database, limit: int = 2000, anonymized: Anonymized = NOBODY, since: datetime | None = None
) -> BatchResult:
    """Apply parked events whose message has meanwhile been stored (by any replica).

    ``since``: only those parked (``received_at``) since then, found through the index by
    age instead of looking at every parked event (there may be a million: a flood of pixels
    for made-up copies).
    """
    async with db.writing() as conn:
        tx = Transaction(await Bulk.of(conn, db.dialect), anonymized=anonymized)
        await tx.sql.planning_for_few_rows()
        # An address-only event only when a copy relayed early enough exists: those relayed
        # later never take it, and must not fill every round's ``limit`` (aggregator.store.attribution).
        bound = tx.sql.latest_relay("events.occurred_at", "events.received_at")
        table = tx.sql.parked_events
        where = (
            "(EXISTS (SELECT 1 FROM messages m WHERE m.tracking_id = events.tracking_id) OR "
            "(events.tracking_id IS NULL AND EXISTS (SELECT 1 FROM messages m "
            f"WHERE m.recipient = events.recipient AND m.status = 'sent' AND m.sent_at <= {bound})))"
        )
        params: dict[str, Any] = {}
        if since is not None:
            table, where = tx.sql.waiting_events, f"{where} AND received_at >= :since"
            params["since"] = since if tx.sql.postgres else sqlite_time(since)
        effects = await tx.claim_parked([(table, where, params)], limit=limit)
        if effects:
            await tx.apply(effects)
            await tx.flush()
    return tx.result


async def count_parked(db: Database) -> int:
    """Events waiting for their message (not the ones that can never be applied).

    Read through the partial index of parked events: the planner, misled by statistics
    taken while events were still parked, would otherwise scan the whole table every time
    (measured: 73 ms at 300,000 events, growing with the table, every two seconds).
    """
    async with db.read_engine.begin() as conn:
        sql = await Bulk.of(conn, db.dialect)
        await sql.planning_for_few_rows()
        rows = await sql.run(f"SELECT count(*) FROM {sql.waiting_events} WHERE {waiting(sql.false)}")
    return int(rows[0][0])
