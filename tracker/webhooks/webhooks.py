"""Webhook endpoints: the generic JSON ones and ``POST /webhooks/{provider}``.

A webhook is answered 2xx only after JetStream acknowledged every event it carried;
otherwise 503, so the provider retries and nothing is lost. Credentials, size and depth
are checked before the body is read as JSON (``tracker.webhooks.webhook_limits``), signatures
before it is interpreted, and a signed request's replay key in the bucket every worker
shares (``tracker.webhooks.replay``); an authentic request we cannot use is still acknowledged so
the provider stops retrying it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import Any

from aiohttp import web
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from pydantic import ValidationError

from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.events import Event, utcnow
from mailbeacon.contract.netaddr import anonymize_ip, anonymize_text, scrub_ips
from mailbeacon.contract.settings import Settings
from mailbeacon.web.server import json_error
from tracker import metrics
from tracker.webhooks import webhook_limits
from tracker.webhooks.esp import ADAPTERS, Adapter
from tracker.webhooks.esp.base import ParseContext, VerifyContext, WebhookRequest
from tracker.webhooks.esp.sns import Certificates, HttpGet
from tracker.webhooks.generic_webhooks import WebhookError, parse_generic
from tracker.webhooks.replay import Claim, ReplayGuardUnavailable, SharedReplayGuard

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    pass


def invalid_event(exc: ValidationError) -> web.Response:
    """A payload whose values the event contract refuses: the sender's to fix, so a 400
    rather than a 5xx that would make the provider retry it for days."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "event"
    return json_error(400, f"{where}: {first['msg']}"[:300])


