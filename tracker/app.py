"""The tracker's HTTP app: pixel, signed click redirect and the generic webhooks.

Pixel and click answer at once and hand their event to the publisher's buffer, so a
recipient never waits on NATS; webhooks answer 2xx only after JetStream stored the
event, so a provider retries whatever we could not keep.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from html import escape

from aiohttp import web

from mailbeacon import signing
from mailbeacon.events import Event, EventType, new_event_id, parse_tracking_id, utcnow
from mailbeacon.jetstream import EventPublisher
from mailbeacon.settings import Settings
from mailbeacon.web import add_health_routes, json_error, json_errors
from tracker import metrics
from tracker.generic_webhooks import WebhookError, parse_generic
from tracker.privacy import anonymize_ip, client_ip

log = logging.getLogger(__name__)

# The classic 43-byte 1x1 transparent GIF.
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
NO_STORE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
SETTINGS_KEY = web.AppKey("settings", Settings)
PUBLISHER_KEY = web.AppKey("publisher", EventPublisher)

_INVALID_LINK_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Invalid link</title></head>
<body style="font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem">
<h1>This link is not valid</h1><p>{reason}</p>
<p>The link may have been altered or cut off. Please use the original link from the email.</p>
</body></html>"""


class _Requests:
    def __init__(self, settings: Settings, publisher: EventPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.keys = settings.signing_keys()
        self.trusted = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies]

    def ip(self, request: web.Request) -> str | None:
        address = client_ip(request.remote, request.headers.get("X-Forwarded-For"), self.trusted)
        if address and self.settings.anonymize_ip:
            return anonymize_ip(address)
        return address

    def engagement(
        self, request: web.Request, event_type: EventType, tracking_id: str, **fields: object
    ) -> Event:
        machine_kind = "head_request" if request.method == "HEAD" else None
        return Event(
            event_id=new_event_id(),
            type=event_type,
            tracking_id=tracking_id,
            occurred_at=utcnow(),
            ip=self.ip(request),
            user_agent=request.headers.get("User-Agent", "")[:500] or None,
            machine=machine_kind is not None,
            machine_kind=machine_kind,
            **fields,
        )

    async def pixel(self, request: web.Request) -> web.StreamResponse:
        tracking_id = parse_tracking_id(request.match_info["tracking_id"])
        if tracking_id is None:
            return json_error(400, "tracking id is not a UUID")
        event = self.engagement(request, EventType.OPENED, tracking_id, source="pixel")
        self.publisher.publish_later(event)
        metrics.REQUESTS.labels("pixel").inc()
        return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_STORE)

    async def click(self, request: web.Request) -> web.StreamResponse:
        tracking_id = parse_tracking_id(request.match_info["tracking_id"])
        url = request.query.get("url", "")
        signature = request.query.get("sig", "")
        if tracking_id is None:
            return self._invalid_link("The tracking id is malformed.")
        if not url.lower().startswith(("http://", "https://")):
            return self._invalid_link("The destination is missing or not a web address.")
        if not signing.verify_click(self.keys, tracking_id, url, signature):
            metrics.REQUESTS.labels("click_forged").inc()
            return self._invalid_link("The link's signature does not match.")
        event = self.engagement(request, EventType.CLICKED, tracking_id, url=url, source="click")
        self.publisher.publish_later(event)
        metrics.REQUESTS.labels("click").inc()
        raise web.HTTPFound(url, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    def _invalid_link(self, reason: str) -> web.Response:
        page = _INVALID_LINK_PAGE.format(reason=escape(reason))
        return web.Response(status=400, text=page, content_type="text/html")

    def _token_ok(self, request: web.Request) -> bool:
        token = self.settings.webhook_token
        if token is None:
            return True
        expected = token.get_secret_value()
        auth = request.headers.get("Authorization", "")
        offered = (
            auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("X-Webhook-Token", "")
        )
        return hmac.compare_digest(offered.encode(), expected.encode())

    async def generic_webhook(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if not self._token_ok(request):
            return json_error(401, "missing or wrong webhook token")
        if request.content_length and request.content_length > self.settings.max_webhook_bytes:
            return json_error(413, "body too large")
        try:
            body = await request.read()
            event, answer = parse_generic(kind, body, utcnow())
        except WebhookError as exc:
            return json_error(exc.status, exc.reason)
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, "body too large")
        try:
            await self.publisher.publish(event)
        except Exception as exc:
            log.warning("webhook event not stored (%s); asking the sender to retry", exc)
            return json_error(503, "event store unavailable, retry later")
        metrics.REQUESTS.labels(f"webhook_generic_{kind}").inc()
        return web.json_response({"status": "success", "message": answer})


def create_app(settings: Settings, publisher: EventPublisher) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=settings.max_webhook_bytes)
    app[SETTINGS_KEY] = settings
    app[PUBLISHER_KEY] = publisher
    handlers = _Requests(settings, publisher)
    for suffix in ("/", ""):
        app.router.add_get(f"/track/pixel/{{tracking_id}}{suffix}", handlers.pixel)
        app.router.add_get(f"/track/click/{{tracking_id}}{suffix}", handlers.click)  # GET also answers HEAD
        app.router.add_post(f"/track/{{kind:bounce|delivery|complaint}}{suffix}", handlers.generic_webhook)
    add_health_routes(app)
    return app
