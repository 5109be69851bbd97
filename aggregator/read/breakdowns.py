"""Clients, devices, machines and mailbox providers: the O(1) read and the recount.

Ingest keeps ``campaign_breakdowns`` and ``domain_stats`` (aggregator.ingest.tally); reading
them is a handful of primary-key and index lookups whatever the number of events. The
recount here computes the same numbers from the stored events (and the pruned ones)
by their definitions (docs/architecture.md "Statistics"), for ``refresh``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import and_, case, delete, distinct, func, literal_column, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator.store.domains import PROVIDERS, TOP_DOMAINS, rows_of
from aggregator.store.keys import CLIENT, DEVICE, MACHINE, UNKNOWN_MACHINE, FirstReader
from aggregator.store.models import BREAKDOWNS, DOMAIN_COUNTERS, DOMAINS, EVENTS, MESSAGES, PRUNED
from aggregator.store.readers import DEVICES, OTHER, UNKNOWN_DEVICE, reader_of
from aggregator.store.times import as_utc
from mailbeacon.contract.events import EventType

FacetCounts = dict[tuple[str, str], list[int]]  # (facet, name) -> [unique opens, opens, clicks]
DomainCounts = dict[str, list[int]]  # provider or domain -> DOMAIN_COUNTERS


def _rate(numerator: int, denominator: int) -> float:
    return round(numerator * 100.0 / denominator, 2) if denominator > 0 else 0.0


# -- reading ------------------------------------------------------------------------------------


def _domain_json(domain: str, kind: str, counts: Mapping[str, int]) -> dict[str, Any]:
    sent, delivered = counts.get("sent", 0), counts.get("delivered", 0)
    return {
        "domain": domain,
        "kind": kind,
        **{name: int(counts.get(name, 0)) for name in DOMAIN_COUNTERS},
        "delivery_rate": _rate(delivered, sent),
        "bounce_rate": _rate(counts.get("bounced", 0), sent),
        "open_rate": _rate(counts.get("unique_opens", 0), delivered),
        "human_open_rate": _rate(counts.get("human_unique_opens", 0), delivered),
    }


def breakdowns_json(
    facets: Iterable[tuple[str, str, int, int, int]], human_unique_opens: int
) -> dict[str, Any]:
    """``clients``, ``devices`` and ``machines`` from ``(facet, name, unique opens, opens, clicks)`` rows."""
    clients: list[tuple[str, int, int]] = []
    devices = dict.fromkeys(DEVICES, 0)
    machines: dict[str, dict[str, int]] = {}
    for facet, name, unique, opens, clicks in facets:
        if facet == CLIENT and (unique or opens):
            clients.append((name, unique, opens))
        elif facet == DEVICE:
            devices[name if name in devices else UNKNOWN_DEVICE] += unique
        elif facet == MACHINE and (opens or clicks):
            machines[name] = {"opens": opens, "clicks": clicks}
    clients.sort(key=lambda c: (-c[1], -c[2], c[0]))
    return {
        "clients": [
            {
                "client": name,
                "unique_opens": unique,
                "total_opens": opens,
                "share": _rate(unique, human_unique_opens),
            }
            for name, unique, opens in clients
        ],
        "devices": devices,
        "machines": dict(sorted(machines.items())),
    }


async def read_breakdowns(conn: AsyncConnection, campaign: str, human_unique_opens: int) -> dict[str, Any]:
    """The stored breakdowns of a campaign, ready for the statistics JSON."""
    b, d = BREAKDOWNS.c, DOMAINS.c
    facets = await conn.execute(
        select(b.facet, b.name, b.unique_opens, b.opens, b.clicks).where(b.campaign == campaign)
    )
    counters = [d[name] for name in DOMAIN_COUNTERS]
    # One round trip: the provider rows, then the top domains (they have a dot; providers none).
    top = (
        select(d.domain, *counters)
        .where(d.campaign == campaign, d.domain.like("%.%"))
        .order_by(d.sent.desc(), d.domain)
        .limit(TOP_DOMAINS)
        .subquery()
    )
    rows = await conn.execute(
        union_all(
            select(literal_column("0").label("part"), d.domain, *counters).where(
                d.campaign == campaign, d.domain.in_(PROVIDERS)
            ),
            select(literal_column("1"), top),
        )
    )
    by_provider, domains = {}, []
    for part, domain, *counts in rows.all():
        if part == 0:
            by_provider[domain] = dict(zip(DOMAIN_COUNTERS, counts, strict=True))
        else:
            domains.append((domain, dict(zip(DOMAIN_COUNTERS, counts, strict=True))))
    domains.sort(key=lambda item: (-item[1]["sent"], item[0]))  # a union keeps no order
    return {
        **breakdowns_json([tuple(r) for r in facets.all()], human_unique_opens),
        "domains": [_domain_json(p, "provider", by_provider.get(p, {})) for p in PROVIDERS]
        + [_domain_json(domain, "domain", counts) for domain, counts in domains],
    }


# -- the recount --------------------------------------------------------------------------------


def first_readers(opens: Iterable[tuple[str, FirstReader]]) -> dict[str, FirstReader]:
    """Each copy's first person's open: the earliest, and of those at the same time the one
    whose client and device sort first."""
    first: dict[str, FirstReader] = {}
    for tid, candidate in opens:
        known = first.get(tid)
        if known is None or candidate < known:
            first[tid] = candidate
    return first


async def _people_opens(
    conn: AsyncConnection, campaign: str
) -> tuple[dict[str, FirstReader], dict[str, int]]:
    """Each copy's first person's open, and people's opens per client, from events and pruned events."""
    e, p = EVENTS.c, PRUNED.c
    human_open = and_(
        e.campaign == campaign, e.applied.is_(True), e.type == EventType.OPENED.value, e.machine.is_(False)
    )
    earliest = (
        select(e.tracking_id.label("tid"), func.min(e.occurred_at).label("at"))
        .where(human_open)
        .group_by(e.tracking_id)
        .subquery()
    )
    live = await conn.execute(
        select(e.tracking_id, e.occurred_at, e.user_agent)
        .join(earliest, and_(earliest.c.tid == e.tracking_id, earliest.c.at == e.occurred_at))
        .where(human_open)
    )
    pruned_human_open = and_(p.campaign == campaign, p.type == EventType.OPENED.value, p.machine.is_(False))
    pruned = await conn.execute(
        select(p.tracking_id, p.first_at, p.hour, p.client, p.device).where(pruned_human_open)
    )
    candidates: list[tuple[str, FirstReader]] = []
    for tid, at, agent in live.all():
        candidates.append((tid, (as_utc(at), *reader_of(agent))))
    for tid, first_at, hour, client, device in pruned.all():
        candidates.append((tid, (as_utc(first_at or hour), client or OTHER, device or UNKNOWN_DEVICE)))
    totals: dict[str, int] = defaultdict(int)
    by_agent = await conn.execute(select(e.user_agent, func.count()).where(human_open).group_by(e.user_agent))
    for agent, n in by_agent.all():
        totals[reader_of(agent).client] += int(n)
    by_client = await conn.execute(
        select(p.client, func.sum(p.n)).where(pruned_human_open).group_by(p.client)
    )
    for client, n in by_client.all():
        totals[client or OTHER] += int(n)
    return first_readers(candidates), totals


