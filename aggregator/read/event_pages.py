"""HTML pages over stored events: a campaign's events, all events, one message's timeline."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from aggregator.read import queries, statistics
from aggregator.read.api import DB_KEY, campaign_from
from aggregator.read.pages import event_detail, layout, machine_badge, moment, not_found, timeline
from mailbeacon.contract.events import EventType


def _filters_form(action: str, flt: queries.EventFilter, query: Any) -> str:
    chosen = set(flt.types)
    boxes = "".join(
        f'<label class="t-{t.value}"><input type="checkbox" name="type" value="{t.value}"'
        f"{' checked' if t.value in chosen else ''}> {t.value}</label>"
        for t in EventType
    )
    return (
        f'<form class="filters" method="get" action="{escape(action)}"><fieldset><legend class=muted>Types</legend>{boxes}</fieldset>'
        f'<label>From <input type="date" name="since" value="{escape(query.get("since", ""))}"></label>'
        f'<label>To <input type="date" name="until" value="{escape(query.get("until", ""))}"></label>'
        f'<button type="submit">Filter</button><a href="{escape(action)}">Clear</a></form>'
    )


def _rows(events: list[dict[str, Any]], with_campaign: bool) -> str:
    rows = []
    for e in events:
        who = (
            f'<a href="/messages/{escape(e["tracking_id"])}/">{escape(e["recipient"] or e["tracking_id"])}</a>'
            if e["tracking_id"]
            else escape(e["recipient"] or "")
        )
        waiting = (
            ""
            if e["applied"]
            else ' <span class="badge muted" title="its message is not known yet">waiting</span>'
        )
        campaign = f'<td class="hide-narrow">{escape(e["campaign"] or "")}</td>' if with_campaign else ""
        rows.append(
            f'<tr class="event"><td class="num when">{moment(e["occurred_at"])}</td>'
            f'<td><span class="badge t-{escape(e["type"])}">{escape(e["type"])}</span>{machine_badge(e)}{waiting}</td>'
            f'{campaign}<td class="who">{who}</td><td class="url hide-narrow">{escape(event_detail(e))}</td></tr>'
        )
    return "".join(rows)


async def _events_page(request: web.Request, campaign: str | None, action: str, title: str) -> web.Response:
    db = request.app[DB_KEY]
    try:
        flt = queries.parse_filter(request.query, campaign)
        events, following = await queries.list_events(
            db, flt, queries.DEFAULT_LIMIT, request.query.get("cursor")
        )
    except queries.BadQuery as exc:
        return layout(
            request,
            title,
            f"<h1>{escape(title)}</h1><p>{escape(str(exc))}</p><p><a href='{escape(action)}'>Show all</a></p>",
            400,
        )
    kept = [(k, v) for k, v in request.query.items() if k in ("type", "since", "until")]
    more = (
        f'<p><a class="button plain" id="older" href="{escape(action)}?{escape(urlencode([*kept, ("cursor", following)]))}">Older events</a></p>'
        if following
        else ""
    )
    csv = (
        f' <a class="button plain" href="/api/campaigns/{escape(campaign)}/export.csv?{escape(urlencode(kept))}">Download CSV</a>'
        if campaign
        else ""
    )
    back = f'<a href="/campaigns/{escape(campaign)}/statistics/">Statistics</a>' if campaign else ""
    head = "<th class='hide-narrow' scope=col>Campaign</th>" if campaign is None else ""
    table = (
        "<div class=wrap tabindex=0><table id=events><thead><tr><th class=num scope=col>Time</th><th scope=col>Event</th>"
        f"{head}<th scope=col>Recipient</th><th class='hide-narrow' scope=col>Detail</th></tr></thead>"
        f"<tbody>{_rows(events, campaign is None)}</tbody></table></div>"
        if events
        else '<p class="muted" id="no-events">No events match.</p>'
    )
    body = (
        f'<h1>{escape(title)}</h1><div class="bar-row">{back}{csv}</div>'
        f"{_filters_form(action, flt, request.query)}{table}{more}"
    )
    return layout(request, title, body)


async def campaign_events_page(request: web.Request) -> web.Response:
    campaign = campaign_from(request)
    if not await statistics.campaign_exists(request.app[DB_KEY], campaign):
        return not_found(request, f"There is no campaign {campaign}.")
    return await _events_page(request, campaign, f"/campaigns/{campaign}/events/", f"Events of {campaign}")


async def all_events_page(request: web.Request) -> web.Response:
    return await _events_page(request, None, "/events/", "All events")


def campaign_link(campaign: str | None) -> str:
    if not campaign:
        return ""
    return f'<a href="/campaigns/{escape(campaign)}/statistics/">{escape(campaign)}</a>'


def furthest_state(m: dict[str, Any]) -> str:
    """How far the copy got, from the first-seen times: a copy opened and clicked is
    "clicked", not the "sent" its row's status keeps. A complaint or unsubscribe is the last
    thing a recipient does; a bounce counts unless a delivery came after it (a soft bounce
    retried)."""
    if m["status"] is None:
        return "waiting for its sent event"
    if m["status"] == "failed":
        return "failed"
    if m["complained_at"]:
        return "complained"
    if m["unsubscribed_at"]:
        return "unsubscribed"
    if m["bounced_at"] and not (m["delivered_at"] and m["delivered_at"] > m["bounced_at"]):
        return f"bounced ({m['bounce_kind']})" if m["bounce_kind"] else "bounced"
    for noun, human, anyone in (
        ("clicked", "first_human_clicked_at", "first_clicked_at"),
        ("opened", "first_human_opened_at", "first_opened_at"),
    ):
        if m[human]:
            return noun
        if m[anyone]:
            return f"{noun} (by a machine only)"
    if m["delivered_at"]:
        return "delivered"
    if m["deferred_at"]:
        return "deferred"
    return str(m["status"])


async def message_page(request: web.Request) -> web.Response:
    try:
        m = await queries.message_timeline(request.app[DB_KEY], request.match_info["tracking_id"])
    except queries.BadQuery as exc:
        return layout(request, "Message", f"<h1>Message</h1><p>{escape(str(exc))}</p>", 400)
    if m is None:
        return not_found(request, "No message has this tracking id.")
    state = furthest_state(m)
    kind = state.split(" ", 1)[0]
    facts: list[tuple[str, str | None]] = [
        ("Recipient", escape(m["recipient"] or "(not known yet)")),
        ("Campaign", campaign_link(m["campaign"])),
        ("Status", f'<span class="state t-{escape(kind)}" data-metric="state">{escape(state)}</span>'),
        ("Message-ID", escape(m["message_id"] or "")),
        ("Sent", moment(m["sent_at"])),
        ("Delivered", moment(m["delivered_at"])),
        ("First opened", moment(m["first_opened_at"])),
        ("First opened by a person", moment(m["first_human_opened_at"])),
        ("First clicked", moment(m["first_clicked_at"])),
        ("First clicked by a person", moment(m["first_human_clicked_at"])),
        (
            "Bounced",
            f"{moment(m['bounced_at'])} ({escape(m['bounce_kind'] or '')})" if m["bounced_at"] else None,
        ),
        ("Complained", moment(m["complained_at"])),
        ("Unsubscribed", moment(m["unsubscribed_at"])),
        ("Opens / clicks", f"{m['open_count']} / {m['click_count']}"),
    ]
    rows = "".join(f"<tr><th scope=row>{escape(k)}</th><td>{v}</td></tr>" for k, v in facts if v)
    body = (
        f"<h1>Message {escape(m['tracking_id'])}</h1><div class=wrap tabindex=0><table id=facts>{rows}</table></div>"
        f"<h2>Timeline</h2>{timeline(m['events'], one_message=True)}"
    )
    return layout(request, "Message", body)


def add_event_page_routes(app: web.Application) -> None:
    app.router.add_get("/campaigns/{ns}/{name}/events/", campaign_events_page)
    app.router.add_get("/events/", all_events_page)
    app.router.add_get("/messages/{tracking_id}/", message_page)
