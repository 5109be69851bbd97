"""Property: whatever the order, duplication and batching of events, the statistics kept
incrementally equal ``refresh`` and equal a recount written here from the definitions,
every field included (clients, devices, machines, domains, heatmap, series), and so do
both again once retention has pruned every event.

The recount below shares no code with the aggregator. It follows the documented
semantics: a message exists once its first ``sent``/``failed`` event is stored; an
address-only webhook belongs to the most recent message to that address, among those
known when its batch is stored, sent no later than the event happened (else the most
recent one sent up to five minutes after it; else none: it waits); events whose message is
unknown wait (parked) and are applied when it appears; every event counts once however
often it is delivered. (The events here happened months before they arrive, so their
arrival never bounds their time.)
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.ingest.ingest import adopt_parked, apply_batch
from aggregator.read import statistics
from aggregator.store.db import Database, open_database
from aggregator.store.migrate import migrate
from aggregator.store.retention import prune
from mailbeacon.contract.events import Event, EventType
from mailbeacon.contract.signing import HONEYPOT_URL

START = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
URLS = ["https://a.example/1", "https://a.example/2", HONEYPOT_URL]
# Real user agents and the client and device docs/aggregator.md "Insights" says each one is.
AGENTS = {
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Mobile/15E148": ("Apple Mail", "mobile"),
    "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148": (
        "Apple Mail",
        "tablet",
    ),
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)": ("Outlook", "desktop"),
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.6478.71 "
    "Mobile Safari/537.36": ("Webmail (Chrome Mobile)", "webmail"),
}
MACHINE_KINDS = ["honeypot", "image_proxy", "apple_privacy_proxy"]
# Recipient domains: two providers, two domains counted on their own, one without a dot.
DOMAINS = ["gmail.com", "hotmail.co.uk", "corp.example", "shop.example", "localhost"]
ZONE = ZoneInfo("America/New_York")
ADDRESS_ONLY = ("delivered", "deferred", "bounced", "complained")
ENGAGEMENT = ("opened", "clicked")
OTHER = ("delivered", "deferred", "bounced", "complained", "unsubscribed")


@dataclass(frozen=True)
class Spec:
    """One generated event, before ids are made unique per example."""

    kind: str
    message: int | None  # index of the message it names by tracking id
    address: int | None  # index of the recipient it names (address-only webhooks)
    minute: int
    machine: bool = False
    bounce_kind: str = "hard"
    url: int = 0
    status: str = "sent"
    campaign: int = 0
    agent: int = 0
    robot: int = 0  # index of the machine kind
    days: int = 0  # engagement some days later (gaps in the series)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Spec], list[int]]:
    recipients = draw(st.integers(1, 3))
    message_count = draw(st.integers(1, 5))
    specs: list[Spec] = []
    for m in range(message_count):
        specs.append(
            Spec(
                kind="sent",
                message=m,
                address=draw(st.integers(0, recipients - 1)),
                minute=draw(st.integers(0, 300)),
                status=draw(st.sampled_from(["sent", "sent", "sent", "failed"])),
                campaign=draw(st.integers(0, 1)),
            )
        )
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(ENGAGEMENT + ENGAGEMENT + OTHER))
        # message index message_count names a copy that is never sent (stays parked)
        target = draw(st.integers(0, message_count))
        address = None
        if kind in ADDRESS_ONLY and draw(st.booleans()):
            target, address = -1, draw(st.integers(0, recipients))  # recipients = an unknown address
        specs.append(
            Spec(
                kind=kind,
                message=None if target < 0 else target,
                address=address,
                minute=draw(st.integers(0, 600)),  # may be earlier than the sent: out of order
                machine=draw(st.booleans()) if kind in ENGAGEMENT else False,
                bounce_kind=draw(st.sampled_from(["hard", "soft"])),
                url=draw(st.integers(0, len(URLS) - 1)),
                agent=draw(st.integers(0, len(AGENTS) - 1)),
                robot=draw(st.integers(0, len(MACHINE_KINDS) - 1)),
                days=draw(st.sampled_from([0, 0, 0, 2, 3])) if kind in ENGAGEMENT else 0,
            )
        )
    # Redeliveries and provider retries: the same event (same id) again, anywhere later.
    indexes = list(range(len(specs)))
    indexes += draw(st.lists(st.sampled_from(indexes), max_size=8))
    order = draw(st.permutations(indexes))
    return specs, order


def materialize(specs: list[Spec], tag: str) -> tuple[list[Event], list[str]]:
    """Events with ids unique to this example (the database is shared across examples)."""
    tracking = [str(uuid.uuid4()) for _ in range(6)]
    sent_of = {s.message: s for s in specs if s.kind == "sent"}
    events = []
    agents = list(AGENTS)

    def address(index: int) -> str:
        return f"r{index}.{tag}@{DOMAINS[index % len(DOMAINS)]}"

    for i, s in enumerate(specs):
        at = START + timedelta(days=s.days, minutes=s.minute)
        common: dict[str, Any] = {"event_id": f"{tag}-{i}", "occurred_at": at}
        if s.kind == "sent":
            assert s.message is not None and s.address is not None
            events.append(
                Event(
                    **common,
                    type=EventType(s.status),
                    tracking_id=tracking[s.message],
                    campaign=f"{tag}/c{s.campaign}",
                    recipient=address(s.address),
                )
            )
            continue
        fields: dict[str, Any] = {"type": EventType(s.kind), "source": "webhook:generic"}
        if s.message is not None:
            fields["tracking_id"] = tracking[s.message]
            known = sent_of.get(s.message)
            fields["recipient"] = address(known.address) if known and known.address is not None else None
        else:
            assert s.address is not None
            fields["recipient"] = address(s.address)
        if s.kind in ENGAGEMENT:
            fields["machine"] = s.machine
            fields["machine_kind"] = MACHINE_KINDS[s.robot] if s.machine else None
            fields["user_agent"] = agents[s.agent]
        if s.kind == "bounced":
            fields["bounce_kind"] = s.bounce_kind
        if s.kind == "clicked":
            fields["url"] = URLS[s.url]
        events.append(Event(**common, **fields))
    return events, tracking


# -- the independent recount ------------------------------------------------------------------


@dataclass
class Message:
    tracking_id: str
    campaign: str
    recipient: str
    status: str
    sent_at: datetime
    events: list[Event] = field(default_factory=list)


class Model:
    """What the statistics must be, from the documented semantics alone."""

    def __init__(self) -> None:
        self.messages: dict[str, Message] = {}
        self.seen: set[str] = set()
        self.parked: list[Event] = []

    def _latest(self, recipient: str | None, at: datetime) -> Message | None:
        # Only relayed copies: a provider reports nothing about one it never got.
        mine = [m for m in self.messages.values() if m.recipient == recipient and m.status == "sent"]
        before = [m for m in mine if m.sent_at <= at]
        skewed = [m for m in mine if m.sent_at <= at + timedelta(minutes=5)]
        return max(before or skewed, key=lambda m: (m.sent_at, m.tracking_id), default=None)

    def _target(self, e: Event) -> Message | None:
        if e.tracking_id is not None:
            return self.messages.get(e.tracking_id)
        return self._latest(e.recipient, e.occurred_at)

    def batch(self, events: list[Event]) -> None:
        new = []
        for e in events:
            if e.event_id not in self.seen:
                self.seen.add(e.event_id)
                new.append(e)
        created: list[Message] = []
        for e in new:
            if e.type in (EventType.SENT, EventType.FAILED) and e.tracking_id not in self.messages:
                assert e.tracking_id is not None and e.campaign and e.recipient
                m = Message(e.tracking_id, e.campaign, e.recipient, e.type.value, e.occurred_at)
                self.messages[e.tracking_id] = m
                created.append(m)
        waiting_before = self.parked
        self.parked = []
        for e in new:
            if e.type in (EventType.SENT, EventType.FAILED):
                continue
            target = self._target(e)
            if target is None:
                self.parked.append(e)
            else:
                target.events.append(e)
        new_ids = {m.tracking_id for m in created}
        new_addresses = {m.recipient for m in created}
        for e in waiting_before:
            wanted = e.tracking_id in new_ids if e.tracking_id else e.recipient in new_addresses
            target = self._target(e) if wanted else None
            if target is None:
                self.parked.append(e)
            else:
                target.events.append(e)

    def adopt(self) -> None:
        waiting, self.parked = self.parked, []
        for e in waiting:
            target = self._target(e)
            if target is None:
                self.parked.append(e)
            else:
                target.events.append(e)

    def statistics(self, campaign: str) -> dict[str, Any]:
        mine = [m for m in self.messages.values() if m.campaign == campaign]

        def having(kind: str, human: bool = False) -> list[Message]:
            return [
                m for m in mine if any(e.type.value == kind and not (human and e.machine) for e in m.events)
            ]

        def total(kind: str, human: bool = False) -> int:
            return sum(
                1 for m in mine for e in m.events if e.type.value == kind and not (human and e.machine)
            )

        bounced = having("bounced")
        hard = [
            m for m in bounced if any(e.type.value == "bounced" and e.bounce_kind == "hard" for e in m.events)
        ]
        links: dict[str, list[Any]] = defaultdict(lambda: [0, set()])
        for m in mine:
            for e in m.events:
                if e.type.value == "clicked" and e.url and e.url != HONEYPOT_URL:
                    links[e.url][0] += 1
                    links[e.url][1].add(m.tracking_id)
        counts = {
            "total_recipients": len({m.recipient for m in mine}),
            "sent_count": sum(1 for m in mine if m.status == "sent"),
            "failed_count": sum(1 for m in mine if m.status == "failed"),
            "delivered_count": len(having("delivered")),
            "deferred_count": len(having("deferred")),
            "bounced_count": len(bounced),
            "hard_bounced_count": len(hard),
            "soft_bounced_count": len(bounced) - len(hard),
            "complained_count": len(having("complained")),
            "unsubscribed_count": len(having("unsubscribed")),
            "unique_opens": len(having("opened")),
            "total_opens": total("opened"),
            "human_unique_opens": len(having("opened", human=True)),
            "human_total_opens": total("opened", human=True),
            "unique_clicks": len(having("clicked")),
            "total_clicks": total("clicked"),
            "human_unique_clicks": len(having("clicked", human=True)),
            "human_total_clicks": total("clicked", human=True),
        }
        delivered = counts["delivered_count"]

        top = sorted(
            ({"url": u, "total_clicks": t, "unique_clicks": len(q)} for u, (t, q) in links.items()),
            key=lambda link: (-link["total_clicks"], -link["unique_clicks"], link["url"]),
        )
        return {
            **counts,
            "delivery_rate": pct(delivered, counts["sent_count"]),
            "open_rate": pct(counts["unique_opens"], delivered),
            "click_rate": pct(counts["unique_clicks"], delivered),
            "bounce_rate": pct(counts["bounced_count"], counts["sent_count"]),
            "complaint_rate": pct(counts["complained_count"], delivered),
            "top_links": top,
            **insights(mine, counts["human_unique_opens"]),
        }


def pct(n: int, d: int) -> float:
    return round(100.0 * n / d, 2) if d else 0.0


def series(mine: list[Message], hourly: bool) -> dict[str, list[dict[str, Any]]]:
    """Every UTC day (hour) from the first to the last open or click, zeros included."""
    step = timedelta(hours=1) if hourly else timedelta(days=1)
    totals: dict[datetime, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for m in mine:
        for e in m.events:
            if e.type.value in ENGAGEMENT:
                at = e.occurred_at.replace(minute=0, second=0, microsecond=0)
                at = at if hourly else at.replace(hour=0)
                offset = 0 if e.type.value == "opened" else 2
                totals[at][offset] += 1
                totals[at][offset + 1] += 0 if e.machine else 1
    key, label = ("hour", "%Y-%m-%dT%H:00:00Z") if hourly else ("date", "%Y-%m-%d")
    opens, clicks = [], []
    moment = min(totals, default=None)
    while moment is not None and moment <= max(totals):
        o, ho, c, hc = totals.get(moment, [0, 0, 0, 0])
        opens.append({key: moment.strftime(label), "opens": o, "human_opens": ho})
        clicks.append({key: moment.strftime(label), "clicks": c, "human_clicks": hc})
        moment += step
    return {"opens_over_time": opens, "clicks_over_time": clicks}


def insights(mine: list[Message], human_unique: int) -> dict[str, Any]:
    """Clients, devices, machines, domains and the heatmaps, from their definitions in docs/aggregator.md "Insights"."""
    clients: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    devices = dict.fromkeys(("desktop", "mobile", "tablet", "webmail", "unknown"), 0)
    machines: dict[str, dict[str, int]] = defaultdict(lambda: {"opens": 0, "clicks": 0})
    grids = {zone: [[0] * 24 for _ in range(7)] for zone in ("UTC", "NY")}
    providers = {"gmail.com": "gmail", "hotmail.co.uk": "outlook"}
    domains: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
    for m in mine:
        people = [e for e in m.events if e.type.value == "opened" and not e.machine]
        for e in people:
            clients[AGENTS[e.user_agent or ""][0]][1] += 1
            for zone, local in (("UTC", e.occurred_at), ("NY", e.occurred_at.astimezone(ZONE))):
                grids[zone][local.weekday()][local.hour] += 1
        if people:
            _, client, device = min((e.occurred_at, *AGENTS[e.user_agent or ""]) for e in people)
            clients[client][0] += 1
            devices[device] += 1
        for e in m.events:
            if e.machine:
                machines[e.machine_kind or "unknown"]["opens" if e.type.value == "opened" else "clicks"] += 1
        domain = m.recipient.rpartition("@")[2]
        kinds = {e.type.value for e in m.events}
        values = [
            int(m.status == "sent"),
            int("delivered" in kinds),
            int("bounced" in kinds),
            int("complained" in kinds),
            int("opened" in kinds),
            int(bool(people)),
        ]
        rows = [providers.get(domain, "other")] + (
            [domain] if domain not in providers and "." in domain else []
        )
        for row in rows:
            domains[row] = [a + b for a, b in zip(domains[row], values, strict=True)]

    def domain_json(name: str, kind: str, v: list[int]) -> dict[str, Any]:
        return {
            "domain": name,
            "kind": kind,
            **dict(
                zip(
                    ("sent", "delivered", "bounced", "complained", "unique_opens", "human_unique_opens"),
                    v,
                    strict=True,
                )
            ),
            "delivery_rate": pct(v[1], v[0]),
            "bounce_rate": pct(v[2], v[0]),
            "open_rate": pct(v[4], v[1]),
            "human_open_rate": pct(v[5], v[1]),
        }

    counted = sorted(
        ((d, v) for d, v in domains.items() if "." in d and any(v)), key=lambda item: (-item[1][0], item[0])
    )
    return {
        "clients": sorted(
            (
                {"client": c, "unique_opens": u, "total_opens": t, "share": pct(u, human_unique)}
                for c, (u, t) in clients.items()
            ),
            key=lambda c: (-c["unique_opens"], -c["total_opens"], c["client"]),
        ),
        "devices": devices,
        "machines": dict(sorted(machines.items())),
        "domains": [
            domain_json(p, "provider", domains.get(p, [0] * 6))
            for p in ("gmail", "outlook", "yahoo", "apple", "other")
        ]
        + [domain_json(d, "domain", v) for d, v in counted[:10]],
        "engagement_heatmap": grids["UTC"],
        "heatmap_new_york": grids["NY"],
        **series(mine, hourly=False),
        "hourly": series(mine, hourly=True),
    }


async def comparable(db: Database, stats: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """``stats`` in the model's shape, with the heatmap in New York and the hourly series read too."""
    campaign = stats["campaign"]
    picked = {key: stats[key] for key in model if key in stats}
    new_york = await statistics.read_statistics(db, campaign, zone=ZONE)
    hourly = await statistics.read_statistics(db, campaign, hourly=True)
    picked["heatmap_new_york"] = new_york["engagement_heatmap"]
    picked["hourly"] = {k: hourly[k] for k in ("opens_over_time", "clicks_over_time")}
    return picked


