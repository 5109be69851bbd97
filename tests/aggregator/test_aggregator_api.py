"""The aggregator's JSON API over real HTTP, on SQLite and PostgreSQL: events filtered by
type and time with cursor pagination, a message's timeline, the streamed CSV export,
refresh, clear 4xx answers to bad input, and Prometheus metrics without personal data."""

from __future__ import annotations

import base64
import csv
import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aggregator import metrics
from aggregator.ingest.ingest import apply_batch
from aggregator.service import create_app
from aggregator.store.db import Database, open_database
from aggregator.store.migrate import migrate
from mailbeacon.contract.events import Event, EventType
from mailbeacon.web.server import add_health_routes, bound_port
from tests.support import metric_value

START = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class Api:
    def __init__(self, base: str, http: aiohttp.ClientSession, db: Database, campaign: str) -> None:
        self.base, self.http, self.db, self.campaign = base, http, db, campaign

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        async with self.http.get(f"{self.base}{path}", params=params) as response:
            body = (
                await response.json()
                if response.content_type == "application/json"
                else await response.text()
            )
            return response.status, body


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    db = open_database(database_url)
    await migrate(db)
    campaign = f"api/c{uuid.uuid4().hex[:8]}"
    app = create_app(db, None)
    add_health_routes(app, registry=metrics.REGISTRY)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    async with aiohttp.ClientSession() as http:
        yield Api(f"http://127.0.0.1:{bound_port(runner)}", http, db, campaign)
    await runner.cleanup()
    await db.dispose()


def day_of_events(campaign: str, tracking_id: str, recipient: str) -> list[Event]:
    """A sent, then one event an hour for a day: opens, clicks and one bounce."""
    events = [
        Event(
            event_id=f"{tracking_id}-sent",
            type=EventType.SENT,
            tracking_id=tracking_id,
            campaign=campaign,
            recipient=recipient,
            occurred_at=START,
        )
    ]
    for hour in range(1, 25):
        kind = EventType.CLICKED if hour % 3 == 0 else EventType.OPENED
        events.append(
            Event(
                event_id=f"{tracking_id}-{hour}",
                type=kind,
                tracking_id=tracking_id,
                occurred_at=START + timedelta(hours=hour),
                url='=HYPERLINK("https://evil.example")' if hour == 24 else "https://shop.example/x",
                source="click" if kind is EventType.CLICKED else "pixel",
            )
        )
    return events


async def test_events_filtered_and_paginated(api: Api) -> None:
    tid = str(uuid.uuid4())
    await apply_batch(api.db, day_of_events(api.campaign, tid, "ann@example.com"))
    path = f"/api/campaigns/{api.campaign}/events"

    status, page = await api.get(path, limit="10")
    assert status == 200 and len(page["events"]) == 10
    seen = [e["event_id"] for e in page["events"]]
    while page["next_cursor"]:
        status, page = await api.get(path, limit="10", cursor=page["next_cursor"])
        seen += [e["event_id"] for e in page["events"]]
    assert len(seen) == len(set(seen)) == 25  # every event once, across pages
    _, everything = await api.get(path, limit="500")
    times = [e["occurred_at"] for e in everything["events"]]
    assert times == sorted(times, reverse=True)  # newest first
    assert everything["events"][0]["recipient"] == "ann@example.com"  # from its message

    status, clicks = await api.get(path, type="clicked")
    assert {e["type"] for e in clicks["events"]} == {"clicked"} and len(clicks["events"]) == 8
    status, both = await api.get(path, type="clicked,sent")
    assert len(both["events"]) == 9
    status, window = await api.get(path, since="2026-06-01T18:00:00Z", until="2026-06-01T21:00:00+00:00")
    assert [e["occurred_at"][11:13] for e in window["events"]] == ["20", "19", "18"]
    status, second_day = await api.get(path, since="2026-06-02")
    assert len(second_day["events"]) == 13  # 00:00 to 12:00 on June 2nd
    status, first_day = await api.get(path, until="2026-06-01")  # a date includes its whole day
    assert len(first_day["events"]) == 12

    status, everyone = await api.get("/api/events", campaign=api.campaign, type="sent")
    assert [e["tracking_id"] for e in everyone["events"]] == [tid]


