"""The aggregator's JSON API (docs/architecture.md "Interfaces": docs/aggregator.md "API").

Bad input (a campaign name Kubernetes would refuse, an unknown event type, a malformed
date or cursor, a tracking id that is no UUID) gets a 400 with a JSON reason.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import tzinfo

from aiohttp import web

from aggregator.read import queries, statistics
from aggregator.read.series import BadZone, parse_zone
from aggregator.store.db import Database
from mailbeacon.contract.campaigns import CampaignKey, InvalidCampaign
from mailbeacon.web.server import json_error

DB_KEY = web.AppKey("db", Database)


def _bad_request(reason: str) -> web.HTTPBadRequest:
    body = json.dumps({"status": "error", "error": reason})
    return web.HTTPBadRequest(text=body, content_type="application/json")


def campaign_from(request: web.Request) -> str:
    """The ``{ns}/{name}`` of the route as a campaign key; a 400 for names Kubernetes would refuse."""
    try:
        return str(CampaignKey.parse(f"{request.match_info['ns']}/{request.match_info['name']}"))
    except InvalidCampaign as exc:
        raise _bad_request(str(exc)) from exc


def event_filter(request: web.Request, campaign: str | None) -> queries.EventFilter:
    try:
        return queries.parse_filter(request.query, campaign)
    except queries.BadQuery as exc:
        raise _bad_request(str(exc)) from exc


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def flag(request: web.Request, name: str) -> bool:
    """A yes/no query parameter; anything else is a 400 rather than a silent "no"."""
    value = request.query.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise web.HTTPBadRequest(
        text=json.dumps({"status": "error", "error": f"{name} must be true or false"}),
        content_type="application/json",
    )


async def known_campaign(request: web.Request) -> str:
    campaign = campaign_from(request)
    if not await statistics.campaign_exists(request.app[DB_KEY], campaign):
        raise web.HTTPNotFound(
            text=json.dumps({"status": "error", "error": f"no campaign {campaign}"}),
            content_type="application/json",
        )
    return campaign


async def list_campaigns(request: web.Request) -> web.Response:
    return web.json_response({"campaigns": await statistics.list_campaigns(request.app[DB_KEY])})


def time_zone(request: web.Request) -> tzinfo:
    """``tz``: the IANA time zone of the engagement heatmap (UTC when absent); else a 400."""
    try:
        return parse_zone(request.query.get("tz"))
    except BadZone as exc:
        raise _bad_request(str(exc)) from exc


async def campaign_statistics(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    campaign = await known_campaign(request)
    hourly, zone = flag(request, "hourly"), time_zone(request)
    if flag(request, "refresh"):
        await statistics.refresh(db, campaign)
    return web.json_response(await statistics.read_statistics(db, campaign, hourly=hourly, zone=zone))


async def refresh_statistics(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    campaign = await known_campaign(request)
    return web.json_response(await statistics.refresh(db, campaign))


async def _events_page(request: web.Request, campaign: str | None) -> web.Response:
    flt = event_filter(request, campaign)
    try:
        limit = queries.parse_limit(request.query.get("limit"))
        events, following = await queries.list_events(
            request.app[DB_KEY], flt, limit, request.query.get("cursor")
        )
    except queries.BadQuery as exc:
        raise _bad_request(str(exc)) from exc
    return web.json_response({"events": events, "next_cursor": following})


async def campaign_events(request: web.Request) -> web.Response:
    return await _events_page(request, await known_campaign(request))


async def all_events(request: web.Request) -> web.Response:
    """The admin view: every stored event, optionally narrowed to one campaign."""
    campaign = None
    if request.query.get("campaign"):
        try:
            campaign = str(CampaignKey.parse(request.query["campaign"]))
        except InvalidCampaign as exc:
            raise _bad_request(str(exc)) from exc
    return await _events_page(request, campaign)


async def export_csv(request: web.Request) -> web.StreamResponse:
    """The campaign's events as CSV, written to the client a chunk at a time."""
    campaign = await known_campaign(request)
    flt = event_filter(request, campaign)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{campaign.replace("/", "_")}-events.csv"',
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(queries.CSV_COLUMNS)
    rows = 0
    async for event in queries.stream_events(request.app[DB_KEY], flt):
        writer.writerow([queries.csv_cell(event[column]) for column in queries.CSV_COLUMNS])
        rows += 1
        if rows % 500 == 0:
            await response.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
    await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


async def message_timeline(request: web.Request) -> web.Response:
    try:
        timeline = await queries.message_timeline(request.app[DB_KEY], request.match_info["tracking_id"])
    except queries.BadQuery as exc:
        raise _bad_request(str(exc)) from exc
    if timeline is None:
        return json_error(404, "no message with this tracking id")
    return web.json_response(timeline)


def add_api_routes(app: web.Application) -> None:
    app.router.add_get("/api/campaigns", list_campaigns)
    app.router.add_get("/api/campaigns/{ns}/{name}/statistics", campaign_statistics)
    app.router.add_post("/api/campaigns/{ns}/{name}/refresh", refresh_statistics)
    app.router.add_get("/api/campaigns/{ns}/{name}/events", campaign_events)
    app.router.add_get("/api/campaigns/{ns}/{name}/export.csv", export_csv)
    app.router.add_get("/api/events", all_events)
    app.router.add_get("/api/messages/{tracking_id}", message_timeline)
