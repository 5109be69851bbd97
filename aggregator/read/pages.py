"""Server-rendered HTML pages: campaign list and a campaign's statistics.

Every page works without JavaScript (charts are inline SVG, forms are plain GET/POST) and
reflows to one column on a phone. The statistics page follows the campaign's live stream
when scripts run (``/static/live.js``). Numbers carry ``data-metric`` attributes so tests
and scripts can read them without scraping the layout.
"""

from __future__ import annotations

import hashlib
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from sqlalchemy import select

from aggregator.auth.context import CSRF_FIELD, PageAuth, page_auth
from aggregator.auth.login import LOGOUT_PATH, STYLESHEET_PATH
from aggregator.read import page_sections as sections
from aggregator.read import statistics
from aggregator.read.api import DB_KEY, campaign_from
from aggregator.read.live import HUB_KEY, View, parse_zone, read_view, zone_applied
from aggregator.read.series import BadZone
from aggregator.store.db import Database
from aggregator.store.models import CAMPAIGNS, EVENTS
from aggregator.store.times import as_utc, iso_utc
from mailbeacon.contract.events import EventType
from mailbeacon.web.server import Handler

SCRIPT_PATH = "/static/live.js"
STYLE = resources.files("aggregator.read.static").joinpath("mailbeacon.css").read_text(encoding="utf-8")
SCRIPT = resources.files("aggregator.read.static").joinpath("live.js").read_text(encoding="utf-8")
LIVE_HEADER = "X-Mailbeacon-Live"


def _header(page: PageAuth) -> str:
    """The navigation, and for a login session who is in and a way out."""
    links = (
        '<a href="/campaigns/"><strong>mailbeacon</strong></a><a href="/campaigns/">Campaigns</a>'
        '<a href="/events/">All events</a><a href="/outbox/">Outbox</a>'
    )
    if not page.can_change:
        links += '<span class="badge" title="this token may only read">read-only</span>'
    if page.can_log_out:
        links += (
            f'<form class="logout" method="post" action="{LOGOUT_PATH}">{csrf_input(page)}'
            '<button type="submit">Log out</button></form>'
        )
    return links


def csrf_input(page: PageAuth) -> str:
    return f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(page.csrf)}">'


def layout(
    request: web.Request, title: str, body: str, status: int = 200, script: bool = False
) -> web.Response:
    """A page of the site: its stylesheet and script are files of their own, as the
    Content-Security-Policy allows no inline style or script."""
    tag = f'<script src="{SCRIPT_PATH}" defer></script>' if script else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)} · mailbeacon</title><link rel="stylesheet" href="{STYLESHEET_PATH}">{tag}</head>
<body><header>{_header(page_auth(request))}</header><main>{body}</main></body></html>"""
    return web.Response(text=page, content_type="text/html", status=status)


def not_found(request: web.Request, what: str) -> web.Response:
    return layout(request, "Not found", f"<h1>Not found</h1><p>{escape(what)}</p>", status=404)


def _static(text: str, content_type: str) -> Handler:
    tag = '"' + hashlib.sha256(text.encode()).hexdigest()[:16] + '"'

    async def serve(request: web.Request) -> web.Response:
        """Revalidated on each visit (an ETag), so an upgrade restyles at once."""
        headers = {"ETag": tag, "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == tag:
            return web.Response(status=304, headers=headers)
        return web.Response(text=text, content_type=content_type, headers=headers)

    return serve


def when(iso: str | None) -> str:
    """``2026-03-02T09:30:12.000000Z`` as ``2026-03-02 09:30 UTC`` (all times on pages are UTC)."""
    if not iso:
        return ""
    return as_utc(iso).strftime("%Y-%m-%d %H:%M UTC")


def moment(iso: str | None) -> str:
    """A time for people, with the exact one for machines and on hover."""
    if not iso:
        return ""
    return f'<time datetime="{escape(iso)}" title="{escape(iso)}">{escape(when(iso))}</time>'


def machine_badge(e: dict[str, Any]) -> str:
    """Automated opens and clicks (privacy proxies, scanners, the honeypot) say so, everywhere."""
    if not e.get("machine"):
        return ""
    kind = str(e.get("machine_kind") or "machine").replace("_", " ")
    return f'<span class="badge machine" title="classified as automated, not a person">automated: {escape(kind)}</span>'


def event_detail(e: dict[str, Any]) -> str:
    """What the event says; the badge already tells an automated open's kind."""
    if e.get("machine") and e["type"] == EventType.OPENED.value:
        return ""
    return str(e["detail"] or "")


def _who(e: dict[str, Any]) -> str:
    if e["tracking_id"]:
        return f'<a href="/messages/{escape(e["tracking_id"])}/">{escape(e["recipient"] or e["tracking_id"])}</a> '
    return escape(e["recipient"] or "")