async def test_bad_queries_get_clear_400s(api: Api) -> None:
    await apply_batch(api.db, day_of_events(api.campaign, str(uuid.uuid4()), "bo@example.com"))
    path = f"/api/campaigns/{api.campaign}/events"
    for params, words in [
        ({"type": "opend"}, "unknown event type"),
        ({"since": "yesterday"}, "since must be"),
        ({"limit": "0"}, "limit must be"),
        ({"limit": "x"}, "limit must be"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"since": "2026-06-02", "until": "2026-06-01T00:00:00Z"}, "earlier than"),
    ]:
        status, body = await api.get(path, **params)
        assert status == 400, params
        assert body["status"] == "error" and words in body["error"], body
    status, body = await api.get("/api/campaigns/Not_A_Namespace/x/events")
    assert status == 400 and "DNS label" in body["error"]
    status, body = await api.get("/api/campaigns/api/missing/statistics")
    assert status == 404 and "no campaign" in body["error"]
    status, body = await api.get("/api/messages/not-a-uuid")
    assert status == 400 and "UUID" in body["error"]
    status, body = await api.get(f"/api/messages/{uuid.uuid4()}")
    assert status == 404


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


EXTREME_QUERIES = [
    ({"since": "0001-01-01T00:00:00+14:00"}, "since must be"),
    ({"until": "9999-12-31T23:59:59-12:00"}, "until must be"),
    ({"until": "9999-12-31"}, "until must be"),
    ({"since": "2026-13-45T99:00:00Z"}, "since must be"),
    ({"since": "2026-06-01T12:00:00+99:00"}, "since must be"),
    ({"limit": "\u00b2"}, "limit must be"),
    ({"limit": "\u0663"}, "limit must be"),
    ({"limit": "-1"}, "limit must be"),
    ({"limit": str(10**12)}, "limit must be"),
    ({"limit": "1e3"}, "limit must be"),
    ({"cursor": _cursor(b"2026-06-01T12:00:00+00:00|9223372036854775808")}, "cursor"),
    ({"cursor": _cursor(b"2026-06-01T12:00:00+00:00|" + b"9" * 40)}, "cursor"),
    ({"cursor": _cursor(b"2026-06-01T12:00:00+00:00|-1")}, "cursor"),
    ({"cursor": _cursor(b"0001-01-01T00:00:00+14:00|1")}, "cursor"),
    ({"cursor": _cursor(b"\xff\xfe|1")}, "cursor"),
    ({"cursor": _cursor(b"x|1")}, "cursor"),
    ({"cursor": "\u00e9t\u00e9"}, "cursor"),
    ({"cursor": "!!!"}, "cursor"),
    ({"cursor": "a"}, "cursor"),
]


@pytest.mark.parametrize(("params", "words"), EXTREME_QUERIES, ids=[str(p) for p, _ in EXTREME_QUERIES])
async def test_extreme_query_values_get_400_not_503(api: Api, params: dict[str, str], words: str) -> None:
    await apply_batch(api.db, day_of_events(api.campaign, str(uuid.uuid4()), "ex@example.com"))
    for path in (f"/api/campaigns/{api.campaign}/events", "/api/events"):
        status, body = await api.get(path, **params)
        assert status == 400, (path, params, body)
        assert body["status"] == "error" and words in body["error"], body
    if "limit" in params:
        return  # the HTML list has a fixed page size
    # The HTML event list answers the same input with a 400 page, not a 503.
    async with api.http.get(f"{api.base}/campaigns/{api.campaign}/events/", params=params) as response:
        assert response.status == 400, params


async def test_yes_no_parameters_refuse_anything_else(api: Api) -> None:
    await apply_batch(api.db, day_of_events(api.campaign, str(uuid.uuid4()), "flag@example.com"))
    path = f"/api/campaigns/{api.campaign}/statistics"
    status, hourly = await api.get(path, hourly="true", refresh="1")
    assert status == 200 and "hour" in hourly["opens_over_time"][0]
    status, daily = await api.get(path, hourly="no")
    assert status == 200 and "date" in daily["opens_over_time"][0]
    for name in ("hourly", "refresh"):
        status, body = await api.get(path, **{name: "maybe"})
        assert status == 400 and body["error"] == f"{name} must be true or false"


