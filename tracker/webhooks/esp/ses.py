"""Amazon SES events delivered by SNS to ``POST /webhooks/ses``.

The SNS envelope is verified (signature, allowed topic, age, MessageId not seen before);
its ``Message`` is the SES event as a JSON string, in either of SES's two formats: event
publishing (``eventType``, with ``mail.tags``) or identity notifications
(``notificationType``). One SES event can name several recipients (a bounce lists every
bounced address): each becomes its own event.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from mailbeacon.contract.events import Event, EventType
from mailbeacon.contract.jsondepth import nests_deeper_than
from tracker import classify
from tracker.webhooks.esp import sns
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
    text,
    timestamp_or,
    tracking_id_from,
)
from tracker.webhooks.generic_webhooks import event_time

SOURCE = "webhook:ses"
MESSAGE_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
TRACKING_HEADER = "x-mailbeacon-tracking-id"
_BOUNCE_KINDS = {"permanent": "hard", "transient": "soft", "undetermined": "soft"}

# SES eventType/notificationType → mailbeacon event, and why (anymail's mapping, and where we
# differ). None: acknowledged, no event; so is any type not listed.
EVENT_TYPES: dict[str, EventType | None] = {
    "Delivery": EventType.DELIVERED,  # the receiving server accepted it
    "Bounce": EventType.BOUNCED,  # Permanent: hard; Transient, Undetermined: soft
    "Complaint": EventType.COMPLAINED,  # a feedback-loop report
    "DeliveryDelay": EventType.DEFERRED,  # anymail: unknown; SES still retries, as a 4xx
    "Reject": EventType.FAILED,  # SES refused to send it (virus) (anymail: rejected)
    "Rendering Failure": EventType.FAILED,  # a template could not be rendered: nothing sent
    "Open": EventType.OPENED,  # SES's own pixel, if the configuration set has it on
    "Click": EventType.CLICKED,  # SES's own link tracking, likewise
    "Send": None,  # anymail: sent; the proxy's own `sent` already says so
    "Subscription": None,  # SES list-management preferences, not about this copy
}


def _envelope(request: WebhookRequest) -> dict[str, Any]:
    message = load_json(request.body)
    if not isinstance(message, dict):
        raise WebhookError("body must be an SNS message (a JSON object)")
    kind = message.get("Type")
    if kind not in MESSAGE_TYPES:
        raise WebhookError(f"unknown SNS message type {str(kind)[:40]!r}")
    announced = request.headers.get("x-amz-sns-message-type")
    if announced is not None and announced != kind:
        raise WebhookError("x-amz-sns-message-type header and body Type disagree")
    return message


async def verify(request: WebhookRequest, context: VerifyContext) -> Authentic:
    topics = context.settings.tracker.ses_topic_arns
    if not topics:
        raise not_configured("SES", "SES_TOPIC_ARNS")
    message = _envelope(request)
    if str(message.get("SignatureVersion", "")) not in ("1", "2") or not message.get("Signature"):
        raise WebhookError("SNS message is not signed (SignatureVersion 1 or 2)", 401)
    # Before anything is fetched: a stranger's topic must not make us download certificates.
    if message.get("TopicArn") not in topics:
        raise WebhookError("SNS topic is not in MAILBEACON_SES_TOPIC_ARNS", 403)
    certificate = await context.load_certificate(str(message.get("SigningCertURL", "")))
    if not sns.signature_valid(message, certificate):
        raise WebhookError("SNS signature does not match", 401)
    try:
        sent_at = parse_timestamp(message.get("Timestamp"))
    except WebhookError as exc:
        raise WebhookError("SNS Timestamp is not a time", 400) from exc
    check_freshness(sent_at, context.now, context.settings.tracker.sns_max_age_seconds, "SNS message")
    return Authentic(f"sns:{message.get('MessageId')}")


def _tracking_id(mail: dict[str, Any]) -> str | None:
    tags = mapping(mail.get("tags"))
    headers = [h for h in mail.get("headers") or [] if isinstance(h, dict)]
    from_header = [h.get("value") for h in headers if str(h.get("name", "")).lower() == TRACKING_HEADER]
    return tracking_id_from(tags.get("tracking_id"), *from_header)


def _recipients(entries: Iterable[Any], key: str | None = "emailAddress") -> list[tuple[str, dict[str, Any]]]:
    found = []
    for entry in entries or []:
        detail = mapping(entry) if key else {}
        found.append((address(detail.get(key) if key else entry), detail))
    return [(recipient, detail) for recipient, detail in found if recipient]


def _copy_recipient(destinations: list[str], targets: list[tuple[str, dict[str, Any]]]) -> str | None:
    """Whose copy this SES message is. The proxy sends one copy per recipient, so a message
    with one destination is that recipient's; with no destination given, a single address the
    event names. Several destinations: nobody's in particular."""
    if len(destinations) == 1:
        return destinations[0].lower()
    if not destinations and len(targets) == 1:
        return targets[0][0].lower()
    return None


