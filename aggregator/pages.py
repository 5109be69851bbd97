"""Server-rendered HTML pages: campaign list and a campaign's statistics. No JavaScript needed."""

from __future__ import annotations

from html import escape
from typing import Any

from aiohttp import web

from aggregator import statistics
from aggregator.api import DB_KEY, campaign_from

STYLE = """
:root{--fg:#1d2430;--muted:#5d6b7e;--line:#e3e8ef;--bg:#f6f8fb;--card:#fff;--accent:#2f6fde}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;
color:var(--fg);background:var(--bg)}header{background:#14213d;color:#fff;padding:.8rem 1rem}
header a{color:#fff;text-decoration:none;margin-right:1rem}main{max-width:72rem;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;margin:.5rem 0 1rem}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(10rem,1fr));gap:.75rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:.75rem}
.card .label{color:var(--muted);font-size:.8rem;text-transform:uppercase;letter-spacing:.03em}
.card .value{font-size:1.6rem;font-weight:600}.card .rate{color:var(--muted)}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line)}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
td.num,th.num{text-align:right}.wrap{overflow-x:auto}td.url{word-break:break-all}
.bar{background:var(--accent);height:.8rem;border-radius:.2rem}
.t-sent{color:#2f6fde}.t-delivered{color:#1a8f4c}.t-opened{color:#7a4cc2}.t-clicked{color:#c2410c}
.t-bounced,.t-failed{color:#c81e1e}.t-complained{color:#9f1239}.t-unsubscribed,.t-deferred{color:#8a6d00}
button{background:var(--accent);color:#fff;border:0;border-radius:.4rem;padding:.5rem .9rem;font-size:1rem}
.muted{color:var(--muted)}
"""


def layout(title: str, body: str) -> web.Response:
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)} · mailbeacon</title><style>{STYLE}</style></head>
<body><header><a href="/campaigns/"><strong>mailbeacon</strong></a><a href="/campaigns/">Campaigns</a>
<a href="/outbox/">Outbox</a></header><main>{body}</main></body></html>"""
    return web.Response(text=page, content_type="text/html")


def card(label: str, value: int, rate: float | None = None, rate_label: str = "") -> str:
    rate_html = f'<div class="rate">{rate:.2f}% {escape(rate_label)}</div>' if rate is not None else ""
    return f'<div class="card"><div class="label">{escape(label)}</div><div class="value">{value}</div>{rate_html}</div>'


async def campaign_list(request: web.Request) -> web.Response:
    campaigns = await statistics.list_campaigns(request.app[DB_KEY])
    rows = "".join(
        f'<tr><td><a href="/campaigns/{escape(c["campaign"])}/statistics/">{escape(c["campaign"])}</a></td>'
        f'<td class="num">{c["sent_count"]}</td><td class="num">{c["delivered_count"]}</td>'
        f'<td class="num">{c["open_rate"]:.2f}%</td><td class="num">{c["click_rate"]:.2f}%</td>'
        f'<td class="num">{c["bounce_rate"]:.2f}%</td></tr>'
        for c in campaigns
    )
    if not rows:
        rows = '<tr><td colspan="6" class="muted">No campaigns yet. Send mail through the proxy.</td></tr>'
    body = (
        "<h1>Campaigns</h1><div class=wrap><table><thead><tr><th>Campaign</th><th class=num>Sent</th>"
        "<th class=num>Delivered</th><th class=num>Open rate</th><th class=num>Click rate</th>"
        f"<th class=num>Bounce rate</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )
    return layout("Campaigns", body)


def _statistics_body(s: dict[str, Any]) -> str:
    cards = "".join(
        [
            card("Recipients", s["total_recipients"]),
            card("Sent", s["sent_count"]),
            card("Delivered", s["delivered_count"], s["delivery_rate"], "of sent"),
            card("Unique opens", s["unique_opens"], s["open_rate"], "of delivered"),
            card("Human opens", s["human_unique_opens"], s["human_open_rate"], "of delivered"),
            card("Unique clicks", s["unique_clicks"], s["click_rate"], "of delivered"),
            card("Human clicks", s["human_unique_clicks"], s["human_click_rate"], "of delivered"),
            card("Bounced", s["bounced_count"], s["bounce_rate"], "of sent"),
            card("Complaints", s["complained_count"], s["complaint_rate"], "of delivered"),
            card("Unsubscribed", s["unsubscribed_count"]),
            card("Failed", s["failed_count"]),
        ]
    )
    links = (
        "".join(
            f'<tr><td class="url">{escape(link["url"])}</td><td class="num">{link["total_clicks"]}</td>'
            f'<td class="num">{link["unique_clicks"]}</td></tr>'
            for link in s["top_links"]
        )
        or '<tr><td colspan="3" class="muted">No clicks yet.</td></tr>'
    )
    peak = max((point["opens"] for point in s["opens_over_time"]), default=0) or 1
    chart = (
        "".join(
            f'<tr><td>{escape(point["date"])}</td><td style="width:70%"><div class="bar" '
            f'style="width:{100 * point["opens"] / peak:.1f}%"></div></td><td class="num">{point["opens"]}</td></tr>'
            for point in s["opens_over_time"]
        )
        or '<tr><td colspan="3" class="muted">No opens yet.</td></tr>'
    )
    events = (
        "".join(
            f'<tr><td>{escape(e["occurred_at"] or "")}</td><td class="t-{escape(e["type"])}">{escape(e["type"])}'
            f'</td><td>{escape(e["recipient"] or "")}</td><td class="url">{escape(e["detail"])}</td></tr>'
            for e in s["recent_events"]
        )
        or '<tr><td colspan="4" class="muted">No events yet.</td></tr>'
    )
    return (
        f'<div class="cards">{cards}</div>'
        f"<h2>Top links</h2><div class=wrap><table><thead><tr><th>Link</th><th class=num>Clicks</th>"
        f"<th class=num>Unique</th></tr></thead><tbody>{links}</tbody></table></div>"
        f"<h2>Opens over time</h2><div class=wrap><table><tbody>{chart}</tbody></table></div>"
        f"<h2>Recent events</h2><div class=wrap><table><thead><tr><th>Time (UTC)</th><th>Event</th>"
        f"<th>Recipient</th><th>Detail</th></tr></thead><tbody>{events}</tbody></table></div>"
    )


async def campaign_page(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    campaign = campaign_from(request)
    if not await statistics.campaign_exists(db, campaign):
        raise web.HTTPNotFound(text=f"no campaign {campaign}")
    stats = await statistics.read_statistics(db, campaign)
    body = (
        f"<h1>{escape(campaign)}</h1>"
        f'<form method="post" action="/campaigns/{escape(campaign)}/refresh/">'
        '<button type="submit">Refresh statistics</button></form><p></p>' + _statistics_body(stats)
    )
    return layout(campaign, body)


async def refresh_form(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    campaign = campaign_from(request)
    if not await statistics.campaign_exists(db, campaign):
        raise web.HTTPNotFound(text=f"no campaign {campaign}")
    await statistics.refresh(db, campaign)
    raise web.HTTPSeeOther(f"/campaigns/{campaign}/statistics/")


def add_page_routes(app: web.Application) -> None:
    async def home(_: web.Request) -> web.Response:
        raise web.HTTPFound("/campaigns/")

    app.router.add_get("/", home)
    app.router.add_get("/campaigns/", campaign_list)
    app.router.add_get("/campaigns/{ns}/{name}/statistics/", campaign_page)
    app.router.add_post("/campaigns/{ns}/{name}/refresh/", refresh_form)