async def test_extreme_but_valid_times_are_served(api: Api) -> None:
    await apply_batch(api.db, day_of_events(api.campaign, str(uuid.uuid4()), "ok@example.com"))
    path = f"/api/campaigns/{api.campaign}/events"
    status, body = await api.get(
        path, since="0001-01-01T00:00:00Z", until="9999-12-31T23:59:59Z", limit="500"
    )
    assert status == 200 and len(body["events"]) == 25
    status, body = await api.get(path, since="0001-01-01", until="9999-12-30", limit="1")
    assert status == 200 and len(body["events"]) == 1 and body["next_cursor"]
    status, body = await api.get(path, cursor=_cursor(b"9999-12-31T23:59:59+00:00|9223372036854775807"))
    assert status == 200 and len(body["events"]) == 25


async def test_message_timeline_and_parked_events(api: Api) -> None:
    tid = str(uuid.uuid4())
    early_open = Event(event_id="early", type=EventType.OPENED, tracking_id=tid, occurred_at=START)
    await apply_batch(api.db, [early_open])  # before its sent: kept, waiting
    status, waiting = await api.get(f"/api/messages/{tid}")
    assert status == 200 and waiting["known"] is False
    assert [(e["type"], e["applied"]) for e in waiting["events"]] == [("opened", False)]

    await apply_batch(api.db, day_of_events(api.campaign, tid, "cy@example.com")[:4])
    status, timeline = await api.get(f"/api/messages/{tid}")
    assert timeline["known"] is True and timeline["recipient"] == "cy@example.com"
    assert [(e["type"], e["applied"]) for e in timeline["events"]] == [
        ("opened", True),  # applied once its message appeared
        ("sent", True),
        ("opened", True),
        ("opened", True),
        ("clicked", True),
    ]
    assert timeline["first_opened_at"] == "2026-06-01T12:00:00.000000Z"  # the early open was first
    assert timeline["open_count"] == 3 and timeline["click_count"] == 1
    status, stats = await api.get(f"/api/campaigns/{api.campaign}/statistics")
    assert stats["total_opens"] == 3 and stats["unique_opens"] == 1


async def test_csv_export_streams_every_event(api: Api) -> None:
    for n in range(3):
        await apply_batch(api.db, day_of_events(api.campaign, str(uuid.uuid4()), f"d{n}@example.com"))
    async with api.http.get(f"{api.base}/api/campaigns/{api.campaign}/export.csv") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/csv")
        assert response.headers.get("Transfer-Encoding") == "chunked"  # streamed, no Content-Length
        assert "attachment" in response.headers["Content-Disposition"]
        body = await response.text()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 75
    assert {r["recipient"] for r in rows} == {"d0@example.com", "d1@example.com", "d2@example.com"}
    dangerous = [r["url"] for r in rows if "HYPERLINK" in r["url"]]
    assert dangerous and all(u.startswith("'=") for u in dangerous)  # no formula injection
    async with api.http.get(
        f"{api.base}/api/campaigns/{api.campaign}/export.csv", params={"type": "clicked"}
    ) as response:
        clicked = list(csv.DictReader(io.StringIO(await response.text())))
    assert len(clicked) == 24 and {r["type"] for r in clicked} == {"clicked"}


async def test_refresh_and_metrics(api: Api) -> None:
    tid = str(uuid.uuid4())
    await apply_batch(api.db, day_of_events(api.campaign, tid, "eve@example.com"))
    async with api.http.post(f"{api.base}/api/campaigns/{api.campaign}/refresh") as response:
        refreshed = await response.json()
    assert (
        refreshed["total_opens"] == 16 and refreshed["total_clicks"] == 8 and refreshed["unique_clicks"] == 1
    )
    _, listed = await api.get("/api/campaigns")
    assert api.campaign in [c["campaign"] for c in listed["campaigns"]]

    from aggregator.read.statistics import list_campaigns

    metrics.CAMPAIGNS.update(await list_campaigns(api.db))
    async with api.http.get(f"{api.base}/metrics") as response:
        exposition = await response.text()
    assert metric_value(exposition, "mailbeacon_campaign_unique_opens", campaign=api.campaign) == 1
    assert metric_value(exposition, "mailbeacon_campaign_clicks", campaign=api.campaign) == 8
    assert metric_value(exposition, "mailbeacon_campaign_messages", campaign=api.campaign, state="sent") == 1
    assert (
        metric_value(exposition, "mailbeacon_campaign_rate_percent", campaign=api.campaign, rate="open")
        == 0.0
    )
    # Labels never carry recipients, URLs or tracking ids.
    assert "eve@example.com" not in exposition and tid not in exposition and "shop.example" not in exposition