class Webhooks:
    def __init__(self, settings: Settings, publisher: EventPublisher, sns_http_get: HttpGet) -> None:
        self.settings = settings
        self.tracker = settings.tracker  # read per request
        self.publisher = publisher
        self.credentials_required = webhook_limits.credentials_required(settings)
        self.replays = SharedReplayGuard(settings, self._jetstream)
        self.certificates = Certificates(settings.tracker.sns_cert_dir, sns_http_get)
        machine = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.tracker.machine_ip_ranges]
        self.parse_context = ParseContext(
            machine_networks=machine, max_json_depth=settings.tracker.max_json_depth
        )

    def _jetstream(self) -> JetStreamContext | None:
        # The replay guard's bucket is reached over the publisher's connection.
        return self.publisher.jetstream

    def _private(self, event: Event) -> Event:
        """Anonymize addresses before anything leaves the tracker, the raw payload included."""
        if not self.tracker.anonymize_ip:
            return event
        return event.model_copy(
            update={
                "ip": anonymize_ip(event.ip) or None if event.ip else None,
                "metadata": scrub_ips(event.metadata),
                # A bounce diagnostic or a user agent may quote an address too.
                "reason": anonymize_text(event.reason) if event.reason else event.reason,
                "user_agent": anonymize_text(event.user_agent) if event.user_agent else event.user_agent,
            }
        )

    async def _store(self, events: list[Event]) -> None:
        max_payload = self.publisher.max_payload
        for event in events:
            webhook_limits.check_event_size(len(event.to_json()), max_payload)
        results: list[Any] = await asyncio.gather(
            *(self.publisher.publish(event) for event in events), return_exceptions=True
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        if any(isinstance(failure, MaxPayloadError) for failure in failures):
            raise webhook_limits.too_large(max(len(event.to_json()) for event in events), max_payload or 0)
        if failures:
            log.warning(
                "%d of %d webhook events not stored (%s); asking to retry",
                len(failures),
                len(events),
                failures[0],
            )
            raise StoreUnavailable

    async def _body(self, request: web.Request) -> bytes:
        """The body, once it is no larger than one event can carry and nests no deeper than
        MAX_JSON_DEPTH (JSON readers recurse)."""
        limit = webhook_limits.body_limit(self.tracker, self.publisher.max_payload)
        if request.content_length is not None and request.content_length > limit:
            raise webhook_limits.too_large(request.content_length, limit)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise webhook_limits.too_large(self.tracker.max_webhook_bytes + 1, limit) from exc
        if len(body) > limit:
            raise webhook_limits.too_large(len(body), limit)
        webhook_limits.check_depth(body, self.tracker)
        return body

    def _token_ok(self, request: web.Request) -> bool:
        token = self.tracker.webhook_token
        if token is None:
            return True
        auth = request.headers.get("Authorization", "")
        offered = (
            auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("X-Webhook-Token", "")
        )
        # aiohttp keeps header bytes that are not UTF-8 as lone surrogates: surrogateescape
        # gives those bytes back, so a garbled token is simply a wrong one (401), not a crash.
        return hmac.compare_digest(
            offered.encode("utf-8", "surrogateescape"), token.get_secret_value().encode()
        )

    async def generic(self, request: web.Request) -> web.Response:
        response = await self._generic(request)
        # Counted like the providers' webhooks, so one alert on refusals covers them all.
        metrics.WEBHOOKS.labels("generic", metrics.outcome_of(response.status)).inc()
        metrics.count_request(f"webhook_generic_{request.match_info['kind']}", response.status)
        return response

    async def _generic(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if self.tracker.webhook_token is None and self.credentials_required:
            return json_error(503, "generic webhooks are not configured: set MAILBEACON_WEBHOOK_TOKEN")
        if not self._token_ok(request):
            return json_error(401, "missing or wrong webhook token")
        try:
            body = await self._body(request)
            event, answer = parse_generic(kind, body, utcnow())
            await self._store([self._private(event)])
        except WebhookError as exc:
            return json_error(exc.status, exc.reason)
        except ValidationError as exc:
            return invalid_event(exc)
        except StoreUnavailable:
            return json_error(503, "event store unavailable, retry later")
        metrics.WEBHOOK_EVENTS.labels("generic", event.type.value).inc()
        return web.json_response({"status": "success", "message": answer})

    async def provider(self, request: web.Request) -> web.Response:
        name = request.match_info["provider"]
        adapter = ADAPTERS.get(name)
        if adapter is None:
            return json_error(404, f"unknown provider {name[:40]!r}", providers=sorted(ADAPTERS))
        response = await self._provider(name, adapter, request)
        metrics.WEBHOOKS.labels(name, metrics.outcome_of(response.status)).inc()
        metrics.count_request(f"webhook_{name}", response.status)
        return response

    async def _provider(self, name: str, adapter: Adapter, request: web.Request) -> web.Response:
        try:
            hook = WebhookRequest(
                headers=request.headers, body=await self._body(request), received_at=utcnow()
            )
            context = VerifyContext(
                self.settings, hook.received_at, self.certificates.load, self.credentials_required
            )
            replay_key = (await adapter.verify(hook, context)).replay_key
            if replay_key and await self.replays.claim(replay_key, hook.body) is Claim.REPLAY:
                raise WebhookError("this signed request was already received with another body (replay)", 403)
            result = adapter.parse(hook, self.parse_context)
            if result.confirm_url is not None:
                if not self.tracker.sns_confirm_subscriptions:
                    raise WebhookError(
                        "subscription confirmation is switched off; confirm it in the SNS console", 403
                    )
                await self.certificates.confirm_subscription(result.confirm_url)
                log.info("confirmed an SNS subscription")
            events = [self._private(event) for event in result.events]
            await self._store(events)
        except WebhookError as exc:
            if exc.status in (401, 403):
                log.warning("%s webhook refused: %s", name, exc.reason)
            response = json_error(exc.status, exc.reason)
            if exc.status == 401 and name == "postmark":
                response.headers["WWW-Authenticate"] = 'Basic realm="mailbeacon webhooks"'
            return response
        except ValidationError as exc:
            return invalid_event(exc)
        except ReplayGuardUnavailable as exc:
            # Never accepted unchecked: the provider retries once NATS answers again.
            log.warning("%s webhook: replay guard unavailable (%s); asking to retry", name, exc)
            return json_error(503, "replay guard unavailable, retry later")
        except StoreUnavailable:
            return json_error(503, "event store unavailable, retry later")
        for event in events:
            metrics.WEBHOOK_EVENTS.labels(name, event.type.value).inc()
        return web.json_response(
            {"status": "success", "message": result.note, "stored": len(events), "ignored": result.ignored}
        )
