"""The tracker's HTTP app: routes wired to the engagement and webhook handlers.

Pixel and click answer at once and hand their event to the publisher's buffer, so a
recipient never waits on NATS; webhooks answer 2xx only after JetStream stored the
event, so a provider retries whatever we could not keep.
"""

from __future__ import annotations

from aiohttp import web

from mailbeacon.jetstream import EventPublisher
from mailbeacon.settings import Settings
from mailbeacon.web import add_health_routes, json_errors
from tracker.bursts import ClickHold
from tracker.engagement import NO_STORE, PIXEL_GIF, Engagement
from tracker.esp.sns import HttpGet, https_get
from tracker.metrics import REQUEST_LATENCY
from tracker.openapi import openapi_document
from tracker.webhooks import Webhooks

__all__ = ["HOLD_KEY", "NO_STORE", "PIXEL_GIF", "PUBLISHER_KEY", "SETTINGS_KEY", "create_app"]

SETTINGS_KEY = web.AppKey("settings", Settings)
PUBLISHER_KEY = web.AppKey("publisher", EventPublisher)
HOLD_KEY = web.AppKey("click_hold", ClickHold)


def create_app(
    settings: Settings, publisher: EventPublisher, *, sns_http_get: HttpGet = https_get
) -> web.Application:
    """``sns_http_get`` is the one outbound HTTP call (SNS certificates, subscription confirmation)."""
    app = web.Application(middlewares=[json_errors], client_max_size=settings.max_webhook_bytes)
    hold = ClickHold(publisher.publish_later, window=settings.click_burst_seconds)
    app[SETTINGS_KEY] = settings
    app[PUBLISHER_KEY] = publisher
    app[HOLD_KEY] = hold
    engagement = Engagement(settings, publisher, hold)
    webhooks = Webhooks(settings, publisher, sns_http_get)
    document = openapi_document(settings.site_url)

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(document)

    timed = REQUEST_LATENCY.timed
    pixel, click = timed("pixel", engagement.pixel), timed("click", engagement.click)
    unsubscribe_page = timed("unsubscribe_page", engagement.unsubscribe_page)
    unsubscribe, generic = timed("unsubscribe", engagement.unsubscribe), timed("webhook", webhooks.generic)
    for suffix in ("/", ""):
        app.router.add_get(f"/track/pixel/{{tracking_id}}{suffix}", pixel)  # GET also answers HEAD
        app.router.add_get(f"/track/click/{{tracking_id}}{suffix}", click)
        app.router.add_get(f"/track/unsubscribe/{{tracking_id}}{suffix}", unsubscribe_page)
        app.router.add_post(f"/track/unsubscribe/{{tracking_id}}{suffix}", unsubscribe)
        app.router.add_post(f"/track/{{kind:bounce|delivery|complaint}}{suffix}", generic)
    app.router.add_post("/webhooks/{provider}", timed("webhook", webhooks.provider))
    app.router.add_get("/openapi.json", openapi)
    add_health_routes(app)
    return app
