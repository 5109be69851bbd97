"""The aggregator's JSON API (DESIGN.md "Aggregator" routes)."""

from __future__ import annotations

import json

from aiohttp import web

from aggregator import statistics
from aggregator.db import Database
from mailbeacon.campaigns import CampaignKey, InvalidCampaign
from mailbeacon.web import json_error

DB_KEY = web.AppKey("db", Database)


def campaign_from(request: web.Request) -> str:
    """The ``{ns}/{name}`` of the route as a campaign key; a 400 for names Kubernetes would refuse."""
    try:
        return str(CampaignKey.parse(f"{request.match_info['ns']}/{request.match_info['name']}"))
    except InvalidCampaign as exc:
        body = json.dumps({"status": "error", "error": str(exc)})
        raise web.HTTPBadRequest(text=body, content_type="application/json") from exc


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


async def list_campaigns(request: web.Request) -> web.Response:
    return web.json_response({"campaigns": await statistics.list_campaigns(request.app[DB_KEY])})


async def campaign_statistics(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    campaign = campaign_from(request)
    if not await statistics.campaign_exists(db, campaign):
        return json_error(404, f"no campaign {campaign}")
    if _flag(request, "refresh"):
        await statistics.refresh(db, campaign)
    return web.json_response(await statistics.read_statistics(db, campaign, hourly=_flag(request, "hourly")))


async def refresh_statistics(request: web.Request) -> web.Response:
    db = request.app[DB_KEY]
    campaign = campaign_from(request)
    if not await statistics.campaign_exists(db, campaign):
        return json_error(404, f"no campaign {campaign}")
    return web.json_response(await statistics.refresh(db, campaign))


def add_api_routes(app: web.Application) -> None:
    app.router.add_get("/api/campaigns", list_campaigns)
    app.router.add_get("/api/campaigns/{ns}/{name}/statistics", campaign_statistics)
    app.router.add_post("/api/campaigns/{ns}/{name}/refresh", refresh_statistics)
