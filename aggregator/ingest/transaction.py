"""The event half of an ingest transaction: messages created, messages resolved (and
locked), events stored, parked events claimed. See :mod:`aggregator.ingest.ingest` for the order
of the statements and why it makes replicas exact and deadlock-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, NamedTuple

from aggregator.ingest.effects import Applied
from aggregator.ingest.prepare import UNKNOWN_CAMPAIGN, Prepared
from aggregator.ingest.privacy import NOBODY, Anonymized, anonymized_details
from aggregator.ingest.tally import Tally
from aggregator.store.attribution import event_time, latest_relay
from aggregator.store.bulk import Bulk, Column, overlapped
from aggregator.store.domains import rows_of
from aggregator.store.readers import reader_of
from aggregator.store.times import as_utc
from mailbeacon.contract.events import EventType

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


def _nothing() -> None:
    pass


class Target(NamedTuple):
    tracking_id: str
    campaign: str


class _Parked(NamedTuple):
    id: int
    type: str
    tracking_id: str | None
    recipient: str | None
    occurred_at: datetime
    received_at: datetime
    machine: Any
    bounce_kind: str | None
    url: str | None
    ip: str | None
    user_agent: str | None
    reason: str | None
    metadata: Any
    machine_kind: str | None


class Transaction(Tally):
    """The statements of one ingest transaction, in the order :mod:`aggregator.ingest.ingest` gives."""

    def __init__(self, bulk: Bulk, now: datetime | None = None, anonymized: Anonymized = NOBODY) -> None:
        super().__init__(bulk, now)
        self.anonymized = anonymized
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
                ("domain", "text"),
            ],
            batch.message_rows,
            ready=True,
        )
        created = await self.sql.run(
            "INSERT INTO messages (tracking_id, campaign, recipient, message_id, status, sent_at, domain, "
            f"open_count, click_count) SELECT {v['tracking_id']}, {v['campaign']}, {v['recipient']}, "
            f"{v['message_id']}, {v['status']}, {v['sent_at']}, {v['domain']}, 0, 0 FROM {v.sql} WHERE true "
            "ON CONFLICT (tracking_id) DO NOTHING RETURNING tracking_id",
            v.params,
        )
        made = set()
        for (tid,) in created:
            e = batch.creators[tid]
            campaign = e.campaign or UNKNOWN_CAMPAIGN
            self.new_campaigns.add(campaign)
            if e.type is EventType.SENT:
                self.counters[campaign]["sent_count"] += 1
                for row in rows_of(batch.domains[tid]):
                    self.domains[(campaign, row)][0] += 1  # DOMAIN_COUNTERS[0]: sent
            else:
                self.counters[campaign]["failed_count"] += 1
            self.result.by_type[(campaign, e.type.value)] += 1
            self.result.applied += 1
            if e.recipient:
                self.new_recipients.add((campaign, e.recipient))
            made.add(tid)
        return made

    async def resolve(
        self, tracking_ids: Iterable[str], addressed: Iterable[tuple[str, datetime]], *, wait: bool = True
    ) -> tuple[dict[str, Target], dict[tuple[str, datetime], Target]]:
        """Messages by tracking id, and for each ``(address, time)`` of an address-only
        event (its time as :func:`aggregator.store.attribution.event_time` gives it) its message,
        locked for this batch.

        An address-only event (a provider's webhook naming just the recipient) belongs to
        the most recent message relayed to that address (never a copy the upstream refused
        or the proxy withheld: no provider reports on those) no later than the event's time;
        when there is none (clocks disagree a little), to the most recent one relayed up to
        :data:`aggregator.store.attribution.CLOCK_SKEW` after it; else to none (it waits, parked).
        Both lookups read ``ix_messages_recipient_sent`` backwards from a bound.

        On PostgreSQL every message the batch will update is locked here, in one statement
        in tracking-id order, so concurrent batches never deadlock on each other. With
        ``wait=False`` (adoption) messages another transaction holds are left out instead.
        """
        chosen: dict[tuple[str, datetime], str] = {}
        pairs = sorted(set(addressed))
        if pairs:
            v = self.sql.source(
                [("i", "int"), ("recipient", "text"), ("at", "ts"), ("bound", "ts")],
                [(i, address, at, latest_relay(at)) for i, (address, at) in enumerate(pairs)],
            )
            latest = "ORDER BY m.sent_at DESC, m.tracking_id DESC LIMIT 1"
            rows = await self.sql.run(
                f"SELECT {v['i']}, coalesce("
                f"(SELECT m.tracking_id FROM messages m WHERE m.recipient = {v['recipient']} "
                f"AND m.status = 'sent' AND m.sent_at <= {v['at']} {latest}), "
                f"(SELECT m.tracking_id FROM messages m WHERE m.recipient = {v['recipient']} "
                f"AND m.status = 'sent' AND m.sent_at <= {v['bound']} {latest})) "
                f"FROM {v.sql}",
                v.params,
            )
            chosen = {pairs[int(i)]: tid for i, tid in rows if tid is not None}
        ids = set(tracking_ids)
        fresh = sorted((ids | set(chosen.values())) - self.targets.keys())
        if fresh:
            where, params = self.sql.one_of("tracking_id", fresh)
            for tid, campaign in await self.sql.run(
                f"SELECT tracking_id, campaign FROM messages WHERE {where} ORDER BY tracking_id"
                + self.sql.lock_clause(skip_locked=not wait),
                params,
            ):
                self.targets[tid] = Target(tid, campaign)
        by_id = {tid: self.targets[tid] for tid in ids if tid in self.targets}
        by_address = {pair: self.targets[tid] for pair, tid in chosen.items() if tid in self.targets}
        return by_id, by_address

    # -- events -----------------------------------------------------------------------------

    async def insert_events(
        self,
        rows: list[list[Any]],
        meanwhile: Callable[[], object] = _nothing,
        stored: set[str] | None = None,
    ) -> set[str]:
        """Store events (driver-ready rows); returns the ids that were new (the others were stored before).

        ``meanwhile`` (plain Python) runs once, while the database works on the insert where
        it can (SQLite's, or PostgreSQL's lookup when ``stored`` is None), else before it.
        ``stored``: the ids among them found stored by :func:`aggregator.ingest.ingest.look_up_stored`,
        if it ran.
        """
        if not rows:
            meanwhile()
            return set()
        names = [name for name, _ in _EVENT_COLUMNS]
        if not self.sql.postgres:
            return await self._insert_events_sqlite(names, rows, meanwhile)
        # The ids stored before are looked up, the others copied straight into the table: a
        # binary COPY costs a third less than an INSERT ... ON CONFLICT from a staged copy.
        if stored is None:
            where, params = self.sql.one_of("event_id", [row[0] for row in rows])
            found = await overlapped(
                self.sql.run(f"SELECT event_id FROM events WHERE {where}", params), meanwhile
            )
            known = {row[0] for row in found}
        else:
            meanwhile()
            known = stored
        fresh = [row for row in rows if row[0] not in known] if known else rows
        if not fresh or await self.sql.copy_unless_taken("events", names, fresh):
            return {row[0] for row in fresh}
        # Another transaction (this process's previous batch, or a replica given the same
        # event again) stored one of these ids since the lookup: the copy was undone, and the insert skips whatever is stored.
        v = await self.sql.staged("events_batch", _EVENT_COLUMNS, fresh, ready=True)
        picks = ", ".join(self.sql.json_value(v[n]) if n == "metadata" else v[n] for n in names)
        inserted = await self.sql.run(
            f"INSERT INTO events ({', '.join(names)}) SELECT {picks} FROM {v.sql} "
            # The order the copy takes them in (code points), whatever the database's collation.
            f'ORDER BY {v["event_id"]} COLLATE "C" '
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            v.params,
        )
        return {row[0] for row in inserted}

    async def _insert_events_sqlite(
        self, names: list[str], rows: list[list[Any]], meanwhile: Callable[[], object]
    ) -> set[str]:
        """SQLite's fastest path: ``executemany``, then the rows past the previous highest id.

        This transaction holds SQLite's write lock (BEGIN IMMEDIATE), so the ids above the
        highest one seen at the start are exactly the events this statement inserted.
        """
        before = await self.sql.run("SELECT coalesce(max(id), 0) FROM events")
        await overlapped(
            self.sql.executemany(
                f"INSERT INTO events ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                "ON CONFLICT (event_id) DO NOTHING",
                rows,
            ),
            meanwhile,
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
        the claim itself is conditional on ``applied`` still being false. The campaign is
        known only now, so this is also when its ``privacy.anonymizeIp`` applies.
        """
        sql = self.sql
        rows: list[Any] = []
        for table, where, params in branches:
            # Each branch on its own (an OR would not use the right index on SQLite).
            rows += await sql.run(
                "SELECT id, type, tracking_id, recipient, occurred_at, received_at, machine, bounce_kind, "
                "url, ip, user_agent, reason, metadata, machine_kind "
                f"FROM {table} WHERE applied = {sql.false} AND type NOT IN ('sent', 'failed') "
                f"AND {where}"
                + (f" LIMIT {int(limit)}" if limit else "")
                + sql.lock_clause(skip_locked=True),
                params,
            )
        if not rows:
            return []
        parked = [_Parked._make((*r[:4], as_utc(r[4]), as_utc(r[5]), *r[6:])) for r in rows]
        # An address-only event's received_at is its arrival (aggregator.ingest.prepare).
        by_id, by_address = await self.resolve(
            (r.tracking_id for r in parked if r.tracking_id),
            (
                (r.recipient, event_time(r.occurred_at, r.received_at))
                for r in parked
                if not r.tracking_id and r.recipient
            ),
            wait=False,
        )
        chosen: list[tuple[_Parked, Target]] = []
        for r in parked:
            if r.tracking_id:
                target = by_id.get(r.tracking_id)
            else:
                target = by_address.get((r.recipient or "", event_time(r.occurred_at, r.received_at)))
            if target is not None:
                chosen.append((r, target))
        if not chosen:
            return []
        anonymized = self.anonymized
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
        private = [
            (r.id, *anonymized_details(r.ip, r.user_agent, r.reason, r.metadata))
            for r, t in chosen
            if r.id in claimed and t.campaign in anonymized
        ]
        # A person's open counts with the client its stored user agent names (as a recount reads it).
        agents = {r.id: r.user_agent for r, _ in chosen} | {row[0]: row[2] for row in private}
        if private:
            # Only now is the campaign known, and with it whether its addresses may be kept.
            p = sql.source(
                [
                    ("id", "int"),
                    ("ip", "text"),
                    ("user_agent", "text"),
                    ("reason", "text"),
                    ("metadata", "json"),
                ],
                private,
            )
            await sql.run(
                f"UPDATE events SET ip = {p['ip']}, user_agent = {p['user_agent']}, reason = {p['reason']}, "
                f"metadata = {sql.json_value(p['metadata'])} FROM {p.sql} WHERE events.id = {p['id']}",
                p.params,
            )
        return [
            Applied(
                type=EventType(r.type),
                tracking_id=t.tracking_id,
                campaign=t.campaign,
                occurred_at=r.occurred_at,
                machine=bool(r.machine),
                bounce_kind=r.bounce_kind,
                url=r.url,
                machine_kind=r.machine_kind,
                reader=reader_of(agents[r.id]) if r.type == "opened" and not r.machine else None,
            )
            for r, t in chosen
            if r.id in claimed
        ]