async def recount_facets(conn: AsyncConnection, campaign: str) -> FacetCounts:
    """Clients, devices and machines of the campaign, by their definitions."""
    counts: FacetCounts = defaultdict(lambda: [0, 0, 0])
    first, totals = await _people_opens(conn, campaign)
    for _, client, device in first.values():
        counts[(CLIENT, client)][0] += 1
        counts[(DEVICE, device)][0] += 1
    for client, n in totals.items():
        counts[(CLIENT, client)][1] += n
    e, p = EVENTS.c, PRUNED.c
    engagement = [EventType.OPENED.value, EventType.CLICKED.value]
    live = await conn.execute(
        select(e.machine_kind, e.type, func.count())
        .where(e.campaign == campaign, e.applied.is_(True), e.machine.is_(True), e.type.in_(engagement))
        .group_by(e.machine_kind, e.type)
    )
    pruned = await conn.execute(
        select(p.machine_kind, p.type, func.sum(p.n))
        .where(p.campaign == campaign, p.machine.is_(True), p.type.in_(engagement))
        .group_by(p.machine_kind, p.type)
    )
    for kind, event_type, n in [*live.all(), *pruned.all()]:
        counts[(MACHINE, kind or UNKNOWN_MACHINE)][1 if event_type == EventType.OPENED.value else 2] += int(n)
    return counts


async def recount_domains(conn: AsyncConnection, facts: Any) -> DomainCounts:
    """Copies per provider and per domain counted on its own, from the campaign's ``facts``
    (its applied and pruned events, :func:`aggregator.read.statistics._facts`)."""
    f, m = facts.c, MESSAGES.c
    column = {"sent": 0, "delivered": 1, "bounced": 2, "complained": 3, "opened": 4}
    rows = await conn.execute(
        select(
            m.domain,
            f.type,
            func.count(distinct(f.tracking_id)),
            func.count(distinct(case((f.machine.is_(False), f.tracking_id)))),
        )
        .select_from(facts.join(MESSAGES, m.tracking_id == f.tracking_id))
        .where(f.type.in_(list(column)))
        .group_by(m.domain, f.type)
    )
    counts: DomainCounts = defaultdict(lambda: [0] * len(DOMAIN_COUNTERS))
    for domain, kind, copies, people in rows.all():
        for row in rows_of(domain or ""):
            counts[row][column[kind]] += int(copies)
            if kind == EventType.OPENED.value:
                counts[row][5] += int(people)
    return counts


async def store_recount(
    conn: AsyncConnection, campaign: str, facets: FacetCounts, domains: DomainCounts
) -> None:
    """Replace the campaign's stored breakdowns with recounted ones."""
    await conn.execute(delete(BREAKDOWNS).where(BREAKDOWNS.c.campaign == campaign))
    facet_rows = [
        {"campaign": campaign, "facet": facet, "name": name, "unique_opens": u, "opens": o, "clicks": c}
        for (facet, name), (u, o, c) in sorted(facets.items())
        if u or o or c
    ]
    if facet_rows:
        await conn.execute(BREAKDOWNS.insert(), facet_rows)
    await conn.execute(delete(DOMAINS).where(DOMAINS.c.campaign == campaign))
    domain_rows = [
        {"campaign": campaign, "domain": domain, **dict(zip(DOMAIN_COUNTERS, values, strict=True))}
        for domain, values in sorted(domains.items())
        if any(values)
    ]
    if domain_rows:
        await conn.execute(DOMAINS.insert(), domain_rows)
