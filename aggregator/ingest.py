"""Applying batches of events to stored state, exactly once, with set-based statements.

One batch is one transaction of a fixed number of statements, whatever its size:

1. ``sent``/``failed`` events create their messages (``INSERT ... ON CONFLICT DO NOTHING
   RETURNING``: only the transaction that really created a message counts it).
2. The other events are resolved to their message: by tracking id, or for an
   address-only webhook the most recent message sent to that address. On PostgreSQL
   these messages are locked here, in one statement, in tracking-id order.
3. All events are inserted (``ON CONFLICT (event_id) DO NOTHING RETURNING``): only the
   ones returned are new, so a redelivered or duplicated event changes nothing. Events
   whose message is unknown are stored *parked* (``applied = false``).
4. Parked events waiting for a message created in step 1 are claimed
   (``SELECT ... FOR UPDATE SKIP LOCKED``, then ``UPDATE ... WHERE applied = false``).
5. One conditional UPDATE fills the messages' first-seen columns where still empty (or
   earlier, for out-of-order events) and returns, per message, which ones it filled
   (:class:`aggregator.effects.Seen`): those are the unique-count transitions.
6. Counters, per-link counts and open buckets are summed per batch and written as atomic
   upserts (``col = col + delta``), each in sorted key order.

Every "does this count?" decision is made by the database inside the writing statement,
never by reading first and writing later, so aggregator replicas sharing the database
stay exact. Locks are taken in one global order (new messages, touched messages, event
ids, then summed rows, each sorted) and adoption never waits for a lock, so replicas do
not deadlock; on SQLite ``BEGIN IMMEDIATE`` serializes writers anyway.

An event parked by one replica while another was creating its message is settled by
:func:`adopt_parked`, which every replica runs every few seconds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from aggregator.bulk import Bulk, Column
from aggregator.db import Database
from aggregator.decode import EventFields
from aggregator.effects import (
    CHANGE_COLUMNS,
    FIRST_SEEN,
    Applied,
    Plan,
    Seen,
    count_transitions,
    message_changes,
    plan,
)
from aggregator.models import (
    COUNTER_COLUMNS,
    CampaignRecipient,
    CampaignRow,
    CampaignStats,
    EventRow,
    LinkStats,
    MessageLink,
    MessageRow,
    OpenBucket,
    PrunedEvent,
)
from aggregator.prepare import (
    APPLIED,
    BOUNCE_KIND,
    CAMPAIGN,
    TRACKING_ID,
    UNKNOWN_CAMPAIGN,
    Prepared,
    prepare,
)
from aggregator.times import as_utc, sqlite_time
from mailbeacon.events import EventType, utcnow

EVENTS = EventRow.__table__  # type: ignore[attr-defined]
MESSAGES = MessageRow.__table__  # type: ignore[attr-defined]
STATS = CampaignStats.__table__  # type: ignore[attr-defined]
CAMPAIGNS = CampaignRow.__table__  # type: ignore[attr-defined]
RECIPIENTS = CampaignRecipient.__table__  # type: ignore[attr-defined]
LINKS = LinkStats.__table__  # type: ignore[attr-defined]
MESSAGE_LINKS = MessageLink.__table__  # type: ignore[attr-defined]
BUCKETS = OpenBucket.__table__  # type: ignore[attr-defined]
PRUNED = PrunedEvent.__table__  # type: ignore[attr-defined]

_SENT, _FAILED = EventType.SENT, EventType.FAILED

_EVENT_COLUMNS: list[Column] = [
    ("event_id", "text"),
    ("type", "text"),
    ("tracking_id", "text"),
    ("campaign", "text"),
    ("recipient", "text"),
    ("occurred_at", "ts"),
    ("received_at", "ts"),
    ("ip", "text"),
    ("user_agent", "text"),
    ("url", "text"),
    ("bounce_kind", "text"),
    ("reason", "text"),
    ("machine", "bool"),
    ("machine_kind", "text"),
    ("source", "text"),
    ("metadata", "json"),
    ("applied", "bool"),
]


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    parked: int = 0
    by_type: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))


class Target(NamedTuple):
    tracking_id: str
    campaign: str


class _Parked(NamedTuple):
    id: int
    type: str
    tracking_id: str | None
    recipient: str | None
    occurred_at: Any
    machine: Any
    bounce_kind: str | None
    url: str | None


class _Transaction:
    """The statements of one ingest transaction, in the order the module docstring gives."""

    def __init__(self, bulk: Bulk, now: datetime | None = None) -> None:
        self.sql = bulk
        self.now = now or utcnow()
        self.result = BatchResult()
        self.new_campaigns: set[str] = set()
        self.new_recipients: set[tuple[str, str]] = set()
        self.counters: dict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.plan = Plan()
        self.unique_link_clicks: list[tuple[str, str]] = []
        self.targets: dict[str, Target] = {}  # messages resolved (and on PostgreSQL locked) so far

    # -- messages ---------------------------------------------------------------------------

    async def create_messages(self, batch: Prepared) -> set[str]:
        """Messages of ``sent``/``failed`` events; returns the tracking ids of those created here."""
        if not batch.message_rows:
            return set()
        v = self.sql.source(
            [
                ("tracking_id", "text"),
                ("campaign", "text"),
                ("recipient", "text"),
                ("message_id", "text"),
                ("status", "text"),
                ("sent_at", "ts"),
            ],
            batch.message_rows,
            ready=True,
        )
        created = await self.sql.run(
            "INSERT INTO messages (tracking_id, campaign, recipient, message_id, status, sent_at, "
            f"open_count, click_count) SELECT {v['tracking_id']}, {v['campaign']}, {v['recipient']}, "
            f"{v['message_id']}, {v['status']}, {v['sent_at']}, 0, 0 FROM {v.sql} WHERE true "
            "ON CONFLICT (tracking_id) DO NOTHING RETURNING tracking_id",
            v.params,
        )
        made = set()
        for (tid,) in created:
            e = batch.creators[tid]
            campaign = e.campaign or UNKNOWN_CAMPAIGN
            self.new_campaigns.add(campaign)
            self.counters[campaign]["sent_count" if e.type is EventType.SENT else "failed_count"] += 1
            self.result.by_type[(campaign, e.type.value)] += 1
            self.result.applied += 1
            if e.recipient:
                self.new_recipients.add((campaign, e.recipient))
            made.add(tid)
        return made

    async def resolve(
        self, tracking_ids: Iterable[str], recipients: Iterable[str], *, wait: bool = True
    ) -> tuple[dict[str, Target], dict[str, Target]]:
        """Messages by tracking id, and each address's most recent message, locked for this batch.

        On PostgreSQL every message the batch will update is locked here, in one statement
        in tracking-id order, so concurrent batches never deadlock on each other. With
        ``wait=False`` (adoption) messages another transaction holds are left out instead.
        """
        latest: dict[str, str] = {}
        addresses = sorted(set(recipients))
        if addresses:
            where, params = self.sql.one_of("recipient", addresses)
            rows = await self.sql.run(
                "SELECT recipient, tracking_id FROM (SELECT recipient, tracking_id, row_number() OVER "
                "(PARTITION BY recipient ORDER BY sent_at DESC, tracking_id DESC) AS pick "
                f"FROM messages WHERE {where}) AS latest WHERE pick = 1",
                params,
            )
            latest = {address: tid for address, tid in rows}
        ids = set(tracking_ids)
        fresh = sorted((ids | set(latest.values())) - self.targets.keys())
        if fresh:
            where, params = self.sql.one_of("tracking_id", fresh)
            for tid, campaign in await self.sql.run(
                f"SELECT tracking_id, campaign FROM messages WHERE {where} ORDER BY tracking_id"
                + self.sql.lock_clause(skip_locked=not wait),
                params,
            ):
                self.targets[tid] = Target(tid, campaign)
        by_id = {tid: self.targets[tid] for tid in ids if tid in self.targets}
        by_address = {a: self.targets[tid] for a, tid in latest.items() if tid in self.targets}
        return by_id, by_address

    # -- events -----------------------------------------------------------------------------

    async def insert_events(self, rows: list[list[Any]]) -> set[str]:
        """Store events (driver-ready rows); returns the ids that were new (the others were stored before)."""
        if not rows:
            return set()
        names = [name for name, _ in _EVENT_COLUMNS]
        if not self.sql.postgres:
            return await self._insert_events_sqlite(names, rows)
        v = await self.sql.staged("events_batch", _EVENT_COLUMNS, rows, ready=True)
        picks = ", ".join(self.sql.json_value(v[n]) if n == "metadata" else v[n] for n in names)
        inserted = await self.sql.run(
            f"INSERT INTO events ({', '.join(names)}) SELECT {picks} FROM {v.sql} ORDER BY {v['event_id']} "
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            v.params,
        )
        return {row[0] for row in inserted}

    async def _insert_events_sqlite(self, names: list[str], rows: list[list[Any]]) -> set[str]:
        """SQLite's fastest path: ``executemany``, then the rows past the previous highest id.

        This transaction holds SQLite's write lock (BEGIN IMMEDIATE), so the ids above the
        highest one seen at the start are exactly the events this statement inserted.
        """
        before = await self.sql.run("SELECT coalesce(max(id), 0) FROM events")
        await self.sql.executemany(
            f"INSERT INTO events ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            "ON CONFLICT (event_id) DO NOTHING",
            rows,
        )
        inserted = await self.sql.run(
            "SELECT event_id FROM events WHERE id > :before", {"before": before[0][0]}
        )
        return {row[0] for row in inserted}

    async def claim_parked(
        self, branches: list[tuple[str, str, dict[str, Any]]], limit: int | None = None
    ) -> list[Applied]:
        """Apply parked events matching any of ``branches`` whose message is known by now.

        A branch is ``(table, condition, parameters)``: ``table`` is ``events`` or
        :attr:`Bulk.parked_events` when the condition is best served by the parked index.

        Rows another transaction is claiming are skipped (PostgreSQL ``SKIP LOCKED``), and
        the claim itself is conditional on ``applied`` still being false.
        """
        sql = self.sql
        rows: list[Any] = []
        for table, where, params in branches:
            # Each branch on its own (an OR would not use the right index on SQLite).
            rows += await sql.run(
                "SELECT id, type, tracking_id, recipient, occurred_at, machine, bounce_kind, url "
                f"FROM {table} WHERE applied = {sql.false} AND type NOT IN ('sent', 'failed') "
                f"AND {where}"
                + (f" LIMIT {int(limit)}" if limit else "")
                + sql.lock_clause(skip_locked=True),
                params,
            )
        if not rows:
            return []
        parked = [_Parked(*row) for row in rows]
        by_id, by_address = await self.resolve(
            (r.tracking_id for r in parked if r.tracking_id),
            (r.recipient for r in parked if not r.tracking_id and r.recipient),
            wait=False,
        )
        chosen: list[tuple[_Parked, Target]] = []
        for r in parked:
            target = by_id.get(r.tracking_id) if r.tracking_id else by_address.get(r.recipient or "")
            if target is not None:
                chosen.append((r, target))
        if not chosen:
            return []
        v = sql.source(
            [("id", "int"), ("tracking_id", "text"), ("campaign", "text")],
            [(r.id, t.tracking_id, t.campaign) for r, t in chosen],
        )
        claimed = {
            row[0]
            for row in await sql.run(
                f"UPDATE events SET applied = {sql.true}, tracking_id = {v['tracking_id']}, "
                f"campaign = {v['campaign']} FROM {v.sql} "
                f"WHERE events.id = {v['id']} AND events.applied = {sql.false} RETURNING events.id",
                v.params,
            )
        }
        return [
            Applied(
                type=EventType(r.type),
                tracking_id=t.tracking_id,
                campaign=t.campaign,
                occurred_at=as_utc(r.occurred_at),
                machine=bool(r.machine),
                bounce_kind=r.bounce_kind,
                url=r.url,
            )
            for r, t in chosen
            if r.id in claimed
        ]

    # -- effects ----------------------------------------------------------------------------

    async def apply(self, applied: list[Applied]) -> None:
        """Write what the applied events do to their messages and collect the counter deltas."""
        p = self.plan = plan(applied)
        for key, n in p.by_type.items():
            self.result.by_type[key] += n
        self.result.applied += len(applied)
        if p.campaign_of:
            count_transitions(p, await self._update_messages(p))
        await self._message_links(p)
        for campaign, deltas in p.counters.items():
            for name, n in deltas.items():
                self.counters[campaign][name] += n

    async def _update_messages(self, p: Plan) -> list[tuple[str, int]]:
        """One conditional UPDATE for every touched message.

        First-seen columns keep the earliest time (out-of-order events move them back);
        ``newly_seen`` is computed from the row as it was before this statement, so the
        returned masks say exactly which columns were empty until now.
        """
        v = await self.sql.staged(
            "message_changes",
            [
                ("tracking_id", "text"),
                *((c, "ts") for c in FIRST_SEEN),
                ("bounced_at", "ts"),
                ("bounce_kind", "text"),
                ("opens", "int"),
                ("clicks", "int"),
            ],
            message_changes(p, None if self.sql.postgres else sqlite_time),
            ready=True,
        )
        assert len(CHANGE_COLUMNS) == len(FIRST_SEEN) + 4
        m = "messages."  # the row before the update; the source has the same column names
        earliest = [
            f"{c} = CASE WHEN {v[c]} IS NOT NULL AND ({m}{c} IS NULL OR {m}{c} > {v[c]}) THEN {v[c]} "
            f"ELSE {m}{c} END"
            for c in (*FIRST_SEEN, "bounced_at")
        ]
        bits = [
            f"CASE WHEN {m}{c} IS NULL AND {v[c]} IS NOT NULL THEN {int(bit)} ELSE 0 END"
            for c, (bit, _) in FIRST_SEEN.items()
        ]
        bits.append(
            f"CASE WHEN {m}bounced_at IS NULL AND {v['bounced_at']} IS NOT NULL THEN {int(Seen.BOUNCED)} ELSE 0 END"
        )
        kind = v["bounce_kind"]
        bits.append(
            f"CASE WHEN {kind} = 'hard' AND ({m}bounce_kind IS NULL OR {m}bounce_kind <> 'hard') "
            f"THEN {int(Seen.HARD_BOUNCE)} ELSE 0 END"
        )
        rows = await self.sql.run(
            f"UPDATE messages SET {', '.join(earliest)}, "
            f"bounce_kind = CASE WHEN {kind} = 'hard' OR {m}bounce_kind IS NULL "
            f"THEN coalesce({kind}, {m}bounce_kind) ELSE {m}bounce_kind END, "
            f"open_count = {m}open_count + {v['opens']}, click_count = {m}click_count + {v['clicks']}, "
            f"newly_seen = {' + '.join(bits)} "
            f"FROM {v.sql} WHERE messages.tracking_id = {v['tracking_id']} "
            "RETURNING messages.tracking_id, messages.newly_seen",
            v.params,
        )
        return [(tid, int(mask)) for tid, mask in rows if mask]

    async def _message_links(self, p: Plan) -> None:
        """Per-link unique clicks: a (message, link) pair counts the first time it is stored."""
        if not p.message_links:
            return
        v = self.sql.source([("tracking_id", "text"), ("url_hash", "text")], sorted(p.message_links))
        self.unique_link_clicks = [
            (p.campaign_of[tid], digest)
            for tid, digest in await self.sql.run(
                f"INSERT INTO message_links (tracking_id, url_hash) SELECT {v['tracking_id']}, {v['url_hash']} "
                f"FROM {v.sql} WHERE true ON CONFLICT DO NOTHING RETURNING tracking_id, url_hash",
                v.params,
            )
        ]

    # -- summed writes ----------------------------------------------------------------------

    async def flush(self) -> None:
        """Campaign rows, recipients, then counters, links and buckets, each in sorted order."""
        sql = self.sql
        if self.new_campaigns:
            v = sql.source(
                [("key", "text"), ("namespace", "text"), ("name", "text"), ("at", "ts")],
                [(key, *key.split("/", 1), self.now) for key in sorted(self.new_campaigns)],
            )
            await sql.run(
                f"INSERT INTO campaigns (key, namespace, name, first_seen_at) SELECT {v['key']}, "
                f"{v['namespace']}, {v['name']}, {v['at']} FROM {v.sql} WHERE true ON CONFLICT DO NOTHING",
                v.params,
            )
        if self.new_recipients:
            v = sql.source([("campaign", "text"), ("recipient", "text")], sorted(self.new_recipients))
            for (campaign,) in await sql.run(
                f"INSERT INTO campaign_recipients (campaign, recipient) SELECT {v['campaign']}, "
                f"{v['recipient']} FROM {v.sql} WHERE true ON CONFLICT DO NOTHING RETURNING campaign",
                v.params,
            ):
                self.counters[campaign]["total_recipients"] += 1
        await self._upsert_counters()
        await self._upsert_links()
        await self._upsert_buckets()

    async def _upsert_counters(self) -> None:
        rows = [
            (campaign, *(deltas.get(name, 0) for name in COUNTER_COLUMNS), self.now)
            for campaign, deltas in sorted(self.counters.items())
            if any(deltas.values())
        ]
        if not rows:
            return
        columns: list[Column] = [("campaign", "text"), *((n, "int") for n in COUNTER_COLUMNS), ("at", "ts")]
        v = self.sql.source(columns, rows)
        sums = ", ".join(f"{n} = campaign_stats.{n} + excluded.{n}" for n in COUNTER_COLUMNS)
        await self.sql.run(
            f"INSERT INTO campaign_stats (campaign, {', '.join(COUNTER_COLUMNS)}, updated_at) "
            f"SELECT {v['campaign']}, {', '.join(v[n] for n in COUNTER_COLUMNS)}, {v['at']} FROM {v.sql} "
            f"WHERE true ON CONFLICT (campaign) DO UPDATE SET {sums}, updated_at = excluded.updated_at",
            v.params,
        )

    async def _upsert_links(self) -> None:
        p = self.plan
        totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for key, n in p.link_clicks.items():
            totals[key][0] += n
        for key in self.unique_link_clicks:
            totals[key][1] += 1
        if not totals:
            return
        v = self.sql.source(
            [("campaign", "text"), ("url_hash", "text"), ("url", "text"), ("total", "int"), ("uniq", "int")],
            [(c, h, p.link_urls[h], t, u) for (c, h), (t, u) in sorted(totals.items())],
        )
        await self.sql.run(
            "INSERT INTO link_stats (campaign, url_hash, url, total_clicks, unique_clicks) "
            f"SELECT {v['campaign']}, {v['url_hash']}, {v['url']}, {v['total']}, {v['uniq']} FROM {v.sql} "
            "WHERE true ON CONFLICT (campaign, url_hash) DO UPDATE SET "
            "total_clicks = link_stats.total_clicks + excluded.total_clicks, "
            "unique_clicks = link_stats.unique_clicks + excluded.unique_clicks",
            v.params,
        )

    async def _upsert_buckets(self) -> None:
        if not self.plan.buckets:
            return
        v = self.sql.source(
            [("campaign", "text"), ("hour", "ts"), ("opens", "int"), ("human", "int")],
            [(c, h, o, m) for (c, h), (o, m) in sorted(self.plan.buckets.items())],
        )
        await self.sql.run(
            "INSERT INTO open_buckets (campaign, hour, opens, human_opens) "
            f"SELECT {v['campaign']}, {v['hour']}, {v['opens']}, {v['human']} FROM {v.sql} WHERE true "
            "ON CONFLICT (campaign, hour) DO UPDATE SET opens = open_buckets.opens + excluded.opens, "
            "human_opens = open_buckets.human_opens + excluded.human_opens",
            v.params,
        )


async def apply_batch(db: Database, events: Iterable[EventFields]) -> BatchResult:
    """Store and apply one batch in one transaction (see the module docstring)."""
    return await apply_prepared(db, prepare(list(events), db.dialect == "postgresql"))


async def apply_prepared(db: Database, batch: Prepared) -> BatchResult:
    """Store and apply a batch :func:`aggregator.prepare.prepare` made ready, in one transaction."""
    async with db.writing() as conn:
        tx = _Transaction(await Bulk.of(conn, db.dialect), batch.received_at)
        await tx.sql.planning_for_few_rows()
        tx.result.duplicates += batch.repeats
        created = await tx.create_messages(batch)
        creators = {batch.creators[tid].event_id for tid in created}
        by_id, by_address = await tx.resolve(batch.tracking_ids, batch.addresses)
        rows = batch.rows
        applied: dict[str, Applied] = {}
        waiting: list[str] = []  # events naming a message not stored (yet): parked
        for e, row in zip(batch.events, rows, strict=True):
            kind = e.type
            if kind is _SENT or kind is _FAILED:
                # Only the event that created its message counts; a second sent/failed for the
                # same copy is kept for the record.
                if e.event_id in creators:
                    row[CAMPAIGN] = e.campaign or UNKNOWN_CAMPAIGN
                    row[APPLIED] = True
                continue
            tid = e.tracking_id
            if tid:
                target = by_id.get(tid)
            elif e.recipient:
                target = by_address.get(e.recipient)
            else:
                continue  # names no message at all: kept for the record, never applied
            if target is None:
                waiting.append(e.event_id)
                continue
            row[TRACKING_ID] = target.tracking_id
            row[CAMPAIGN] = target.campaign
            row[APPLIED] = True
            applied[e.event_id] = Applied(
                kind, target.tracking_id, target.campaign, e.occurred_at, e.machine, row[BOUNCE_KIND], e.url
            )
        new = await tx.insert_events(rows)
        tx.result.duplicates += len(rows) - len(new)
        tx.result.parked += sum(1 for event_id in waiting if event_id in new)
        effects = [a for event_id, a in applied.items() if event_id in new]
        if created:
            where, params = tx.sql.one_of("tracking_id", sorted(created))
            branches = [("events", where, params)]
            addresses = sorted({r for _, r in tx.new_recipients})
            if addresses:
                where, params = tx.sql.one_of("recipient", addresses)
                branches.append((tx.sql.parked_events, f"{where} AND tracking_id IS NULL", params))
            effects += await tx.claim_parked(branches)
        await tx.apply(effects)
        await tx.flush()
    return tx.result


async def adopt_parked(db: Database, limit: int = 2000) -> BatchResult:
    """Apply parked events whose message has meanwhile been stored (by any replica)."""
    async with db.writing() as conn:
        tx = _Transaction(await Bulk.of(conn, db.dialect))
        await tx.sql.planning_for_few_rows()
        effects = await tx.claim_parked(
            [
                (
                    tx.sql.parked_events,
                    "(EXISTS (SELECT 1 FROM messages m WHERE m.tracking_id = events.tracking_id) OR "
                    "(events.tracking_id IS NULL "
                    "AND EXISTS (SELECT 1 FROM messages m WHERE m.recipient = events.recipient)))",
                    {},
                )
            ],
            limit=limit,
        )
        if effects:
            await tx.apply(effects)
            await tx.flush()
    return tx.result


async def count_parked(db: Database) -> int:
    """Events waiting for their message (not the ones that can never be applied)."""
    async with db.read_engine.connect() as conn:
        sql = await Bulk.of(conn, db.dialect)
        rows = await sql.run(
            f"SELECT count(*) FROM {sql.parked_events} WHERE applied = {sql.false} "
            "AND type NOT IN ('sent', 'failed') AND (tracking_id IS NOT NULL OR recipient IS NOT NULL)"
        )
    return int(rows[0][0])