def timeline(events: list[dict[str, Any]], one_message: bool = False) -> str:
    """Events newest or oldest first as given; ``one_message``: all of one copy, so each line
    leaves out whose it is."""
    items = "".join(
        f'<li class="t-{escape(e["type"])}"><span class="what">{escape(e["type"])}</span>{machine_badge(e)} '
        f'<span class="when">{moment(e["occurred_at"])}</span><br>'
        + ("" if one_message else _who(e))
        + f'<span class="detail muted">{escape(event_detail(e))}</span></li>'
        for e in events
    )
    return (
        f'<ul class="timeline" id="recent-events">{items}</ul>'
        if items
        else '<p class="muted">No events yet.</p>'
    )


def refresh_button(page: PageAuth, base: str) -> str:
    """The "Refresh statistics" form with its CSRF token; none for read-only access."""
    if not page.can_change:
        return ""
    return (
        f'<form method="post" action="{base}/refresh/">{csrf_input(page)}'
        '<button type="submit">Refresh statistics</button></form>'
    )


async def first_sent(db: Database) -> dict[str, str | None]:
    """When each campaign's first copy went out: the oldest of its ``sent`` events, found at
    the start of its (campaign, time) index range."""
    e = EVENTS.c
    oldest = (
        select(e.occurred_at)
        .where(e.campaign == CAMPAIGNS.c.key, e.type == EventType.SENT.value)
        .order_by(e.occurred_at)
        .limit(1)
        .scalar_subquery()
    )
    async with db.read_engine.connect() as conn:
        rows = await conn.execute(select(CAMPAIGNS.c.key, oldest))
        return {key: iso_utc(at) for key, at in rows.all()}


def _rate_cell(c: dict[str, Any], human: str, everything: str, css: str = "") -> str:
    if not c["delivered_count"]:
        return f'<td class="num muted {css}" title="{sections.NO_DELIVERY}">{sections.NONE}</td>'
    return (
        f'<td class="num {css}">{sections.percent(c[human])}'
        f' <span class="muted hide-narrow">(all {sections.percent(c[everything])})</span></td>'
    )


def _narrow_rate(c: dict[str, Any], human: str) -> str:
    """On a phone the click rate column gives way; the rate goes under the count."""
    if not c["delivered_count"]:
        return ""
    return f'<div class="show-narrow muted small">{sections.percent(c[human])}</div>'


