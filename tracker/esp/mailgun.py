"""Mailgun webhooks: ``{"signature": {timestamp, token, signature}, "event-data": {...}}``.

Signature: hex HMAC-SHA256 of ``timestamp + token`` keyed by the webhook signing key
(``MAILGUN_SIGNING_KEY``). Mailgun signs every delivery afresh, so a stale timestamp or a
token seen before means a replayed request. ``event-data.id`` is unique within a day, so
the event id combines it with the event's timestamp; our ``tracking_id`` arrives in
``user-variables`` (from the ``X-Mailgun-Variables`` header the proxy sets).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from mailbeacon.events import EventType
from tracker import classify
from tracker.esp.base import (
    Authentic,
    ParseContext,
    VerifyContext,
    WebhookError,
    WebhookRequest,
    WebhookResult,
    address,
    check_freshness,
    event_for,
    load_json,
    mapping,
    not_configured,
    parse_timestamp,
    payload_digest,
    text,
    timestamp_or,
    tracking_id_from,
)

SOURCE = "webhook:mailgun"

_SIMPLE: dict[str, EventType] = {
    "delivered": EventType.DELIVERED,
    "opened": EventType.OPENED,
    "clicked": EventType.CLICKED,
    "complained": EventType.COMPLAINED,
    "unsubscribed": EventType.UNSUBSCRIBED,
    "rejected": EventType.FAILED,  # Mailgun refused to send it at all
}
# accepted, stored, list_member_uploaded and anything new are acknowledged and ignored.


def expected_signature(key: str, timestamp: str, token: str) -> str:
    return hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()


def _envelope(body: bytes) -> dict[str, Any]:
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise WebhookError("body must be a JSON object with 'signature' and 'event-data'")
    return payload


async def verify(request: WebhookRequest, context: VerifyContext) -> Authentic:
    key = context.settings.mailgun_signing_key
    if key is None:
        raise not_configured("Mailgun", "MAILGUN_SIGNING_KEY")
    block = _envelope(request.body).get("signature")
    if not isinstance(block, dict):
        raise WebhookError("missing signature block", 401)
    timestamp, token, signature = (
        text(block.get(name), 200) or "" for name in ("timestamp", "token", "signature")
    )
    if not (timestamp and token and signature):
        raise WebhookError("signature block needs timestamp, token and signature", 401)
    expected = expected_signature(key.get_secret_value(), timestamp, token)
    if not hmac.compare_digest(expected.encode(), signature.lower().encode()):
        raise WebhookError("signature does not match", 401)
    try:
        signed_at = parse_timestamp(timestamp)
    except WebhookError as exc:
        raise WebhookError("signature timestamp is not a time", 401) from exc
    check_freshness(signed_at, context.now, context.settings.webhook_max_age_seconds, "signed timestamp")
    # Only timestamp and token are signed: the token is what a replay reuses.
    return Authentic(f"mailgun:{token}")


def _failure(data: dict[str, Any]) -> tuple[EventType, dict[str, Any]]:
    """``failed``: permanent is a bounce (or a send Mailgun suppressed), temporary a deferral."""
    reason = str(data.get("reason", "")).lower()
    if str(data.get("severity", "")).lower() == "temporary":
        return EventType.DEFERRED, {}
    if reason.startswith("suppress-"):
        return EventType.FAILED, {}  # not sent: the address is on a suppression list
    # "old": Mailgun retried for hours and gave up on temporary refusals: a soft bounce.
    return EventType.BOUNCED, {"bounce_kind": "soft" if reason == "old" else "hard"}


def _verdict(kind: classify.Engagement, data: dict[str, Any], context: ParseContext) -> classify.Verdict:
    client = mapping(data.get("client-info"))
    bot = text(client.get("bot"), 40)
    if bot:
        kind_name = "apple_privacy_proxy" if bot.lower() == "apple" else "image_proxy"
        return classify.Verdict(kind_name, f"Mailgun client-info.bot = {bot!r}")
    if str(client.get("client-type", "")).lower() == "robot":
        return classify.Verdict("security_scanner", "Mailgun client-info.client-type = 'robot'")
    shape = classify.RequestShape(user_agent=text(client.get("user-agent")), ip=text(data.get("ip")))
    return classify.classify(kind, shape, context.machine_networks)


def _reason(data: dict[str, Any]) -> str | None:
    status = mapping(data.get("delivery-status"))
    reject = mapping(data.get("reject"))
    code = text(status.get("code"), 10)
    message = text(status.get("description")) or text(status.get("message")) or text(reject.get("reason"))
    if message and code and not message.startswith(code):
        return f"{code} {message}"
    return message or text(data.get("reason"))


def parse(request: WebhookRequest, context: ParseContext) -> WebhookResult:
    data = _envelope(request.body).get("event-data")
    if not isinstance(data, dict):
        raise WebhookError("missing event-data object")
    name = str(data.get("event", "")).lower()
    fields: dict[str, Any] = {}
    if name == "failed":
        event_type, fields = _failure(data)
    elif name in _SIMPLE:
        event_type = _SIMPLE[name]
    else:
        return WebhookResult(note=f"event {name[:40]!r} ignored", ignored=1)
    variables = mapping(data.get("user-variables"))
    message = mapping(data.get("message"))
    headers = mapping(message.get("headers"))
    tracking_id = tracking_id_from(variables.get("tracking_id"))
    recipient = address(data.get("recipient"))
    if tracking_id is None and recipient is None:
        return WebhookResult(note="event names no recipient", ignored=1)
    occurred_at = timestamp_or(data.get("timestamp"), request.received_at)
    if event_type in (EventType.BOUNCED, EventType.DEFERRED, EventType.FAILED, EventType.DELIVERED):
        fields["reason"] = _reason(data)
    verdict = None
    if event_type in (EventType.OPENED, EventType.CLICKED):
        verdict = _verdict("open" if event_type is EventType.OPENED else "click", data, context)
        client = mapping(data.get("client-info"))
        fields.update(ip=text(data.get("ip"), 64), user_agent=text(client.get("user-agent"), 500))
        if event_type is EventType.CLICKED:
            fields["url"] = text(data.get("url"), 4000)
    natural_id = [text(data.get("id"), 120) or payload_digest(data), text(data.get("timestamp"), 30) or ""]
    extra = {"message_id": text(headers.get("message-id"), 998), "severity": data.get("severity")}
    event = event_for(
        SOURCE,
        natural_id,
        event_type,
        data,
        occurred_at=occurred_at,
        tracking_id=tracking_id,
        recipient=recipient,
        verdict=verdict,
        metadata={k: v for k, v in extra.items() if v},
        **fields,
    )
    return WebhookResult(events=[event])
