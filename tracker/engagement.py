"""What recipients hit: the open pixel, signed click redirects and the unsubscribe page.

These answer at once and never wait on NATS: their events go to the publisher's bounded
buffer (clicks first sit out the scanner-burst window), so a recipient sees the image,
the destination or the confirmation even while NATS is unreachable.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mailbeacon import signing
from mailbeacon.events import Event, EventType, derived_event_id, parse_tracking_id, utcnow
from mailbeacon.jetstream import EventPublisher
from mailbeacon.settings import Settings
from mailbeacon.web import json_error
from tracker import classify, metrics, pages
from tracker.bursts import ClickHold
from tracker.privacy import anonymize_ip, client_ip

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
REDIRECT_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
ONE_CLICK = "One-Click"


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_tracking_id(value: str) -> str | None:
    """``parse_tracking_id`` with a fast path for the canonical form our links carry."""
    return value if _CANONICAL_UUID.fullmatch(value) else parse_tracking_id(value)


# Field names in declaration order (which the JSON follows), with their plain defaults or,
# for fields built by a factory, the factory.
_FIELDS = tuple(
    (name, info if info.default_factory is not None else None, info.default)
    for name, info in Event.model_fields.items()
)


def trusted_event(**values: Any) -> Event:
    """An Event from values already in canonical form, without pydantic's validation.

    This runs on every pixel load and click; the tracker produced every value itself
    (canonical tracking id, UTC time), so validating them again only costs time. The
    result equals ``Event(**values)`` (a test holds it to that).
    """
    fields = {
        name: values[name]
        if name in values
        else (factory.get_default(call_default_factory=True) if factory else default)
        for name, factory, default in _FIELDS
    }
    event = Event.__new__(Event)
    object.__setattr__(event, "__dict__", fields)
    object.__setattr__(event, "__pydantic_fields_set__", set(values))
    object.__setattr__(event, "__pydantic_extra__", None)
    object.__setattr__(event, "__pydantic_private__", None)
    return event


class Engagement:
    def __init__(self, settings: Settings, publisher: EventPublisher, hold: ClickHold) -> None:
        self.settings = settings
        self.publisher = publisher
        self.hold = hold
        self.keys = settings.signing_keys()
        self.trusted = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies]
        self.machine_networks = [
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.machine_ip_ranges
        ]

    def _client(self, request: web.Request) -> tuple[str | None, str | None]:
        """The real client address (for classification) and the one we may keep."""
        address = client_ip(request.remote, request.headers.get("X-Forwarded-For"), self.trusted)
        kept = anonymize_ip(address) if address and self.settings.anonymize_ip else address
        return address, kept or None

    def _event(
        self,
        request: web.Request,
        event_type: EventType,
        tracking_id: str,
        verdict: classify.Verdict | None,
        **fields: Any,
    ) -> Event:
        address, kept = self._client(request)
        user_agent = request.headers.get("User-Agent", "")[:500] or None
        if verdict is None:
            kind: classify.Engagement = "open" if event_type is EventType.OPENED else "click"
            shape = classify.RequestShape(request.method, user_agent, address, request.headers)
            verdict = classify.classify(kind, shape, self.machine_networks)
        metadata = fields.pop("metadata", {})
        if verdict.machine:
            metadata["machine_evidence"] = verdict.evidence
        metrics.count_engagement(event_type.value, verdict.machine_kind or "human")
        return trusted_event(
            event_id=os.urandom(16).hex(),  # random, like new_event_id(), at a fraction of uuid4's cost
            type=event_type,
            tracking_id=tracking_id,
            occurred_at=utcnow(),
            ip=kept,
            user_agent=user_agent,
            machine=verdict.machine,
            machine_kind=verdict.machine_kind,
            metadata=metadata,
            **fields,
        )

    async def pixel(self, request: web.Request) -> web.StreamResponse:
        tracking_id = canonical_tracking_id(request.match_info["tracking_id"])
        if tracking_id is None:
            return json_error(400, "tracking id is not a UUID")
        self.publisher.publish_later(
            self._event(request, EventType.OPENED, tracking_id, None, source="pixel")
        )
        metrics.PIXEL_REQUESTS.inc()
        return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_STORE)

    async def click(self, request: web.Request) -> web.StreamResponse:
        tracking_id = canonical_tracking_id(request.match_info["tracking_id"])
        url = request.query.get("url", "")
        signature = request.query.get("sig", "")
        if tracking_id is None:
            return pages.invalid_link("The tracking id is malformed.")
        honeypot = url == signing.HONEYPOT_URL
        if not honeypot and not url.lower().startswith(("http://", "https://")):
            return pages.invalid_link("The destination is missing or not a web address.")
        if not signing.verify_click(self.keys, tracking_id, url, signature):
            metrics.REQUESTS.labels("click_forged").inc()
            return pages.invalid_link("The link's signature does not match.")
        verdict = classify.honeypot() if honeypot else None
        event = self._event(request, EventType.CLICKED, tracking_id, verdict, url=url, source="click")
        self.hold.add(event)
        if honeypot:
            metrics.REQUESTS.labels("click_honeypot").inc()
            return pages.honeypot()
        metrics.CLICK_REQUESTS.inc()
        # A plain response rather than raising HTTPFound: same answer, without exception handling.
        return web.Response(status=302, headers={"Location": url, **REDIRECT_HEADERS})

    async def unsubscribe_page(self, request: web.Request) -> web.StreamResponse:
        if parse_tracking_id(request.match_info["tracking_id"]) is None:
            return pages.invalid_link("The unsubscribe link is malformed.")
        metrics.REQUESTS.labels("unsubscribe_page").inc()
        return pages.unsubscribe_confirm(request.path)

    async def unsubscribe(self, request: web.Request) -> web.StreamResponse:
        tracking_id = parse_tracking_id(request.match_info["tracking_id"])
        if tracking_id is None:
            return pages.invalid_link("The unsubscribe link is malformed.")
        try:
            form = await request.post()
        except (ValueError, HttpProcessingError):  # no multipart boundary, broken part headers, ...
            return pages.unsubscribe_refused("The request body is not a form.")
        one_click = form.get("List-Unsubscribe") == ONE_CLICK
        if not one_click and "confirm" not in form:
            return pages.unsubscribe_refused(
                "An unsubscribe request must carry List-Unsubscribe=One-Click (RFC 8058) or the form's button."
            )
        _, kept = self._client(request)
        event = Event(
            # One unsubscribe per copy: a repeated POST (double click, retry) is the same event.
            event_id=derived_event_id("unsubscribe", tracking_id),
            type=EventType.UNSUBSCRIBED,
            tracking_id=tracking_id,
            occurred_at=utcnow(),
            ip=kept,
            user_agent=request.headers.get("User-Agent", "")[:500] or None,
            source="unsubscribe",
            metadata={"via": "one_click" if one_click else "page"},
        )
        await self.publisher.publish_or_buffer(event)
        metrics.REQUESTS.labels("unsubscribe").inc()
        return pages.unsubscribed()