def _ses_events(
    ses: dict[str, Any], envelope: dict[str, Any], received_at: datetime, context: ParseContext
) -> list[Event]:
    kind = str(ses.get("eventType") or ses.get("notificationType") or "")
    event_type = EVENT_TYPES.get(kind)
    if event_type is None:
        return []  # Send, Subscription and anything new: nothing of ours to record
    mail = mapping(ses.get("mail"))
    destinations = [recipient for recipient, _ in _recipients(mail.get("destination") or [], None)]
    # The detail object is named after the type: "Bounce" → "bounce", "DeliveryDelay" → "deliveryDelay".
    detail = mapping(ses.get(kind[:1].lower() + kind[1:].replace(" ", "")))
    message_id = text(mail.get("messageId"), 200) or str(envelope.get("MessageId"))
    sns_id = str(envelope.get("MessageId"))
    fallback_time = timestamp_or(envelope.get("Timestamp"), received_at)
    when = event_time(detail.get("timestamp") or mail.get("timestamp"), fallback_time)
    common: dict[str, Any] = {}
    verdict = None
    basis = sns_id
    reason: str | None = None
    targets: list[tuple[str, dict[str, Any]]] = [(recipient, {}) for recipient in destinations]
    if kind == "Bounce":
        bounce_type = str(detail.get("bounceType", ""))
        common["bounce_kind"] = _BOUNCE_KINDS.get(bounce_type.lower(), "soft")
        targets = _recipients(detail.get("bouncedRecipients") or [])
        basis = text(detail.get("feedbackId"), 150) or sns_id
        reason = f"{bounce_type}/{detail.get('bounceSubType', '')}"
    elif kind == "Complaint":
        basis = text(detail.get("feedbackId"), 150) or sns_id
        targets = _recipients(detail.get("complainedRecipients") or [])
        reason = text(detail.get("complaintFeedbackType")) or "complaint"
    elif kind == "Delivery":
        basis = f"{message_id}:delivery"
        targets = _recipients(detail.get("recipients") or [], None)
        reason = text(detail.get("smtpResponse"))
    elif kind == "DeliveryDelay":
        targets = _recipients(detail.get("delayedRecipients") or [])
        reason = text(detail.get("delayType"))
    elif kind in ("Reject", "Rendering Failure"):
        failure = mapping(ses.get("failure")) if kind == "Rendering Failure" else detail
        reason = text(failure.get("reason")) or text(failure.get("errorMessage")) or kind
    else:  # Open, Click
        shape = classify.RequestShape(
            user_agent=text(detail.get("userAgent")), ip=text(detail.get("ipAddress"))
        )
        verdict = classify.classify("open" if kind == "Open" else "click", shape, context.machine_networks)
        common.update(ip=text(detail.get("ipAddress"), 64), user_agent=text(detail.get("userAgent"), 500))
        if kind == "Click":
            common["url"] = text(detail.get("link"), 4000)
    # The tag names one copy: only its recipient is attributed to it. Anyone else the event
    # names (a bounce can list several) is found by address, like any address-only event.
    tracking_id = _tracking_id(mail)
    owner = _copy_recipient(destinations, targets) if tracking_id else None
    events = []
    for recipient, per_recipient in targets:
        diagnostic = text(per_recipient.get("diagnosticCode"))
        if kind == "DeliveryDelay" and reason and diagnostic:
            recipient_reason: str | None = f"{reason}: {diagnostic}"  # why SES waits, and the reply
        else:
            recipient_reason = diagnostic or reason
        events.append(
            event_for(
                SOURCE,
                [basis, recipient],
                event_type,
                ses,
                occurred_at=when.occurred_at,
                tracking_id=tracking_id if recipient.lower() == owner else None,
                recipient=recipient,
                verdict=verdict,
                reason=recipient_reason,
                metadata={
                    "message_id": message_id,
                    "sns_message_id": sns_id,
                    "topic": envelope.get("TopicArn"),
                    **when.metadata(),
                },
                **common,
            )
        )
    return events


def parse(request: WebhookRequest, context: ParseContext) -> WebhookResult:
    envelope = _envelope(request)
    kind = envelope["Type"]
    if kind == "SubscriptionConfirmation":
        return WebhookResult(
            note="subscription confirmation", confirm_url=text(envelope.get("SubscribeURL"), 2000)
        )
    if kind == "UnsubscribeConfirmation":
        return WebhookResult(note="unsubscribe confirmation ignored", ignored=1)
    message = str(envelope.get("Message", ""))
    if nests_deeper_than(message, context.max_json_depth):  # checked before the recursive reader
        raise WebhookError(f"SNS Message nests JSON deeper than {context.max_json_depth} levels")
    try:
        ses = json.loads(message)
    except ValueError:
        ses = None
    if not isinstance(ses, dict):
        # e.g. "Successfully validated SNS topic for Amazon SES event publishing."
        return WebhookResult(note="notification is not an SES event; ignored", ignored=1)
    events = _ses_events(ses, envelope, request.received_at, context)
    return WebhookResult(events=events, ignored=0 if events else 1)
