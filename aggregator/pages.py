"""Server-rendered HTML pages: campaign list and a campaign's statistics.

Every page works without JavaScript (the chart is inline SVG, forms are plain GET/POST)
and reflows to one column on a phone. Numbers carry ``data-metric`` attributes so tests
and scripts can read them without scraping the layout.
"""

from __future__ import annotations

import hashlib
from html import escape
from typing import Any

from aiohttp import web

from aggregator import statistics
from aggregator.api import DB_KEY, campaign_from
from aggregator.auth.context import CSRF_FIELD, PageAuth, page_auth
from aggregator.auth.login import LOGOUT_PATH, STYLESHEET_PATH

STYLE = """
:root{--fg:#1d2430;--muted:#5d6b7e;--line:#e3e8ef;--bg:#f6f8fb;--card:#fff;--accent:#2f6fde}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;
color:var(--fg);background:var(--bg)}header{background:#14213d;color:#fff;padding:.7rem 1rem;display:flex;
flex-wrap:wrap;gap:.3rem 1rem;align-items:center}header a{color:#fff;text-decoration:none}
main{max-width:72rem;margin:0 auto;padding:1rem}a{color:var(--accent)}
h1{font-size:1.4rem;margin:.3rem 0 .8rem;word-break:break-word}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
.bar-row{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center;margin-bottom:1rem}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(9.5rem,1fr));gap:.75rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:.75rem}
.card .label{color:var(--muted);font-size:.78rem;text-transform:uppercase;letter-spacing:.03em}
.card .value{font-size:1.6rem;font-weight:600}.card .rate{color:var(--muted);font-size:.9rem}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line)}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
td.num,th.num{text-align:right;white-space:nowrap}.wrap{overflow-x:auto}td.url{word-break:break-all}
.share{display:block;width:100%;height:.5rem;margin-top:.2rem}.share rect{fill:var(--accent);opacity:.25}
.chart{background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:.5rem}
.chart svg{width:100%;height:auto;display:block}.chart .total{fill:#9db8ee}.chart .human{fill:var(--accent)}
.legend{font-size:.85rem;color:var(--muted)}.legend i{display:inline-block;width:.8rem;height:.8rem;
border-radius:.15rem;margin:0 .3rem 0 .8rem;vertical-align:-.1rem}.legend i.total{background:#9db8ee}
.legend i.human{background:#2f6fde}
.timeline{list-style:none;margin:0;padding:0;background:var(--card);border:1px solid var(--line);border-radius:.5rem}
.timeline li{padding:.5rem .75rem .5rem 1.6rem;border-bottom:1px solid var(--line);position:relative}
.timeline li:before{content:"";position:absolute;left:.6rem;top:.85rem;width:.55rem;height:.55rem;
border-radius:50%;background:currentColor}.timeline .when{color:var(--muted);font-size:.85rem}
.timeline .what{font-weight:600}.timeline .detail{word-break:break-all;color:var(--fg)}
.t-sent{color:#2f6fde}.t-delivered{color:#1a8f4c}.t-opened{color:#7a4cc2}.t-clicked{color:#c2410c}
.t-bounced,.t-failed{color:#c81e1e}.t-complained{color:#9f1239}.t-unsubscribed,.t-deferred{color:#8a6d00}
.badge{display:inline-block;border:1px solid currentColor;border-radius:1rem;padding:0 .5rem;font-size:.8rem}
button,.button{background:var(--accent);color:#fff;border:0;border-radius:.4rem;padding:.5rem .9rem;
font-size:1rem;text-decoration:none;cursor:pointer;display:inline-block}.button.plain{background:#e8eef9;color:var(--accent)}
.notice{background:#e7f6ec;border:1px solid #b7e1c4;border-radius:.4rem;padding:.5rem .75rem;margin-bottom:1rem}
.muted{color:var(--muted)}form.filters{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:flex-end;
background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:.75rem;margin-bottom:1rem}
form.filters fieldset{border:0;padding:0;margin:0;display:flex;flex-wrap:wrap;gap:.2rem .8rem}
form.filters label{font-size:.9rem}input[type=date]{font:inherit;padding:.3rem}
header .badge{color:#fff}header form.logout{margin:0 0 0 auto}header form.logout button{background:none;
border:1px solid #fff;padding:.15rem .6rem;font-size:.9rem}form.login{display:flex;flex-direction:column;gap:.5rem;
max-width:24rem;background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:1rem}
form.login input{font:inherit;padding:.4rem}.error{color:#c81e1e}
.message-frame{width:100%;height:70vh;border:1px solid var(--line);background:#fff}
@media (max-width:40rem){main{padding:.6rem}.hide-narrow{display:none}.card .value{font-size:1.35rem}}
"""


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