async def campaign_list(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    campaigns = await statistics.list_campaigns(db)
    started = await first_sent(db)
    rows = "".join(
        f'<tr><th scope=row><a href="/campaigns/{escape(c["campaign"])}/statistics/">{escape(c["campaign"])}</a>'
        f'<div class="show-narrow muted small">{when(started.get(c["campaign"])) or "not sent yet"}</div></th>'
        f'<td class="hide-narrow">{moment(started.get(c["campaign"])) or "<span class=muted>not sent yet</span>"}</td>'
        f'<td class="num">{c["sent_count"]:,}</td><td class="num hide-narrow">{c["delivered_count"]:,}</td>'
        f"{_rate_cell(c, 'human_open_rate', 'open_rate')}"
        f'<td class="num">{c["human_unique_clicks"]:,}{_narrow_rate(c, "human_click_rate")}</td>'
        f"{_rate_cell(c, 'human_click_rate', 'click_rate', 'hide-narrow')}"
        f'<td class="num hide-narrow">{sections.percent(c["bounce_rate"])}</td></tr>'
        for c in campaigns
    )
    if not rows:
        rows = '<tr><td colspan="8" class="muted">No campaigns yet. Send mail through the proxy.</td></tr>'
    body = (
        "<h1>Campaigns</h1><div class=wrap><table id=campaigns><thead><tr><th scope=col>Campaign</th>"
        "<th class=hide-narrow scope=col>First sent</th><th class=num scope=col>Sent</th>"
        "<th class='num hide-narrow' scope=col>Delivered</th><th class=num scope=col>Open rate</th>"
        "<th class=num scope=col>Clicks</th><th class='num hide-narrow' scope=col>Click rate</th>"
        f"<th class='num hide-narrow' scope=col>Bounce rate</th></tr></thead><tbody>{rows}</tbody></table></div>"
        "<p class=muted>Opens, clicks and their rates count people (copies opened or clicked by a person, "
        "per delivered copy); in brackets with machines too.</p>"
    )
    return layout(request, "Campaigns", body)


def _zone_form(base: str, view: View) -> str:
    hourly = '<input type="hidden" name="hourly" value="true">' if view.hourly else ""
    zones = "".join(
        f'<option value="{z}">'
        for z in (
            "UTC",
            "Europe/London",
            "Europe/Berlin",
            "America/New_York",
            "America/Los_Angeles",
            "Asia/Tokyo",
        )
    )
    return (
        f'<form class="inline" method="get" action="{base}/statistics/">{hourly}'
        '<label for="tz">Time zone</label>'
        f'<input type="text" id="tz" name="tz" list="zones" value="{escape(view.tz or "UTC")}" size="16">'
        f'<datalist id="zones">{zones}</datalist><button type="submit">Show</button></form>'
    )


def live_part(s: dict[str, Any], campaign: str, view: View) -> str:
    """Everything on the page that the live stream updates (``#live``)."""
    base = f"/campaigns/{escape(campaign)}"
    query = urlencode(
        {k: v for k, v in (("hourly", "true" if view.hourly else ""), ("tz", view.tz or "")) if v}
    )
    other = {k: v for k, v in (("hourly", "" if view.hourly else "true"), ("tz", view.tz or "")) if v}
    toggle = f'<a href="{base}/statistics/{"?" + escape(urlencode(other)) if other else ""}">per {"day" if view.hourly else "hour"}</a>'
    stream = f"/api/campaigns/{escape(campaign)}/stream" + (f"?{escape(query)}" if query else "")
    zone = str(s.get("tz") or zone_applied(view) or "UTC")
    heat = sections.engagement(s, zone)
    pair = "".join(
        f"<section><h2>{title}</h2>{html}</section>"
        for title, html in (("Mail clients", sections.clients(s)), ("Devices", sections.devices(s)))
        if html
    )
    providers = sections.providers(s)
    return (
        f'<div id="live" data-stream="{stream}" data-updated="{escape(s["updated_at"] or "")}">'
        f'<p class="muted">Updated {moment(s["updated_at"]) or "never"} '
        '<span id="live-status" class="live" role="status"></span></p>'
        f"{sections.headline_cards(s)}"
        f"<h2>Opens and clicks over time <small class=muted>({toggle})</small></h2>"
        f"{sections.over_time(s, view.hourly)}"
        + (f"<h2>When people open</h2>{_zone_form(base, view)}{heat}" if heat else "")
        + f"<h2>People and machines</h2>{sections.people_and_machines(s)}{sections.machines(s)}"
        + (f'<div class="pair">{pair}</div>' if pair else "")
        + (f"<h2>Mailbox providers</h2>{providers}" if providers else "")
        + f"<h2>Top links</h2>{sections.top_links(s)}"
        f"<h2>Recent events</h2>{timeline(s['recent_events'])}</div>"
    )


async def campaign_page(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    page = page_auth(request)
    campaign = campaign_from(request)
    try:
        view = View(request.query.get("hourly") == "true", parse_zone(request.query.get("tz")))
    except BadZone as exc:
        return layout(
            request, campaign, f"<h1>{escape(campaign)}</h1><p class=error>{escape(str(exc))}</p>", 400
        )
    # The live script's request right after an update: the snapshot just streamed, no read.
    s = request.app[HUB_KEY].snapshot(campaign, view) if request.headers.get(LIVE_HEADER) else None
    if s is None:
        if not await statistics.campaign_exists(db, campaign):
            return not_found(request, f"There is no campaign {campaign}.")
        s = await read_view(db, campaign, view)
    base = f"/campaigns/{escape(campaign)}"
    notice = (
        f'<div class="notice" role="status">Statistics recomputed from the stored events at {moment(s["updated_at"])}.</div>'
        if request.query.get("refreshed")
        else ""
    )
    body = (
        f"<h1>{escape(campaign)}</h1>{notice}<div class=bar-row>"
        f"{refresh_button(page, base)}"
        f'<a class="button plain" href="{base}/events/">Events</a>'
        f'<a class="button plain" href="/api/campaigns/{escape(campaign)}/export.csv">Export CSV</a></div>'
        f"{live_part(s, campaign, view)}"
    )
    return layout(request, campaign, body, script=True)


async def refresh_form(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    campaign = campaign_from(request)
    if not await statistics.campaign_exists(db, campaign):
        return not_found(request, f"There is no campaign {campaign}.")
    await statistics.refresh(db, campaign)
    raise web.HTTPSeeOther(f"/campaigns/{campaign}/statistics/?refreshed=1")


def add_page_routes(app: web.Application) -> None:
    async def home(_: web.Request) -> web.Response:
        raise web.HTTPFound("/campaigns/")

    app.router.add_get("/", home)
    app.router.add_get(STYLESHEET_PATH, _static(STYLE, "text/css"))
    app.router.add_get(SCRIPT_PATH, _static(SCRIPT, "text/javascript"))
    app.router.add_get("/campaigns/", campaign_list)
    app.router.add_get("/campaigns/{ns}/{name}/statistics/", campaign_page)
    app.router.add_post("/campaigns/{ns}/{name}/refresh/", refresh_form)
