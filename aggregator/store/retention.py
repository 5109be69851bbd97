"""Retention: events older than a configured age are pruned while the statistics stay.

An event is old when it both happened and arrived before the cutoff: an event imported with
the time it happened long ago (a provider's history, a generic webhook's stated time) is
kept for the retention period after it arrived, not pruned at the next run.

Pruning moves events out of ``events`` into ``pruned_events`` in counted form, in the
same transaction: per message, type, hour, human or machine, bounce kind, link, a
person's open's client and device, a machine's kind, how many there were and the earliest
exact time among them. That is everything a recount groups by, so ``refresh`` gives the
same numbers before and after. Parked events that never found their message are dropped
(they never counted). Message state (first-seen times, per-link uniques) is kept.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from aggregator.store.bulk import Bulk
from aggregator.store.db import Database
from aggregator.store.keys import hour_of, url_hash
from aggregator.store.readers import reader_of
from aggregator.store.times import as_utc, sqlite_time
from mailbeacon.contract.events import utcnow

log = logging.getLogger(__name__)

PRUNE_CHUNK = 5000
_KEY = "tracking_id, type, hour, machine, bounce_kind, url_hash, client, device, machine_kind"


async def _prune_chunk(db: Database, cutoff: datetime, limit: int) -> tuple[int, int]:
    """Prune up to ``limit`` events; returns (events removed, of which counted before)."""
    async with db.writing() as conn:
        sql = await Bulk.of(conn, db.dialect)
        moment = cutoff if sql.postgres else sqlite_time(cutoff)
        removed = await sql.run(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE occurred_at < :cutoff "
            f"AND received_at < :cutoff ORDER BY occurred_at LIMIT {int(limit)}"
            f"{sql.lock_clause(skip_locked=True)}) "
            "RETURNING type, tracking_id, campaign, recipient, occurred_at, machine, bounce_kind, url, applied, "
            "user_agent, machine_kind",
            {"cutoff": moment},
        )
        counts: dict[tuple[Any, ...], list[Any]] = {}
        tally: dict[tuple[Any, ...], int] = defaultdict(int)
        for (
            kind,
            tid,
            campaign,
            recipient,
            occurred_at,
            machine,
            bounce_kind,
            url,
            applied,
            user_agent,
            machine_kind,
        ) in removed:
            if not applied:
                continue
            digest = url_hash(url) if url else ""
            at = as_utc(occurred_at)
            client, device = reader_of(user_agent) if kind == "opened" and not machine else ("", "")
            key = (
                tid,
                kind,
                hour_of(at),
                bool(machine),
                bounce_kind or "",
                digest,
                client,
                device,
                (machine_kind or "") if machine else "",
            )
            first = counts.get(key)
            if first is None:
                counts[key] = [at, campaign, recipient, url]
            elif at < first[0]:
                first[0] = at
            tally[key] += 1
        if counts:
            v = sql.source(
                [
                    ("tracking_id", "text"),
                    ("type", "text"),
                    ("hour", "ts"),
                    ("machine", "bool"),
                    ("bounce_kind", "text"),
                    ("url_hash", "text"),
                    ("client", "text"),
                    ("device", "text"),
                    ("machine_kind", "text"),
                    ("first_at", "ts"),
                    ("campaign", "text"),
                    ("recipient", "text"),
                    ("url", "text"),
                    ("n", "int"),
                ],
                [(*key, *counts[key], tally[key]) for key in sorted(counts)],
            )
            columns = (
                "tracking_id, type, hour, machine, bounce_kind, url_hash, client, device, machine_kind, "
                "first_at, campaign, recipient, url, n"
            )
            await sql.run(
                f"INSERT INTO pruned_events ({columns}) SELECT {', '.join(v[c.strip()] for c in columns.split(','))} "
                f"FROM {v.sql} WHERE true ON CONFLICT ({_KEY}) DO UPDATE SET n = pruned_events.n + excluded.n, "
                "first_at = CASE WHEN excluded.first_at < pruned_events.first_at THEN excluded.first_at "
                "ELSE pruned_events.first_at END",
                v.params,
            )
    return len(removed), sum(tally.values())


async def prune(db: Database, older_than: timedelta, now: datetime | None = None) -> int:
    """Remove events that occurred and arrived more than ``older_than`` ago; returns how many."""
    cutoff = (now or utcnow()) - older_than
    total = 0
    while True:
        removed, _ = await _prune_chunk(db, cutoff, PRUNE_CHUNK)
        total += removed
        if removed < PRUNE_CHUNK:
            break
    if total:
        log.info("pruned %d events older than %s", total, cutoff.isoformat())
    return total