def layout(request: web.Request, title: str, body: str, status: int = 200) -> web.Response:
    """A page of the site: its stylesheet is a file of its own (``STYLESHEET_PATH``), as the
    Content-Security-Policy allows no inline style."""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)} · mailbeacon</title><link rel="stylesheet" href="{STYLESHEET_PATH}"></head>
<body><header>{_header(page_auth(request))}</header><main>{body}</main></body></html>"""
    return web.Response(text=page, content_type="text/html", status=status)


def not_found(request: web.Request, what: str) -> web.Response:
    return layout(request, "Not found", f"<h1>Not found</h1><p>{escape(what)}</p>", status=404)


_STYLE_TAG = '"' + hashlib.sha256(STYLE.encode()).hexdigest()[:16] + '"'


async def stylesheet(request: web.Request) -> web.Response:
    """The pages' CSS; revalidated on each visit (an ETag), so an upgrade restyles at once."""
    headers = {"ETag": _STYLE_TAG, "Cache-Control": "no-cache"}
    if request.headers.get("If-None-Match") == _STYLE_TAG:
        return web.Response(status=304, headers=headers)
    return web.Response(text=STYLE, content_type="text/css", headers=headers)


def card(label: str, metric: str, value: int, rate: float | None = None, rate_label: str = "") -> str:
    rate_html = (
        f'<div class="rate"><span data-metric="{metric}_rate">{rate:.2f}%</span> {escape(rate_label)}</div>'
        if rate is not None
        else ""
    )
    return (
        f'<div class="card"><div class="label">{escape(label)}</div>'
        f'<div class="value" data-metric="{metric}">{value:,}</div>{rate_html}</div>'
    )


def _share(part: int, whole: int) -> float:
    return round(part * 100.0 / whole, 2) if whole else 0.0