# -- the test ---------------------------------------------------------------------------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = open_database(database_url)
    await migrate(database)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios(), cuts=st.lists(st.integers(1, 7), min_size=1, max_size=12))
async def test_incremental_equals_refresh_equals_recount(
    db: Database, scenario: tuple[list[Spec], list[int]], cuts: list[int]
) -> None:
    specs, order = scenario
    tag = f"p{uuid.uuid4().hex[:10]}"
    events, tracking = materialize(specs, tag)
    stream = [events[i] for i in order]
    batches, i = [], 0
    for size in cuts * (len(stream) // max(1, sum(cuts)) + 1):
        if i >= len(stream):
            break
        batches.append(stream[i : i + size])
        i += size

    model = Model()
    for batch in batches:
        await apply_batch(db, batch)
        model.batch(batch)
    await adopt_parked(db)
    model.adopt()
    campaigns = (f"{tag}/c0", f"{tag}/c1")
    for c in campaigns:
        expected = model.statistics(c)
        kept = await statistics.read_statistics(db, c)
        assert await comparable(db, kept, expected) == expected, f"incremental {c}"
        refreshed = await statistics.refresh(db, c)
        assert await comparable(db, refreshed, expected) == expected, f"refresh {c}"
    await check_first_seen(db, model, tracking)
    # Retention prunes every event (they all happened and arrived before its cutoff): what
    # was kept stays, and a recount from the pruned rows alone gives the same again.
    await prune(db, timedelta(days=1), now=datetime.now(UTC) + timedelta(days=2))
    for c in campaigns:
        expected = model.statistics(c)
        assert await comparable(db, await statistics.read_statistics(db, c), expected) == expected
        assert await comparable(db, await statistics.refresh(db, c), expected) == expected, f"pruned {c}"


async def check_first_seen(db: Database, model: Model, tracking: list[str]) -> None:
    """Each message's first-seen times are the earliest of its applied events, whatever the order."""
    from sqlalchemy import select

    from aggregator.store.models import MESSAGES
    from aggregator.store.times import as_utc

    columns = {"delivered": "delivered_at", "opened": "first_opened_at", "clicked": "first_clicked_at"}
    async with db.read_engine.connect() as conn:
        rows = (
            (await conn.execute(select(MESSAGES).where(MESSAGES.c.tracking_id.in_(tracking))))
            .mappings()
            .all()
        )
    assert {r["tracking_id"] for r in rows} == set(model.messages)
    for row in rows:
        m = model.messages[row["tracking_id"]]
        for kind, column in columns.items():
            times = [e.occurred_at for e in m.events if e.type.value == kind]
            stored = row[column]
            assert (as_utc(stored) if stored else None) == (min(times) if times else None), column
        assert row["open_count"] == sum(1 for e in m.events if e.type.value == "opened")
