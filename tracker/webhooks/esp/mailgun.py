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
from email.utils import getaddresses
from typing import Any
from urllib.parse import parse_qs

from mailbeacon.contract.events import EventType
from tracker import classify
from tracker.webhooks.esp.base import (
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
    tracking_id_from,
)
from tracker.webhooks.generic_webhooks import event_time

SOURCE = "webhook:mailgun"
LEGACY_REFUSED = (
    "Mailgun legacy (form-encoded) webhooks are not supported: "
    "use Mailgun's JSON webhooks (event-data) for this URL"
)

# Mailgun event → mailbeacon event, and why (anymail's mapping, and where we differ).
# None: acknowledged, no event. Events not listed (list_member_uploaded, anything new) too.
EVENT_TYPES: dict[str, EventType | None] = {
    "delivered": EventType.DELIVERED,  # the receiving server accepted it
    "failed": EventType.BOUNCED,  # refined by _failure: deferred, soft bounce or failed
    "rejected": EventType.FAILED,  # Mailgun refused to send it at all (anymail: rejected)
    "opened": EventType.OPENED,  # Mailgun's own pixel, if the app switched it back on
    "clicked": EventType.CLICKED,  # Mailgun's own link tracking, likewise
    "complained": EventType.COMPLAINED,  # a feedback-loop spam report
    "unsubscribed": EventType.UNSUBSCRIBED,  # Mailgun's unsubscribe link or header
    "accepted": None,  # anymail: queued; the proxy's own `sent` already says so
    "stored": None,  # inbound storage, not a delivery
}


def expected_signature(key: str, timestamp: str, token: str) -> str:
    return hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()


def _legacy_form(body: bytes) -> bool:
    """Mailgun's legacy webhooks (before 2018) post form fields, signed in fields of their own:
    urlencoded, or multipart when a message is attached."""
    if body.startswith(b"--"):
        return b'name="signature"' in body
    try:
        fields = parse_qs(body.decode("ascii"), max_num_fields=1000)
    except (UnicodeDecodeError, ValueError):
        return False
    return {"signature", "token", "timestamp"} <= fields.keys()


def _envelope(body: bytes) -> dict[str, Any]:
    try:
        payload = load_json(body)
    except WebhookError:
        if _legacy_form(body):
            # 406 is the one answer Mailgun never retries: this form will not be read later either.
            raise WebhookError(LEGACY_REFUSED, 406) from None
        raise
    if not isinstance(payload, dict):
        raise WebhookError("body must be a JSON object with 'signature' and 'event-data'")
    return payload


async def verify(request: WebhookRequest, context: VerifyContext) -> Authentic:
    key = context.settings.tracker.mailgun_signing_key
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
    check_freshness(
        signed_at, context.now, context.settings.tracker.webhook_max_age_seconds, "signed timestamp"
    )
    # Only timestamp and token are signed: the token is what a replay reuses.
    return Authentic(f"mailgun:{token}")


def _failure(data: dict[str, Any]) -> tuple[EventType, dict[str, Any]]:
    """``failed``: permanent is a bounce (or a send Mailgun suppressed), temporary a deferral.

    ``reason: old`` is the last word after hours of temporary refusals: Mailgun gives up,
    though the event may still say ``severity: temporary``. That is a soft bounce.
    """
    reason = str(data.get("reason", "")).lower()
    if reason == "old":
        return EventType.BOUNCED, {"bounce_kind": "soft"}
    if str(data.get("severity", "")).lower() == "temporary":
        return EventType.DEFERRED, {}
    if reason.startswith("suppress-"):
        return EventType.FAILED, {}  # not sent: the address is on a suppression list (anymail: bounced)
    return EventType.BOUNCED, {"bounce_kind": "hard"}


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
    """The remote server's reply (``delivery-status.message``, after its code) and Mailgun's
    own ``description`` (for ``reason: old`` the last refusal, e.g. "over quota"), each once."""
    status = mapping(data.get("delivery-status"))
    reject = mapping(data.get("reject"))
    code = text(status.get("code"), 10)
    parts: list[str] = []
    for value in (status.get("message"), status.get("description"), reject.get("reason")):
        found = text(value)
        if found and not any(found in part for part in parts):
            parts.append(found)
    if not parts:
        return text(data.get("reason"))
    joined = "; ".join(parts)
    if code and not joined.startswith(code):
        joined = f"{code} {joined}"
    return joined[:2000]


def _to_address(headers: dict[str, Any]) -> str | None:
    """The one address of the ``To`` header (a display-name form too), as anymail reads a
    ``rejected`` event that names no recipient; None when it names none or several."""
    value = text(headers.get("to"), 2000)
    if value is None:
        return None
    found = [addr for _, addr in getaddresses([value]) if "@" in addr]
    return address(found[0]) if len(found) == 1 else None


def parse(request: WebhookRequest, context: ParseContext) -> WebhookResult:
    data = _envelope(request.body).get("event-data")
    if not isinstance(data, dict):
        raise WebhookError("missing event-data object")
    name = str(data.get("event", "")).lower()
    mapped = EVENT_TYPES.get(name)
    if mapped is None:
        return WebhookResult(note=f"event {name[:40]!r} ignored", ignored=1)
    event_type, fields = _failure(data) if name == "failed" else (mapped, {})
    variables = mapping(data.get("user-variables"))
    message = mapping(data.get("message"))
    headers = mapping(message.get("headers"))
    tracking_id = tracking_id_from(variables.get("tracking_id"))
    recipient = address(data.get("recipient"))
    if recipient is None and name == "rejected":
        recipient = _to_address(headers)
    if tracking_id is None and recipient is None:
        return WebhookResult(note="event names no recipient", ignored=1)
    when = event_time(data.get("timestamp"), request.received_at)
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
        occurred_at=when.occurred_at,
        tracking_id=tracking_id,
        recipient=recipient,
        verdict=verdict,
        metadata={**{k: v for k, v in extra.items() if v}, **when.metadata()},
        **fields,
    )
    return WebhookResult(events=[event])
