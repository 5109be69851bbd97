"""SendGrid Event Webhook: a JSON array of events, signed with ECDSA P-256.

Signature: ``X-Twilio-Email-Event-Webhook-Signature`` is a base64 DER ECDSA/SHA-256
signature over the ``X-Twilio-Email-Event-Webhook-Timestamp`` value followed by the raw
body, verified with the public key the SendGrid console shows (``SENDGRID_PUBLIC_KEY``,
base64 DER; PEM is accepted too). Custom args (our ``tracking_id``) arrive as top-level
keys of each event; ``sg_event_id`` identifies an event across retries.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

from mailbeacon.contract.events import Event, EventType
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

SOURCE = "webhook:sendgrid"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

# SendGrid event → mailbeacon event, and why (anymail's mapping, and where we differ).
# None: acknowledged, no event; so is any event not listed.
EVENT_TYPES: dict[str, EventType | None] = {
    "delivered": EventType.DELIVERED,  # the receiving server accepted it
    "deferred": EventType.DEFERRED,  # a temporary refusal; SendGrid retries
    "bounce": EventType.BOUNCED,  # type "bounce": hard; type "blocked": soft (reputation, content)
    "dropped": EventType.FAILED,  # anymail: rejected; SendGrid never sent it (suppressed, invalid)
    "open": EventType.OPENED,  # SendGrid's own pixel, if the app switched it back on
    "click": EventType.CLICKED,  # SendGrid's own link tracking, likewise
    "spamreport": EventType.COMPLAINED,  # a feedback-loop spam report
    "unsubscribe": EventType.UNSUBSCRIBED,
    "group_unsubscribe": EventType.UNSUBSCRIBED,  # an unsubscribe group is still this sender's list
    "processed": None,  # anymail: queued; the proxy's own `sent` already says so
    "group_resubscribe": None,  # anymail: subscribed; no such event, our suppression stays until lifted
}


@functools.lru_cache(maxsize=4)
def load_public_key(value: str) -> ec.EllipticCurvePublicKey:
    value = value.strip()
    try:
        if value.startswith("-----BEGIN"):
            key = load_pem_public_key(value.encode())
        else:
            key = load_der_public_key(base64.b64decode(value))
    except (ValueError, binascii.Error) as exc:
        raise WebhookError("MAILBEACON_SENDGRID_PUBLIC_KEY is not a public key", 503) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise WebhookError("MAILBEACON_SENDGRID_PUBLIC_KEY is not an ECDSA key", 503)
    return key


def signature_valid(key: ec.EllipticCurvePublicKey, timestamp: str, body: bytes, signature: str) -> bool:
    try:
        key.verify(
            base64.b64decode(signature, validate=True), timestamp.encode() + body, ec.ECDSA(hashes.SHA256())
        )
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


async def verify(request: WebhookRequest, context: VerifyContext) -> Authentic:
    configured = context.settings.tracker.sendgrid_public_key
    if configured is None:
        raise not_configured("SendGrid", "SENDGRID_PUBLIC_KEY")
    signature = request.headers.get(SIGNATURE_HEADER, "").strip()
    timestamp = request.headers.get(TIMESTAMP_HEADER, "").strip()
    if not signature or not timestamp:
        raise WebhookError(f"missing {SIGNATURE_HEADER} / {TIMESTAMP_HEADER}", 401)
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise WebhookError(f"{TIMESTAMP_HEADER} is not Unix seconds", 401)
    if not signature_valid(
        load_public_key(configured.get_secret_value()), timestamp, request.body, signature
    ):
        raise WebhookError("signature does not match", 401)
    try:
        signed_at = parse_timestamp(int(timestamp))
    except WebhookError as exc:
        raise WebhookError(f"{TIMESTAMP_HEADER} is out of range", 401) from exc
    check_freshness(
        signed_at, context.now, context.settings.tracker.webhook_max_age_seconds, "signed timestamp"
    )
    # What was signed, not the signature: an ECDSA signature is malleable (a second valid
    # signature can be derived from the first), so keying on it would let a replay through.
    return Authentic("sendgrid:" + hashlib.sha256(timestamp.encode() + request.body).hexdigest())


def _verdict(kind: classify.Engagement, record: dict[str, Any], context: ParseContext) -> classify.Verdict:
    if record.get("sg_machine_open") is True:
        return classify.Verdict("apple_privacy_proxy", "SendGrid flagged a machine open (sg_machine_open)")
    shape = classify.RequestShape(user_agent=text(record.get("useragent")), ip=text(record.get("ip")))
    return classify.classify(kind, shape, context.machine_networks)


def _event(record: dict[str, Any], received_at: datetime, context: ParseContext) -> Event | None:
    name = str(record.get("event", "")).lower()
    event_type = EVENT_TYPES.get(name)
    recipient = address(record.get("email"))
    unique_args = mapping(record.get("unique_args"))
    tracking_id = tracking_id_from(record.get("tracking_id"), unique_args.get("tracking_id"))
    if event_type is None or (recipient is None and tracking_id is None):
        return None
    when = event_time(record.get("timestamp"), received_at)
    natural_id = text(record.get("sg_event_id"), 200) or payload_digest(record)
    fields: dict[str, Any] = {}
    if event_type is EventType.BOUNCED:
        # SendGrid's "blocked" is a temporary refusal (reputation, content); "bounce" is permanent.
        fields["bounce_kind"] = "soft" if str(record.get("type", "")).lower() == "blocked" else "hard"
        fields["reason"] = text(record.get("reason")) or text(record.get("status"))
    elif event_type in (EventType.DELIVERED, EventType.DEFERRED):
        fields["reason"] = text(record.get("response"))
    elif event_type is EventType.FAILED:
        fields["reason"] = text(record.get("reason")) or text(record.get("type"))
    verdict = None
    if event_type in (EventType.OPENED, EventType.CLICKED):
        verdict = _verdict("open" if event_type is EventType.OPENED else "click", record, context)
        fields.update(ip=text(record.get("ip"), 64), user_agent=text(record.get("useragent"), 500))
        if event_type is EventType.CLICKED:
            fields["url"] = text(record.get("url"), 4000)
    extra = {k: record[k] for k in ("sg_message_id", "smtp-id", "status", "attempt") if k in record}
    return event_for(
        SOURCE,
        [natural_id],
        event_type,
        record,
        occurred_at=when.occurred_at,
        tracking_id=tracking_id,
        recipient=recipient,
        verdict=verdict,
        metadata={**extra, **when.metadata()},
        **fields,
    )


def parse(request: WebhookRequest, context: ParseContext) -> WebhookResult:
    payload = load_json(request.body)
    if isinstance(payload, dict):
        payload = [payload]  # the console's "test your integration" posts may be single objects
    if not isinstance(payload, list) or not all(isinstance(record, dict) for record in payload):
        raise WebhookError("body must be a JSON array of event objects")
    result = WebhookResult()
    for record in payload:
        event = _event(record, request.received_at, context)
        if event is None:
            result.ignored += 1
        else:
            result.events.append(event)
    return result
