"""What applied events do: their messages' first-seen columns, and the summed counters.

Part of one ingest transaction (:mod:`aggregator.ingest.ingest`). Every "does this count?"
decision is made by the database inside the writing statement: the conditional UPDATE
of the messages returns which first-seen columns it filled (:class:`Seen` bits), and the
counters, per-link counts and open buckets are written as atomic upserts
(``col = col + delta``), each in sorted key order so concurrent replicas never deadlock.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from aggregator.ingest.effects import (
    CHANGE_COLUMNS,
    FIRST_SEEN,
    Applied,
    Plan,
    Seen,
    Transition,
    count_transitions,
    message_changes,
    plan,
)
from aggregator.store.bulk import Bulk, Column
from aggregator.store.models import COUNTER_COLUMNS, DOMAIN_COUNTERS
from aggregator.store.times import sqlite_time
from mailbeacon.contract.events import utcnow


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    parked: int = 0
    by_type: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))


class Tally:
    """The effects half of an ingest transaction; :class:`aggregator.ingest.transaction.Transaction` adds the events."""

    def __init__(self, bulk: Bulk, now: datetime | None = None) -> None:
        self.sql = bulk
        self.now = now or utcnow()
        self.result = BatchResult()
        self.new_campaigns: set[str] = set()
        self.new_recipients: set[tuple[str, str]] = set()
        self.counters: dict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.plan = Plan()
        self.unique_link_clicks: list[tuple[str, str]] = []
        # (campaign, facet, name) -> [unique opens, opens, clicks]; (campaign, domain row) -> DOMAIN_COUNTERS
        self.facets: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.domains: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(DOMAIN_COUNTERS))

    # -- effects ----------------------------------------------------------------------------

    async def apply(self, applied: list[Applied], planned: Plan | None = None) -> None:
        """Write what the applied events do to their messages and collect the counter deltas.

        ``planned``: :func:`plan` of exactly these events, when the caller made it already.
        """
        p = self.plan = plan(applied) if planned is None else planned
        for key, n in p.by_type.items():
            self.result.by_type[key] += n
        self.result.applied += len(applied)
        if p.campaign_of:
            count_transitions(p, await self._update_messages(p))
        await self._message_links(p)
        for campaign, deltas in p.counters.items():
            for name, n in deltas.items():
                self.counters[campaign][name] += n
        for facet, values in p.facets.items():
            into = self.facets[facet]
            for i, n in enumerate(values):
                into[i] += n
        for row, values in p.domains.items():
            into = self.domains[row]
            for i, n in enumerate(values):
                into[i] += n

    async def _update_messages(self, p: Plan) -> list[Transition]:
        """One conditional UPDATE for every touched message.

        First-seen columns keep the earliest time (out-of-order events move them back);
        ``newly_seen`` is computed from the row as it was before this statement, so the
        returned masks say exactly which columns were empty until now. The client and
        device of the first person's open follow ``first_human_opened_at``: they are
        replaced when this batch holds an earlier person's open (at the same time, one
        whose client and device sort first), and the ones replaced are returned with them.
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
                ("client", "text"),
                ("device", "text"),
            ],
            message_changes(p, None if self.sql.postgres else sqlite_time),
            ready=True,
        )
        assert len(CHANGE_COLUMNS) == len(FIRST_SEEN) + 6
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
        # Code point order on both databases, as Python compares the batch's own opens.
        c = ' COLLATE "C"' if self.sql.postgres else ""
        at, old_at = v["first_human_opened_at"], f"{m}first_human_opened_at"
        replace = (
            f"{v['client']} IS NOT NULL AND ({old_at} IS NULL OR {at} < {old_at} OR ({at} = {old_at} AND "
            f"({v['client']}{c} < {m}human_client{c} OR ({v['client']} = {m}human_client "
            f"AND {v['device']}{c} < {m}human_device{c}))))"
        )
        bits.append(f"CASE WHEN {replace} THEN {int(Seen.READER)} ELSE 0 END")
        rows = await self.sql.run(
            f"UPDATE messages SET {', '.join(earliest)}, "
            f"bounce_kind = CASE WHEN {kind} = 'hard' OR {m}bounce_kind IS NULL "
            f"THEN coalesce({kind}, {m}bounce_kind) ELSE {m}bounce_kind END, "
            f"open_count = {m}open_count + {v['opens']}, click_count = {m}click_count + {v['clicks']}, "
            f"human_client = CASE WHEN {replace} THEN {v['client']} ELSE {m}human_client END, "
            f"human_device = CASE WHEN {replace} THEN {v['device']} ELSE {m}human_device END, "
            f"replaced_client = {m}human_client, replaced_device = {m}human_device, "
            f"newly_seen = {' + '.join(bits)} "
            f"FROM {v.sql} WHERE messages.tracking_id = {v['tracking_id']} "
            "RETURNING messages.tracking_id, messages.newly_seen, messages.domain, messages.human_client, "
            "messages.human_device, messages.replaced_client, messages.replaced_device",
            v.params,
        )
        return [row for row in rows if row[1]]  # TRANSITION_COLUMNS

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
        await self._upsert_facets()
        await self._upsert_domains()

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
            [
                ("campaign", "text"),
                ("hour", "ts"),
                ("opens", "int"),
                ("human", "int"),
                ("clicks", "int"),
                ("human_clicks", "int"),
            ],
            [(c, h, *counts) for (c, h), counts in sorted(self.plan.buckets.items())],
        )
        await self.sql.run(
            "INSERT INTO open_buckets (campaign, hour, opens, human_opens, clicks, human_clicks) "
            f"SELECT {v['campaign']}, {v['hour']}, {v['opens']}, {v['human']}, {v['clicks']}, "
            f"{v['human_clicks']} FROM {v.sql} WHERE true "
            "ON CONFLICT (campaign, hour) DO UPDATE SET opens = open_buckets.opens + excluded.opens, "
            "human_opens = open_buckets.human_opens + excluded.human_opens, "
            "clicks = open_buckets.clicks + excluded.clicks, "
            "human_clicks = open_buckets.human_clicks + excluded.human_clicks",
            v.params,
        )

    async def _upsert_facets(self) -> None:
        rows = [(*key, *counts) for key, counts in sorted(self.facets.items()) if any(counts)]
        if not rows:
            return
        v = self.sql.source(
            [
                ("campaign", "text"),
                ("facet", "text"),
                ("name", "text"),
                ("unique_opens", "int"),
                ("opens", "int"),
                ("clicks", "int"),
            ],
            rows,
        )
        await self.sql.run(
            "INSERT INTO campaign_breakdowns (campaign, facet, name, unique_opens, opens, clicks) "
            f"SELECT {v['campaign']}, {v['facet']}, {v['name']}, {v['unique_opens']}, {v['opens']}, "
            f"{v['clicks']} FROM {v.sql} WHERE true ON CONFLICT (campaign, facet, name) DO UPDATE SET "
            "unique_opens = campaign_breakdowns.unique_opens + excluded.unique_opens, "
            "opens = campaign_breakdowns.opens + excluded.opens, "
            "clicks = campaign_breakdowns.clicks + excluded.clicks",
            v.params,
        )

    async def _upsert_domains(self) -> None:
        rows = [(*key, *counts) for key, counts in sorted(self.domains.items()) if any(counts)]
        if not rows:
            return
        columns: list[Column] = [
            ("campaign", "text"),
            ("domain", "text"),
            *((n, "int") for n in DOMAIN_COUNTERS),
        ]
        v = self.sql.source(columns, rows)
        sums = ", ".join(f"{n} = domain_stats.{n} + excluded.{n}" for n in DOMAIN_COUNTERS)
        await self.sql.run(
            f"INSERT INTO domain_stats (campaign, domain, {', '.join(DOMAIN_COUNTERS)}) "
            f"SELECT {v['campaign']}, {v['domain']}, {', '.join(v[n] for n in DOMAIN_COUNTERS)} FROM {v.sql} "
            f"WHERE true ON CONFLICT (campaign, domain) DO UPDATE SET {sums}",
            v.params,
        )
