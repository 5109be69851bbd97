"""The aggregator's pages driven in headless Chromium (Debian's chromium, playwright).

The statistics page shows the right numbers, the "Refresh statistics" button recomputes
them, the events page's filters and pagination filter, a recipient links to its message
timeline, everything works without JavaScript, and screenshots (desktop and phone) are
saved under tests/artifacts/ for people to look at. Every page renders under its
Content-Security-Policy without a violation (a refused stylesheet or style attribute would
silently unstyle it), and a token-protected aggregator is used through its login form.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import text

from aggregator.auth.policy import Access, AuthPolicy, Credential
from aggregator.ingest.ingest import apply_batch
from aggregator.service import create_app
from aggregator.store.db import Database, open_database
from aggregator.store.migrate import migrate
from mailbeacon.contract.events import Event, EventType
from mailbeacon.contract.signing import HONEYPOT_URL
from mailbeacon.web.server import bound_port
from tests.page_support import ARTIFACTS, NEEDS_CHROMIUM, chromium, csp_violations, metrics_on, styled

CAMPAIGN = "default/spring-sale"
LINK_A, LINK_B = "https://shop.example.com/spring?utm=mail", "https://blog.example.com/post"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

pytestmark = [NEEDS_CHROMIUM, pytest.mark.slow]  # a browser


def seed_events() -> tuple[list[Event], list[str]]:
    ids = [str(uuid.uuid4()) for _ in range(6)]
    n = iter(range(10_000))

    def ev(kind: str, who: int | None, minutes: float, **fields: Any) -> Event:
        fields.setdefault("tracking_id", ids[who] if who is not None else None)
        return Event(
            event_id=f"page-{next(n)}",
            type=EventType(kind),
            occurred_at=START + timedelta(minutes=minutes),
            source="webhook:generic",
            **fields,
        )

    events = [ev("sent", i, 0, campaign=CAMPAIGN, recipient=f"r{i}@example.com") for i in range(6)]
    events += [ev("delivered", i, 2) for i in (0, 1, 2, 4)]
    events += [ev("delivered", None, 3, recipient="r3@example.com")]  # address-only webhook
    events += [ev("bounced", 5, 1, bounce_kind="hard", reason="550 5.1.1 user unknown")]
    events += [ev("opened", 0, 60 * k + 30) for k in range(3)]
    events += [ev("opened", 1, 5, machine=True, machine_kind="apple_privacy_proxy")]
    events += [ev("opened", 2, 60 * 26 + k) for k in range(2)]  # the next day
    events += [
        ev("clicked", 0, 40, url=LINK_A),
        ev("clicked", 0, 41, url=LINK_A),
        ev("clicked", 2, 70, url=LINK_B),
    ]
    events += [ev("clicked", 1, 6, url=HONEYPOT_URL, machine=True, machine_kind="honeypot")]
    events += [ev("unsubscribed", 4, 90)]
    # Enough deferrals to need a second page of events.
    events += [ev("deferred", 3, 0.5 + k / 100) for k in range(45)]
    return events, ids


EXPECTED = {
    "sent_count": "6",
    "delivered_count": "5",
    "delivery_rate": "83.33%",
    "human_unique_opens": "2",
    "human_open_rate": "40.00%",
    "unique_opens": "3",
    "open_rate": "60.00%",
    "human_unique_clicks": "2",
    "human_click_rate": "40.00%",
    "unique_clicks": "3",
    "click_rate": "60.00%",
    "bounced_count": "1",
    "bounce_rate": "16.67%",
    "complained_count": "0",
    "unsubscribed_count": "1",
    "total_recipients": "6",
    "total_opens": "6",
    "human_total_opens": "5",
    "total_clicks": "4",
}


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, outbox: Path | None = None, auth: AuthPolicy | None = None
) -> AsyncIterator[tuple[str, Database, list[str]]]:
    db = open_database(f"sqlite:///{tmp_path / 'pages.db'}")
    await migrate(db)
    events, ids = seed_events()
    await apply_batch(db, events[:20])
    await apply_batch(db, events[20:])
    runner = web.AppRunner(create_app(db, outbox, auth=auth))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}", db, ids
    finally:
        await runner.cleanup()
        await db.dispose()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[str, Database, list[str]]]:
    async with serving(tmp_path) as served:
        yield served


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as launched:
        yield launched


async def test_statistics_page_numbers_and_refresh(
    site: tuple[str, Database, list[str]], browser: Any
) -> None:
    base, db, ids = site
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    violations = csp_violations(page)
    await page.goto(f"{base}/campaigns/")
    await page.click(f"text={CAMPAIGN}")
    assert page.url == f"{base}/campaigns/{CAMPAIGN}/statistics/"
    assert await styled(page)
    # The bars of the top links are SVG (no style attribute): the longest fills its cell.
    widths = [
        await bar.get_attribute("width") for bar in await page.query_selector_all("#top-links svg.share rect")
    ]
    assert widths == ["100.0", "50.0"]
    shown = await metrics_on(page)
    assert {k: shown[k] for k in EXPECTED} == EXPECTED
    links = await page.locator("#top-links tbody tr").all_inner_texts()
    assert [row.split("\t")[0].strip() for row in links] == [LINK_A, LINK_B]  # the honeypot is no link
    assert "2\t1" in links[0].replace(" ", "")
    assert await page.locator("#opens-chart svg.wide rect.all").count() == 2  # two days of opens
    # People lead the cards: the first card with a rate is the human open rate.
    assert await page.locator(".card.lead .value").first.get_attribute("data-metric") == "human_unique_opens"
    recent = page.locator("#recent-events li")
    assert await recent.count() == 20
    assert await recent.first.get_attribute("class") == "t-opened"  # newest first, coloured by type
    await page.screenshot(path=str(ARTIFACTS / "statistics-desktop.png"), full_page=True)

    # Statistics that drifted from the events are put right by the button.
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE campaign_stats SET delivered_count = 999"))
    await page.reload()
    assert (await metrics_on(page))["delivered_count"] == "999"
    await page.click("text=Refresh statistics")
    await page.wait_for_selector(".notice")
    assert page.url.endswith("/statistics/?refreshed=1")
    shown = await metrics_on(page)
    assert {k: shown[k] for k in EXPECTED} == EXPECTED

    # A recipient in the timeline opens that copy's own timeline.
    await page.click(f'#recent-events a[href="/messages/{ids[2]}/"] >> nth=0')
    assert await page.locator("h1").inner_text() == f"Message {ids[2]}"
    kinds = await page.locator("#recent-events li .what").all_inner_texts()
    assert kinds == ["sent", "delivered", "clicked", "opened", "opened"]

    phone = await browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    await phone.goto(f"{base}/campaigns/{CAMPAIGN}/statistics/")
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, "the page must not scroll sideways on a phone"
    await phone.screenshot(path=str(ARTIFACTS / "statistics-phone.png"), full_page=True)
    assert violations == []


async def test_events_page_filters_and_pages(site: tuple[str, Database, list[str]], browser: Any) -> None:
    base, _, _ = site
    page = await browser.new_page()
    violations = csp_violations(page)
    await page.goto(f"{base}/campaigns/{CAMPAIGN}/events/")
    rows = page.locator("#events tbody tr")
    assert await rows.count() == 50  # one page of 68 events
    await page.click("#older")
    assert await rows.count() == 18
    await page.goto(f"{base}/campaigns/{CAMPAIGN}/events/")
    await page.check("input[name=type][value=clicked]")
    await page.check("input[name=type][value=bounced]")
    await page.click("text=Filter")
    badges = await page.locator("#events tbody .badge:not(.machine)").all_inner_texts()
    assert sorted(badges) == ["bounced", "clicked", "clicked", "clicked", "clicked"]
    # The honeypot click is marked automated, as automated opens are.
    assert await page.locator("#events tbody .badge.machine").all_inner_texts() == ["automated: honeypot"]
    assert await page.locator("input[name=type][value=clicked]").is_checked()  # the form keeps the filter
    await page.fill("input[name=since]", "2026-03-03")
    await page.click("text=Filter")
    assert await page.locator("#no-events").count() == 1  # no clicks or bounces from that day on
    await page.uncheck("input[name=type][value=clicked]")
    await page.uncheck("input[name=type][value=bounced]")
    await page.check("input[name=type][value=opened]")
    await page.click("text=Filter")
    assert await page.locator("#events tbody .badge:not(.machine)").all_inner_texts() == ["opened", "opened"]
    await page.screenshot(path=str(ARTIFACTS / "events-filtered.png"), full_page=True)
    assert await styled(page) and violations == []


async def test_pages_work_without_javascript(site: tuple[str, Database, list[str]], browser: Any) -> None:
    base, _, _ = site
    context = await browser.new_context(java_script_enabled=False)
    page = await context.new_page()
    violations = csp_violations(page)
    await page.goto(f"{base}/campaigns/{CAMPAIGN}/statistics/")
    assert (await metrics_on(page))["delivered_count"] == "5"
    assert await page.locator("#opens-chart svg.wide").count() == 1
    await page.click("text=Refresh statistics")  # a plain form POST and redirect
    assert await page.locator(".notice").count() == 1
    await page.goto(f"{base}/events/?type=unsubscribed")
    assert await page.locator("#events tbody .badge").all_inner_texts() == ["unsubscribed"]
    await context.close()
    assert violations == []


TOKEN = "page-test-token-0123456789abcdef"
NEWSLETTER = (
    b"From: shop@example.com\r\nDelivered-To: ann@example.com\r\nSubject: Spring sale\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><head><style>h1{color:rgb(200, 30, 30)}</style></head><body><h1>Spring sale</h1>"
    b'<p style="font-size:20px">Everything must go.</p></body></html>\r\n'
)


async def test_log_in_refresh_and_log_out_in_the_browser(tmp_path: Path, browser: Any) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "sale.eml").write_bytes(NEWSLETTER)
    policy = AuthPolicy((Credential(TOKEN.encode(), Access.FULL),))
    async with serving(tmp_path, outbox, policy) as (base, _, _):
        page = await browser.new_page()
        violations = csp_violations(page)
        response = await page.goto(f"{base}/campaigns/{CAMPAIGN}/statistics/")
        assert response is not None and response.status == 401
        assert await styled(page)  # the login page too
        await page.fill("input[name=token]", TOKEN + "-wrong")
        await page.click("form.login button")
        assert await page.locator(".error").inner_text() == "That token is not valid."
        await page.fill("input[name=token]", TOKEN)
        await page.click("form.login button")
        assert page.url == f"{base}/campaigns/{CAMPAIGN}/statistics/"  # back to the page asked for
        assert (await metrics_on(page))["sent_count"] == "6"
        await page.click("text=Refresh statistics")  # a POST with the session's CSRF token
        await page.wait_for_selector(".notice")
        await page.screenshot(path=str(ARTIFACTS / "statistics-logged-in.png"), full_page=True)

        # The outbox shows a message with its own styles in a sandboxed frame of its own.
        await page.goto(f"{base}/outbox/sale.eml")
        frame = page.frame_locator("iframe.message-frame")
        heading = frame.locator("h1")
        assert await heading.inner_text() == "Spring sale"
        assert await heading.evaluate("h => getComputedStyle(h).color") == "rgb(200, 30, 30)"
        assert await frame.locator("p").evaluate("p => getComputedStyle(p).fontSize") == "20px"

        await page.click("form.logout button")
        assert page.url == f"{base}/login"
        await page.goto(f"{base}/events/")
        assert await page.locator("input[name=token]").count() == 1  # logged out
        assert violations == []
