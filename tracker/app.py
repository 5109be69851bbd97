"""The tracker's HTTP app: routes wired to the engagement and webhook handlers.

Pixel and click answer at once and hand their event to the publisher's buffer, so a
recipient never waits on NATS; webhooks answer 2xx only after JetStream stored the
event, so a provider retries whatever we could not keep.

The app runs no middleware: aiohttp would wrap every pixel and click in two more
coroutines for it. Each route is timed and guarded by one wrapper instead (failures
answered as :func:`mailbeacon.web.server.json_errors` answers them), and a last catch-all route
answers paths and methods nobody serves with a JSON 404 or 405.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.settings import Settings
from mailbeacon.web.server import Handler, add_health_routes, json_error
from tracker.engagement.engagement import NO_STORE, PIXEL_GIF, Engagement
from tracker.metrics import REGISTRY, REQUEST_LATENCY
from tracker.openapi import openapi_document
from tracker.webhooks.esp.sns import HttpGet, https_getter
from tracker.webhooks.webhooks import Webhooks

__all__ = ["ENGAGEMENT_KEY", "NO_STORE", "PIXEL_GIF", "PUBLISHER_KEY", "SETTINGS_KEY", "create_app"]

log = logging.getLogger(__name__)

SETTINGS_KEY = web.AppKey("settings", Settings)
PUBLISHER_KEY = web.AppKey("publisher", EventPublisher)
ENGAGEMENT_KEY = web.AppKey("engagement", Engagement)


def failure_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """What ``json_errors`` makes of a handler's failure: HTTP errors as JSON, anything else
    a logged 503 (a provider retries it; a 500 with a traceback would leak internals)."""
    if isinstance(exc, web.HTTPException):
        if exc.status < 400 or exc.content_type == "application/json":
            raise exc
        return json_error(exc.status, exc.reason)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return json_error(503, "temporarily unavailable, retry later")


def guarded(handler: Handler) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return failure_answer(request, exc)

    return answer


async def nothing_here(request: web.Request) -> web.StreamResponse:
    """The last route: a JSON 405 (with Allow) where the path is served, else a JSON 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        response = json_error(405, "Method Not Allowed")
        response.headers["Allow"] = ",".join(sorted(allowed))
        return response
    return json_error(404, "Not Found")


def create_app(
    settings: Settings,
    publisher: EventPublisher,
    *,
    sns_http_get: HttpGet | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> web.Application:
    """``sns_http_get`` is the one outbound HTTP call (SNS certificates, subscription confirmation);
    by default over HTTPS_PROXY / NO_PROXY as the settings say. ``ready`` answers /readyz: the
    tracker serves without NATS, so it is ready until it begins to stop."""
    app = web.Application(client_max_size=settings.tracker.max_webhook_bytes)
    app[SETTINGS_KEY] = settings
    app[PUBLISHER_KEY] = publisher
    engagement = Engagement(settings, publisher)
    app[ENGAGEMENT_KEY] = engagement
    outbound = sns_http_get or https_getter(settings.tracker.https_proxy, settings.tracker.no_proxy)
    webhooks = Webhooks(settings, publisher, outbound)
    document = openapi_document(settings.site_url)

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(document)

    def timed(route: str, handler: Handler) -> Handler:
        return REQUEST_LATENCY.timed(route, handler, on_error=failure_answer)

    pixel = REQUEST_LATENCY.timed_answer("pixel", engagement.pixel, failure_answer)
    click = REQUEST_LATENCY.timed_answer("click", engagement.click, failure_answer)
    unsubscribe_page = timed("unsubscribe_page", engagement.unsubscribe_page)
    unsubscribe, generic = timed("unsubscribe", engagement.unsubscribe), timed("webhook", webhooks.generic)
    for suffix in ("/", ""):
        app.router.add_get(f"/track/pixel/{{tracking_id}}{suffix}", pixel)  # GET also answers HEAD
        app.router.add_get(f"/track/click/{{tracking_id}}{suffix}", click)
        app.router.add_get(f"/track/unsubscribe/{{tracking_id}}{suffix}", unsubscribe_page)
        app.router.add_post(f"/track/unsubscribe/{{tracking_id}}{suffix}", unsubscribe)
        app.router.add_post(f"/track/{{kind:bounce|delivery|complaint}}{suffix}", generic)
    app.router.add_post("/webhooks/{provider}", timed("webhook", webhooks.provider))
    app.router.add_get("/openapi.json", guarded(openapi))
    # The shared health and metrics routes, guarded like the others.
    health = web.Application()
    add_health_routes(health, ready=ready, registry=REGISTRY)
    for route in health.router.routes():
        app.router.add_route(route.method, route.resource.canonical, guarded(route.handler))  # type: ignore[union-attr]
    # [\s\S]: "." would miss a path with a decoded newline, which aiohttp then answers as text.
    app.router.add_route("*", r"/{path:[\s\S]*}", nothing_here)
    return app
