"""The insight pages: headline cards that lead with people and say when nothing is delivered,
charts on a true time axis, the heatmap, provider, client and device tables, the message's
furthest state, the campaigns list and the outbox; the statistics page updating itself from
the live stream; screenshots at desktop and phone width (tests/artifacts/) and axe-core's
accessibility check with no serious or critical violation on any page.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import expect

from aggregator.ingest.ingest import apply_batch
from aggregator.read import page_sections, pages, statistics
from aggregator.read.charts import Timeline, bar_chart, label_ticks, y_ticks
from aggregator.read.event_pages import furthest_state
from aggregator.service import create_app
from aggregator.store.db import Database, open_database
from aggregator.store.migrate import migrate
from mailbeacon.contract.events import Event, EventType
from mailbeacon.web.server import bound_port
from tests.page_support import (
    ARTIFACTS,
    DESKTOP,
    NEEDS_CHROMIUM,
    PHONE,
    chromium,
    csp_violations,
    metrics_on,
    serious_accessibility_problems,
)

CAMPAIGN = "default/autumn-news"
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday
LINK_A, LINK_B = "https://shop.example.com/autumn", "https://shop.example.com/boots"
RECIPIENTS = [
    "ann@gmail.com",
    "bob@gmail.com",
    "cid@gmail.com",
    "dee@outlook.com",
    "eve@outlook.com",
    "fay@yahoo.com",
    "gus@icloud.com",
    "hal@corp.example",
]
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)"


def insight_events() -> tuple[list[Event], list[str]]:
    ids = [str(uuid.uuid4()) for _ in RECIPIENTS]
    n = iter(range(10_000))

    def ev(kind: str, who: int, day: int, hour: float, **fields: Any) -> Event:
        return Event(
            event_id=f"insight-{next(n)}",
            type=EventType(kind),
            tracking_id=ids[who],
            occurred_at=START + timedelta(days=day, hours=hour),
            source="webhook:generic" if kind not in ("opened", "clicked") else "pixel",
            **fields,
        )

    events = [ev("sent", i, 0, 0, campaign=CAMPAIGN, recipient=r) for i, r in enumerate(RECIPIENTS)]
    events += [ev("delivered", i, 0, 0.05) for i in (0, 1, 2, 3, 5, 6)]
    events += [ev("bounced", 4, 0, 0.1, bounce_kind="hard", reason="550 5.1.1 no such user")]
    events += [ev("deferred", 7, 0, 0.1, reason="451 4.7.1 try later")]
    for who, day, hour, agent in [
        (0, 0, 1, IPHONE),
        (0, 0, 2, IPHONE),
        (1, 0, 1.5, OUTLOOK),
        (2, 1, 10, IPHONE),
        (3, 4, 0.5, OUTLOOK),
        (5, 4, 13, IPHONE),
        (0, 4, 1, IPHONE),
    ]:
        events.append(ev("opened", who, day, hour, user_agent=agent))
    events += [
        ev("opened", 6, 0, 0.2, machine=True, machine_kind="apple_privacy_proxy", user_agent="Mozilla/5.0")
    ]
    events += [
        ev("clicked", 0, 0, 2.1, url=LINK_A, user_agent=IPHONE),
        ev("clicked", 2, 1, 10.2, url=LINK_B, user_agent=IPHONE),
        ev("clicked", 3, 4, 0.6, url=LINK_A, user_agent=OUTLOOK),
        ev("clicked", 3, 0, 0.3, url=LINK_A, machine=True, machine_kind="security_scanner"),
    ]
    events += [ev("unsubscribed", 2, 1, 11), ev("complained", 5, 4, 14)]
    return events, ids


@contextlib.asynccontextmanager
async def insight_site(tmp_path: Path) -> AsyncIterator[tuple[str, Database, list[str]]]:
    db = open_database(f"sqlite:///{tmp_path / 'insights.db'}")
    await migrate(db)
    events, ids = insight_events()
    await apply_batch(db, events)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    write_outbox(outbox, ids)
    runner = web.AppRunner(create_app(db, outbox))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}", db, ids
    finally:
        await runner.cleanup()
        await db.dispose()


def write_outbox(directory: Path, ids: list[str]) -> None:
    for number, (recipient, tracking_id) in enumerate(zip(RECIPIENTS[:3], ids, strict=False)):
        mail = EmailMessage()
        mail["From"] = "Shop <news@shop.example.com>"
        mail["To"] = recipient
        mail["Cc"] = "team@shop.example.com"
        mail["Subject"] = "Autumn news"
        mail["Date"] = "Mon, 02 Mar 2026 09:00:00 +0100"
        mail["X-Mailbeacon-Tracking-ID"] = tracking_id
        mail.set_content("Autumn is here.")
        mail.add_alternative("<html><body><h1>Autumn is here</h1></body></html>", subtype="html")
        mail.add_attachment(
            b"%PDF-1.4 price list", maintype="application", subtype="pdf", filename="prices.pdf"
        )
        raw = f"Delivered-To: {recipient}\r\n".encode() + mail.as_bytes()
        (directory / f"20260302T0800{number:02d}-copy{number}.eml").write_bytes(raw)


# -- pure rendering ----------------------------------------------------------------------


def test_y_axis_has_round_ticks_beyond_the_peak() -> None:
    assert y_ticks(0) == [0, 1, 2]
    assert y_ticks(1) == [0, 1, 2]
    assert y_ticks(4) == [0, 1, 2, 3, 4]
    assert y_ticks(7) == [0, 2, 4, 6, 8]
    big = y_ticks(1234)
    assert big[-1] >= 1234 and 3 <= len(big) <= 6 and big[1] in (200, 250, 500)


def test_time_axis_labels_are_distinct_and_reach_both_ends() -> None:
    assert label_ticks(1, (1, 2, 7), 8) == [0]  # one day: one label, not the same one twice
    for slots in (2, 5, 9, 30, 90, 400):
        ticks = label_ticks(slots, (1, 2, 3, 7, 14, 28, 56, 91, 182, 364), 8)
        assert ticks[0] == 0 and ticks[-1] == slots - 1 and len(set(ticks)) == len(ticks) <= 9
    # Hours from 08:00 over five days: labels at midnight and noon, not at 20:00 and 08:00.
    hours = label_ticks(110, (1, 2, 3, 6, 12, 24, 48), 10, phase=-8)
    assert hours[0] == 0 and hours[-1] == 109 and all((i + 8) % 12 == 0 for i in hours[1:-1])


def test_bars_stand_at_their_dates_and_empty_days_keep_their_place() -> None:
    span = Timeline(datetime(2026, 3, 2, tzinfo=UTC), 5, hourly=False)
    svg = bar_chart(span, {0: (4, 3), 4: (2, 2)}, "opens")
    wide = svg.split("</svg>")[0]
    xs = [float(x) for x in re.findall(r'<rect class="all" x="([\d.]+)"', wide)]
    slot = (760 - 46 - 10) / 5
    assert len(xs) == 2 and abs((xs[1] - xs[0]) - 4 * slot) < 0.2  # days 2-4 are empty places
    labels = re.findall(r">(Mar \d+)<", wide)
    assert labels[0] == "Mar 2" and labels[-1] == "Mar 6" and len(labels) == len(set(labels))
    assert [int(t) for t in re.findall(r'text-anchor="end">(\d+)<', wide)] == [0, 1, 2, 3, 4]
    assert 'role="img"' in wide and "from 2026-03-02 to 2026-03-06: 6 in all, 5 by people" in wide


def test_a_month_of_hours_stays_small() -> None:
    span = Timeline(datetime(2026, 3, 1, tzinfo=UTC), 720, hourly=True)
    svg = bar_chart(span, {i: (2, 1) for i in range(0, 720, 3)}, "opens")
    wide = svg.split("</svg>")[0]
    # 240 bars as one outline per kind, no tip each: the table under the chart has the numbers.
    assert "<title>" not in wide and wide.count('<path class="all"') == 1
    assert wide.split('<path class="all" d="')[1].split('"')[0].count("z") == 240
    assert len(svg) < 40_000


def stats(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        **dict.fromkeys(
            [
                "sent_count",
                "failed_count",
                "total_recipients",
                "delivered_count",
                "bounced_count",
                "complained_count",
                "unsubscribed_count",
                "unique_opens",
                "total_opens",
                "human_unique_opens",
                "human_total_opens",
                "unique_clicks",
                "total_clicks",
                "human_unique_clicks",
                "human_total_clicks",
            ],
            0,
        ),
        **dict.fromkeys(
            [
                "delivery_rate",
                "open_rate",
                "click_rate",
                "human_open_rate",
                "human_click_rate",
                "bounce_rate",
            ],
            0.0,
        ),
        "complaint_rate": 0.0,
        "top_links": [],
        "opens_over_time": [],
        "recent_events": [],
        "updated_at": None,
    }
    return {**base, **changes}


def test_cards_lead_with_people_and_say_when_nothing_is_delivered() -> None:
    # One security scanner opened the only copy: "100%" of all opens, no person, no delivery event.
    html = page_sections.headline_cards(stats(sent_count=1, unique_opens=1, total_opens=1, open_rate=0.0))
    leads = re.findall(r'<div class="card lead"><div class="label">([^<]+)', html)
    assert leads == ["Opened by people", "Clicked by people"]
    assert "0.00%" not in html.split("Bounced")[0]  # no rate per delivered copy is made up
    assert "no delivery events yet: configure your provider's webhooks" in html
    assert html.count("no delivery events yet") == 5  # delivered, opens, clicks, complaints, unsubscribes
    delivered = page_sections.headline_cards(
        stats(
            sent_count=4,
            delivered_count=4,
            unique_opens=4,
            open_rate=100.0,
            human_unique_opens=1,
            human_open_rate=25.0,
        )
    )
    assert delivered.index('data-metric="human_open_rate">25.00%') < delivered.index(
        'data-metric="open_rate">100.00%'
    )
    assert "no delivery events yet" not in delivered


async def test_sections_draw_the_insight_fields_and_nothing_when_absent(tmp_path: Path) -> None:
    """The sections drawn from a real statistics read of the seeded campaign."""
    db = open_database(f"sqlite:///{tmp_path / 'sections.db'}")
    try:
        await migrate(db)
        await apply_batch(db, insight_events()[0])
        s = await statistics.read_statistics(db, CAMPAIGN)
    finally:
        await db.dispose()
    clients = page_sections.clients(s)
    assert (
        "Apple Mail" in clients and "60.00%" in clients and "40.00%" in clients
    )  # of people's 5 opened copies
    devices = page_sections.devices(s)
    assert re.search(r"Mobile.*?<td class=num>3</td><td class=num>60.00%", devices)
    providers = page_sections.providers(s)
    assert providers.index("Gmail") < providers.index("Outlook") and "50.00%" in providers  # outlook bounces
    assert 'title="no delivery events yet">&ndash;' in providers  # corp.example: nothing delivered
    assert "security scanner" in page_sections.machines(s)
    heat = page_sections.engagement(s, "Europe/Berlin")
    assert heat.count("<rect") == 2 * 7 * 24 and "Hours in Europe/Berlin" in heat
    over_time = page_sections.over_time(s, hourly=False)
    assert 'id="opens-chart"' in over_time and 'id="clicks-chart"' in over_time
    bare = stats()
    for section in (
        page_sections.clients,
        page_sections.devices,
        page_sections.providers,
        page_sections.machines,
    ):
        assert section(bare) == ""
    assert page_sections.engagement(bare, "UTC") == ""
    assert 'id="clicks-chart"' not in page_sections.over_time(
        {**bare, "opens_over_time": [{"date": "2026-03-02", "opens": 1, "human_opens": 1}]}, False
    )
    empty = stats(
        clients=[],
        devices=dict.fromkeys(["desktop", "mobile"], 0),
        domains=[],
        engagement_heatmap=[[0] * 24] * 7,
    )
    assert "No data yet." in page_sections.clients(empty) and "No data yet." in page_sections.devices(empty)
    assert "No data yet." in page_sections.providers(empty)
    assert "No opens by people yet." in page_sections.engagement(empty, "UTC")


def test_a_copy_shows_how_far_it_got() -> None:
    times = dict.fromkeys(
        [
            "delivered_at",
            "deferred_at",
            "first_opened_at",
            "first_human_opened_at",
            "first_clicked_at",
            "first_human_clicked_at",
            "bounced_at",
            "complained_at",
            "unsubscribed_at",
        ]
    )
    m: dict[str, Any] = {"status": "sent", "bounce_kind": None, **times}
    assert furthest_state(m) == "sent"
    m.update(delivered_at="2026-03-02T08:03:00Z", first_opened_at="2026-03-02T08:05:00Z")
    assert furthest_state(m) == "opened (by a machine only)"
    m.update(first_human_opened_at="2026-03-02T09:00:00Z", first_clicked_at="2026-03-02T09:01:00Z")
    m.update(first_human_clicked_at="2026-03-02T09:01:00Z")
    assert furthest_state(m) == "clicked"
    assert furthest_state({**m, "complained_at": "2026-03-03T00:00:00Z"}) == "complained"
    soft = {**m, "bounced_at": "2026-03-02T08:01:00Z", "bounce_kind": "soft"}
    assert furthest_state(soft) == "clicked"  # delivered after its soft bounce
    assert furthest_state({**soft, "delivered_at": None, "first_human_clicked_at": None}) == "bounced (soft)"
    assert furthest_state({**m, "status": "failed"}) == "failed"
    assert furthest_state({**m, "status": None}) == "waiting for its sent event"


# -- in the browser -------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as launched:
        yield launched


@pytest.mark.slow  # a browser
@NEEDS_CHROMIUM
async def test_statistics_page_updates_itself_from_the_stream(tmp_path: Path, browser: Any) -> None:
    async with insight_site(tmp_path) as (base, db, ids):
        page = await browser.new_page(viewport=DESKTOP)
        violations = csp_violations(page)
        await page.goto(f"{base}/campaigns/{CAMPAIGN}/statistics/")
        await page.wait_for_selector("#live-status.on")  # the stream is followed
        await page.evaluate("window.notReloaded = true")
        before = await metrics_on(page)
        assert before["human_total_opens"] == "7"
        await page.click("#over-time-table summary")  # opened by the reader: stays open
        opened = Event(
            event_id="live-open",
            type=EventType.OPENED,
            tracking_id=ids[6],
            occurred_at=START + timedelta(days=5, hours=3),
            source="pixel",
            user_agent=IPHONE,
        )
        await apply_batch(db, [opened])
        # Within the stream's second, plus the page's own fetch (no eval: the page's CSP forbids it).
        await expect(page.locator("[data-metric=human_total_opens]").first).to_have_text("8", timeout=4000)
        after = await metrics_on(page)
        assert after["human_unique_opens"] == "6" and after["human_open_rate"] == "100.00%"
        assert await page.evaluate("window.notReloaded") is True
        await expect(page.locator("#live-status")).to_have_text("live")  # still said after the swap
        assert await page.locator("#over-time-table[open]").count() == 1
        assert await page.locator("#opens-chart svg.wide rect.people").count() == 4  # a fourth day of opens
        assert violations == []


PAGES = [
    ("statistics", f"/campaigns/{CAMPAIGN}/statistics/?tz=Europe/Berlin"),
    ("statistics-hourly", f"/campaigns/{CAMPAIGN}/statistics/?hourly=true"),
    ("campaigns", "/campaigns/"),
    ("events", f"/campaigns/{CAMPAIGN}/events/"),
    ("message", "/messages/{id}/"),
    ("outbox", "/outbox/"),
    ("outbox-message", "/outbox/20260302T080000-copy0.eml"),
]


@pytest.mark.slow  # a browser
@NEEDS_CHROMIUM
async def test_pages_at_desktop_and_phone_width_are_accessible(tmp_path: Path, browser: Any) -> None:
    async with insight_site(tmp_path) as (base, _, ids):
        problems: dict[str, list[str]] = {}
        for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            context = await browser.new_context(viewport=viewport, is_mobile=width == "phone")
            page = await context.new_page()
            violations = csp_violations(page)
            for name, path in PAGES:
                response = await page.goto(base + path.format(id=ids[0]))
                assert response is not None and response.status == 200, path
                if name.startswith("statistics"):
                    await page.wait_for_selector("#live-status.on")
                await page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
                scroll = await page.evaluate("document.documentElement.scrollWidth")
                assert scroll <= viewport["width"], f"{name} scrolls sideways at {width} width"
                found = await serious_accessibility_problems(page)
                if found:
                    problems[f"{name} ({width})"] = found
            assert violations == []
            await context.close()
        assert problems == {}, "\n".join(f"{k}: {v}" for k, v in problems.items())


@pytest.mark.slow  # a browser
@NEEDS_CHROMIUM
async def test_campaigns_message_and_outbox_pages_say_what_people_ask(tmp_path: Path, browser: Any) -> None:
    async with insight_site(tmp_path) as (base, _, ids):
        page = await browser.new_page(viewport=DESKTOP)
        await page.goto(f"{base}/campaigns/")
        row = (await page.locator("#campaigns tbody tr").first.inner_text()).split("\t")
        # Campaign, first sent, sent, delivered, people's open rate, people's clicks, click rate, bounces
        assert row[:4] == [CAMPAIGN, "2026-03-02 08:00 UTC", "8", "6"]
        assert row[5] == "3" and row[6].startswith("50.00%")

        await page.goto(f"{base}/messages/{ids[0]}/")
        assert await page.locator("[data-metric=state]").inner_text() == "clicked"
        assert "2026-03-02 08:00 UTC" in await page.locator("#facts").inner_text()
        await page.goto(f"{base}/messages/{ids[6]}/")
        assert await page.locator("[data-metric=state]").inner_text() == "opened (by a machine only)"
        assert await page.locator("#recent-events .badge.machine").all_inner_texts() == [
            "automated: apple privacy proxy"
        ]
        await page.goto(f"{base}/messages/{ids[3]}/")
        clicks = page.locator("#recent-events li.t-clicked")
        assert await clicks.count() == 2
        assert await clicks.first.locator(".badge.machine").inner_text() == "automated: security scanner"

        await page.goto(f"{base}/outbox/")
        rows = [r.split("\t") for r in await page.locator("#outbox tbody tr").all_inner_texts()]
        assert sorted(r[3] for r in rows) == RECIPIENTS[:3]
        assert {(r[0], r[2]) for r in rows} == {("2026-03-02 08:00 UTC", CAMPAIGN)}
        await page.locator("#outbox tbody tr", has_text="ann@gmail.com").locator("td:nth-child(2) a").click()
        headers = await page.locator("#headers").inner_text()
        assert "To\tann@gmail.com" in headers and "Cc\tteam@shop.example.com" in headers
        assert f"Campaign\t{CAMPAIGN}" in headers
        assert await page.locator("#attachments li").all_inner_texts() == [
            "prices.pdf application/pdf, 19 bytes"
        ]
        async with aiohttp.ClientSession() as http:
            href = await page.locator("#attachments a").get_attribute("href")
            async with http.get(base + str(href)) as response:
                assert await response.read() == b"%PDF-1.4 price list"
                assert response.headers["Content-Disposition"] == 'attachment; filename="prices.pdf"'
                assert response.headers["Content-Type"] == "application/octet-stream"
            async with http.get(base + str(href).rsplit("/", 1)[0] + "/7") as response:
                assert response.status == 404


def test_times_are_readable() -> None:
    assert pages.when("2026-12-07T15:02:31.123456Z") == "2026-12-07 15:02 UTC"
    assert pages.when(None) == ""
