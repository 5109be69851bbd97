"""Postmark webhooks: one JSON record per request, kind in ``RecordType``.

Postmark signs nothing; the webhook URL is protected by HTTP basic auth
(``POSTMARK_BASIC_AUTH`` = ``user:password``; required unless the tracker listens on
loopback only or ``ALLOW_UNAUTHENTICATED_WEBHOOKS`` is set). Our
``tracking_id`` arrives in ``Metadata`` (from the ``X-PM-Metadata-tracking_id`` header).
Bounce records carry their own ``ID``; opens and clicks have none, so their id is a digest
of the record, which a retried delivery repeats.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

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
    event_for,
    load_json,
    mapping,
    not_configured,
    payload_digest,
    text,
    tracking_id_from,
)
from tracker.webhooks.generic_webhooks import event_time

SOURCE = "webhook:postmark"

# RecordType → event: Delivery delivered, Open opened, Click clicked (Postmark's own tracking,
# if the app switched it back on); Bounce and SpamComplaint by their Type below;
# SubscriptionChange by its SuppressionReason below; anything else (Inbound, new ones) ignored.

# Bounce record Type → (event type, bounce kind), and why where anymail maps it otherwise.
# Types that are not a delivery failure (AutoResponder, AddressChange, ChallengeVerification,
# OpenRelayTest, Subscribe, Unknown) are absent: acknowledged, no event.
BOUNCE_TYPES: dict[str, tuple[EventType, str | None]] = {
    "HardBounce": (EventType.BOUNCED, "hard"),
    "BadEmailAddress": (EventType.BOUNCED, "hard"),  # anymail: rejected; the address does not exist
    "SoftBounce": (EventType.BOUNCED, "soft"),
    "SpamNotification": (EventType.BOUNCED, "soft"),  # anymail: complained; a filter refused it, no person
    "VirusNotification": (EventType.BOUNCED, "soft"),
    "Blocked": (
        EventType.BOUNCED,
        "soft",
    ),  # anymail: rejected; the receiver blocked the sender, not the address
    "DMARCPolicy": (EventType.BOUNCED, "soft"),  # anymail: rejected; the receiver refused it, as Blocked
    "Transient": (EventType.DEFERRED, None),
    "DnsError": (EventType.DEFERRED, None),
    "SpamComplaint": (EventType.COMPLAINED, None),
    "Unsubscribe": (EventType.UNSUBSCRIBED, None),
    "ManuallyDeactivated": (EventType.FAILED, None),  # anymail: rejected; Postmark did not send it
    "Unconfirmed": (EventType.FAILED, None),  # anymail: rejected; likewise
    "SMTPApiError": (EventType.FAILED, None),
    "TemplateRenderingFailed": (EventType.FAILED, None),
}

# SubscriptionChange with SuppressSending: true → what made Postmark stop sending to the
# address, as anymail maps it. Postmark reports the bounce or complaint itself too (if that
# webhook is on); both name the same copy, which counts it once.
SUPPRESSION_REASONS: dict[str, tuple[EventType, str | None]] = {
    "HardBounce": (EventType.BOUNCED, "hard"),
    "SpamComplaint": (EventType.COMPLAINED, None),
    "ManualSuppression": (EventType.UNSUBSCRIBED, None),  # the recipient's link, or the sender's own
}
# SuppressSending: false (a reactivation; anymail: subscribed): acknowledged, no event.
# mailbeacon has no such event, and its own suppression of the address stays until lifted.


def credentials_match(header: str, expected: str) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return False
    try:
        offered = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(offered, expected.encode())


async def verify(request: WebhookRequest, context: VerifyContext) -> Authentic:
    expected = context.settings.tracker.postmark_basic_auth
    if expected is None:
        if context.credentials_required:
            raise not_configured("Postmark", "POSTMARK_BASIC_AUTH")
        return Authentic()  # on loopback (or the explicit opt-out): open, as on a laptop
    if not credentials_match(request.headers.get("Authorization", ""), expected.get_secret_value()):
        raise WebhookError("missing or wrong basic auth credentials", 401)
    return Authentic()


def _verdict(kind: classify.Engagement, record: dict[str, Any], context: ParseContext) -> classify.Verdict:
    geo = mapping(record.get("Geo"))
    shape = classify.RequestShape(user_agent=text(record.get("UserAgent")), ip=text(geo.get("IP")))
    return classify.classify(kind, shape, context.machine_networks)


def parse(request: WebhookRequest, context: ParseContext) -> WebhookResult:
    record = load_json(request.body)
    if not isinstance(record, dict) or not isinstance(record.get("RecordType"), str):
        raise WebhookError("body must be a Postmark webhook record (a JSON object with RecordType)")
    kind = record["RecordType"]
    fields: dict[str, Any] = {}
    verdict = None
    when = event_time(
        record.get("BouncedAt")
        or record.get("DeliveredAt")
        or record.get("ReceivedAt")
        or record.get("ChangedAt"),
        request.received_at,
    )
    message_id = text(record.get("MessageID"), 200) or ""
    recipient = address(record.get("Email")) or address(record.get("Recipient"))
    if kind in ("Bounce", "SpamComplaint"):
        mapped = BOUNCE_TYPES.get(str(record.get("Type", "SpamComplaint" if kind == "SpamComplaint" else "")))
        if mapped is None:
            return WebhookResult(note=f"bounce type {str(record.get('Type'))[:40]!r} ignored", ignored=1)
        event_type, bounce_kind = mapped
        if bounce_kind:
            fields["bounce_kind"] = bounce_kind
        fields["reason"] = text(record.get("Details")) or text(record.get("Description"))
        natural_id = ["bounce", text(record.get("ID"), 40) or payload_digest(record)]
    elif kind == "Delivery":
        event_type, natural_id = EventType.DELIVERED, [message_id, "delivery", recipient or ""]
        fields["reason"] = text(record.get("Details"))
    elif kind in ("Open", "Click"):
        event_type = EventType.OPENED if kind == "Open" else EventType.CLICKED
        verdict = _verdict("open" if kind == "Open" else "click", record, context)
        geo = mapping(record.get("Geo"))
        fields.update(ip=text(geo.get("IP"), 64), user_agent=text(record.get("UserAgent"), 500))
        if kind == "Click":
            fields["url"] = text(record.get("OriginalLink"), 4000)
        natural_id = [kind.lower(), payload_digest(record)]
    elif kind == "SubscriptionChange":
        suppression = str(record.get("SuppressionReason"))
        mapped = SUPPRESSION_REASONS.get(suppression)
        if record.get("SuppressSending") is not True or mapped is None:
            return WebhookResult(note="subscription change ignored", ignored=1)
        event_type, bounce_kind = mapped
        if bounce_kind:
            fields["bounce_kind"] = bounce_kind
        origin = text(record.get("Origin"), 40)
        fields["reason"] = f"Postmark suppressed the address: {suppression}" + (
            f" (origin {origin})" if origin else ""
        )
        # "unsubscribe" for a manual suppression: the id that kind had before bounces were mapped.
        label = "unsubscribe" if event_type is EventType.UNSUBSCRIBED else f"suppression:{suppression}"
        natural_id = [message_id, label, recipient or "", text(record.get("ChangedAt"), 40) or ""]
    else:
        return WebhookResult(note=f"record type {kind[:40]!r} ignored", ignored=1)
    metadata = mapping(record.get("Metadata"))
    tracking_id = tracking_id_from(metadata.get("tracking_id"))
    if tracking_id is None and recipient is None:
        return WebhookResult(note="record names no recipient", ignored=1)
    event = event_for(
        SOURCE,
        natural_id,
        event_type,
        record,
        occurred_at=when.occurred_at,
        tracking_id=tracking_id,
        recipient=recipient,
        verdict=verdict,
        metadata={**({"message_id": message_id} if message_id else {}), **when.metadata()},
        **fields,
    )
    return WebhookResult(events=[event])