async def campaign_list(request: web.Request) -> web.Response:
    campaigns = await statistics.list_campaigns(request.app[DB_KEY])
    rows = "".join(
        f'<tr><td><a href="/campaigns/{escape(c["campaign"])}/statistics/">{escape(c["campaign"])}</a></td>'
        f'<td class="num">{c["sent_count"]:,}</td><td class="num hide-narrow">{c["delivered_count"]:,}</td>'
        f'<td class="num">{c["open_rate"]:.2f}%</td><td class="num">{c["click_rate"]:.2f}%</td>'
        f'<td class="num hide-narrow">{c["bounce_rate"]:.2f}%</td></tr>'
        for c in campaigns
    )
    if not rows:
        rows = '<tr><td colspan="6" class="muted">No campaigns yet. Send mail through the proxy.</td></tr>'
    body = (
        "<h1>Campaigns</h1><div class=wrap><table><thead><tr><th>Campaign</th><th class=num>Sent</th>"
        "<th class='num hide-narrow'>Delivered</th><th class=num>Open rate</th><th class=num>Click rate</th>"
        f"<th class='num hide-narrow'>Bounce rate</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )
    return layout(request, "Campaigns", body)


def key_metrics(s: dict[str, Any]) -> str:
    """The key metrics of docs/architecture.md "Statistics", each with its rate."""
    return "".join(
        [
            card("Sent", "sent_count", s["sent_count"], None),
            card("Delivered", "delivered_count", s["delivered_count"], s["delivery_rate"], "delivery rate"),
            card("Opened", "unique_opens", s["unique_opens"], s["open_rate"], "open rate"),
            card("Clicked", "unique_clicks", s["unique_clicks"], s["click_rate"], "click rate"),
            card("Bounced", "bounced_count", s["bounced_count"], s["bounce_rate"], "bounce rate"),
            card(
                "Complaints", "complained_count", s["complained_count"], s["complaint_rate"], "complaint rate"
            ),
            card(
                "Unsubscribed",
                "unsubscribed_count",
                s["unsubscribed_count"],
                _share(s["unsubscribed_count"], s["delivered_count"]),
                "of delivered",
            ),
            card("Recipients", "total_recipients", s["total_recipients"]),
            card(
                "Failed",
                "failed_count",
                s["failed_count"],
                _share(s["failed_count"], s["sent_count"] + s["failed_count"]),
                "of attempted",
            ),
        ]
    )


def human_vs_total(s: dict[str, Any]) -> str:
    def row(noun: str, key: str) -> str:
        return (
            f"<tr><th>{noun}</th>"
            f'<td class="num" data-metric="unique_{key}">{s[f"unique_{key}"]:,}</td>'
            f'<td class="num" data-metric="human_unique_{key}">{s[f"human_unique_{key}"]:,}</td>'
            f'<td class="num hide-narrow" data-metric="total_{key}">{s[f"total_{key}"]:,}</td>'
            f'<td class="num hide-narrow" data-metric="human_total_{key}">{s[f"human_total_{key}"]:,}</td>'
            f'<td class="num">{s[f"{key[:-1]}_rate"]:.2f}% / {s[f"human_{key[:-1]}_rate"]:.2f}%</td></tr>'
        )

    return (
        "<div class=wrap><table><thead><tr><th></th><th class=num>Messages (all)</th>"
        "<th class=num>Messages (people)</th><th class='num hide-narrow'>Events (all)</th>"
        "<th class='num hide-narrow'>Events (people)</th><th class=num>Rate all / people</th></tr></thead>"
        f"<tbody>{row('Opens', 'opens')}{row('Clicks', 'clicks')}</tbody></table></div>"
        "<p class=muted>People leaves out opens and clicks classified as automated "
        "(privacy proxies, link scanners, the hidden honeypot link).</p>"
    )


def share_bar(part: int, whole: int) -> str:
    """A bar as long as ``part`` of ``whole``: an SVG rectangle, whose width is an attribute,
    because the Content-Security-Policy refuses inline ``style`` (no 'unsafe-inline')."""
    return (
        '<svg class="share" viewBox="0 0 100 1" preserveAspectRatio="none" aria-hidden="true">'
        f'<rect width="{100 * part / whole:.1f}" height="1"/></svg>'
    )


def top_links(s: dict[str, Any]) -> str:
    links = s["top_links"]
    peak = max((link["total_clicks"] for link in links), default=0) or 1
    rows = "".join(
        f'<tr><td class="url">{escape(link["url"])}{share_bar(link["total_clicks"], peak)}</td>'
        f'<td class="num">{link["total_clicks"]:,}</td><td class="num">{link["unique_clicks"]:,}</td></tr>'
        for link in links
    )
    rows = rows or '<tr><td colspan="3" class="muted">No clicks yet.</td></tr>'
    return (
        "<div class=wrap><table id=top-links><thead><tr><th>Link</th><th class=num>Clicks</th>"
        f"<th class=num>Messages</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


def opens_chart(points: list[dict[str, Any]], hourly: bool) -> str:
    """Opens per day (or hour) as an SVG bar chart: all opens, and those by people."""
    if not points:
        return '<p class="muted">No opens yet.</p>'
    key = "hour" if hourly else "date"
    width, height, pad = 640, 180, 24
    peak = max(p["opens"] for p in points) or 1
    step = (width - 2 * pad) / len(points)
    bar = max(1.0, step * 0.8)
    shapes = []
    for i, p in enumerate(points):
        x = pad + i * step + (step - bar) / 2
        h_all = (height - 2 * pad) * p["opens"] / peak
        h_people = (height - 2 * pad) * p["human_opens"] / peak
        label = f"{p[key]}: {p['opens']} opens, {p['human_opens']} by people"
        shapes.append(
            f"<g><title>{escape(label)}</title>"
            f'<rect class="total" x="{x:.1f}" y="{height - pad - h_all:.1f}" width="{bar:.1f}" height="{h_all:.1f}"/>'
            f'<rect class="human" x="{x:.1f}" y="{height - pad - h_people:.1f}" width="{bar:.1f}" height="{h_people:.1f}"/></g>'
        )
    first, last = points[0][key], points[-1][key]
    axis = (
        f'<text x="{pad}" y="{height - 6}" font-size="11" fill="#5d6b7e">{escape(first)}</text>'
        f'<text x="{width - pad}" y="{height - 6}" font-size="11" fill="#5d6b7e" text-anchor="end">{escape(last)}</text>'
        f'<text x="{pad}" y="14" font-size="11" fill="#5d6b7e">{peak:,}</text>'
    )
    return (
        f'<div class="chart"><svg viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Opens per {key}">{"".join(shapes)}{axis}</svg>'
        '<div class="legend"><i class="total"></i>all opens<i class="human"></i>by people</div></div>'
    )


def when(iso: str | None) -> str:
    """``2026-03-02T09:30:00.000000Z`` as ``2026-03-02 09:30:00`` (all times on pages are UTC)."""
    return (iso or "")[:19].replace("T", " ")


def timeline(events: list[dict[str, Any]]) -> str:
    items = "".join(
        f'<li class="t-{escape(e["type"])}"><span class="what">{escape(e["type"])}</span> '
        f'<span class="when">{escape(when(e["occurred_at"]))} UTC</span><br>'
        + (
            f'<a href="/messages/{escape(e["tracking_id"])}/">{escape(e["recipient"] or e["tracking_id"])}</a> '
            if e["tracking_id"]
            else escape(e["recipient"] or "")
        )
        + f'<span class="detail muted">{escape(e["detail"])}</span></li>'
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


async def campaign_page(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    page = page_auth(request)
    campaign = campaign_from(request)
    if not await statistics.campaign_exists(db, campaign):
        return not_found(request, f"There is no campaign {campaign}.")
    hourly = request.query.get("hourly") == "true"
    s = await statistics.read_statistics(db, campaign, hourly=hourly)
    base = f"/campaigns/{escape(campaign)}"
    notice = (
        f'<div class="notice" role="status">Statistics recomputed from the stored events at {escape(s["updated_at"] or "")}.</div>'
        if request.query.get("refreshed")
        else ""
    )
    toggle = (
        f'<a href="{base}/statistics/">per day</a>'
        if hourly
        else f'<a href="{base}/statistics/?hourly=true">per hour</a>'
    )
    body = (
        f"<h1>{escape(campaign)}</h1>{notice}<div class=bar-row>"
        f"{refresh_button(page, base)}"
        f'<a class="button plain" href="{base}/events/">Events</a>'
        f'<a class="button plain" href="/api/campaigns/{escape(campaign)}/export.csv">Export CSV</a>'
        f'<span class="muted">updated {escape(s["updated_at"] or "never")}</span></div>'
        f'<div class="cards">{key_metrics(s)}</div>'
        f"<h2>People and machines</h2>{human_vs_total(s)}"
        f"<h2>Top links</h2>{top_links(s)}"
        f"<h2>Opens over time <small class=muted>({toggle})</small></h2>{opens_chart(s['opens_over_time'], hourly)}"
        f"<h2>Recent events</h2>{timeline(s['recent_events'])}"
    )
    return layout(request, campaign, body)


async def refresh_form(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    campaign = campaign_from(request)
    if not await statistics.campaign_exists(db, campaign):
        return not_found(request, f"There is no campaign {campaign}.")
    await statistics.refresh(db, campaign)
    raise web.HTTPSeeOther(f"/campaigns/{campaign}/statistics/?refreshed=1")


def add_page_routes(app: web.Application) -> None:
    from aggregator.event_pages import add_event_page_routes

    async def home(_: web.Request) -> web.Response:
        raise web.HTTPFound("/campaigns/")

    app.router.add_get("/", home)
    app.router.add_get(STYLESHEET_PATH, stylesheet)
    app.router.add_get("/campaigns/", campaign_list)
    app.router.add_get("/campaigns/{ns}/{name}/statistics/", campaign_page)
    app.router.add_post("/campaigns/{ns}/{name}/refresh/", refresh_form)
    add_event_page_routes(app)
