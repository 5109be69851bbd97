"""What a webhook may be: credentials off loopback, body size, nesting depth (docs/tracker.md "ESP webhooks").

Plain functions of the settings and of what NATS told us; ``tracker.webhooks.webhooks`` applies them.
"""

from __future__ import annotations

from mailbeacon.contract.jsondepth import nests_deeper_than
from mailbeacon.contract.settings import Settings, TrackerSettings
from tracker.webhooks.generic_webhooks import WebhookError

# An event carries the provider's record in metadata.payload and, beside it, fields taken
# from the record (url up to 8000 characters, reason 4000, user agent 1000), ids and
# classification evidence: this much room is kept beside the body in one NATS message.
EVENT_ROOM_BYTES = 16 * 1024
# The NATS headers of a published event (Nats-Msg-Id: <event id of at most 200 characters>)
# count against max_payload too.
HEADER_ROOM_BYTES = 512

GENERIC_ROUTES = "/track/bounce/, /track/delivery/, /track/complaint/"


def credentials_required(settings: Settings) -> bool:
    """Whether the webhooks that can go without credentials (generic, Postmark) must have them:
    always, unless the tracker listens on loopback only or the operator opted out."""
    return not (settings.listens_on_loopback("tracker") or settings.tracker.allow_unauthenticated_webhooks)


def missing_credentials(settings: Settings) -> list[str]:
    """The webhook routes that refuse every request (503) for want of a credential."""
    missing = [
        f"{route} (set MAILBEACON_{variable})"
        for route, value, variable in (
            ("/webhooks/sendgrid", settings.tracker.sendgrid_public_key, "SENDGRID_PUBLIC_KEY"),
            ("/webhooks/mailgun", settings.tracker.mailgun_signing_key, "MAILGUN_SIGNING_KEY"),
            ("/webhooks/ses", settings.tracker.ses_topic_arns, "SES_TOPIC_ARNS"),
        )
        if not value
    ]
    if credentials_required(settings):
        if settings.tracker.webhook_token is None:
            missing.append(f"{GENERIC_ROUTES} (set MAILBEACON_WEBHOOK_TOKEN)")
        if settings.tracker.postmark_basic_auth is None:
            missing.append("/webhooks/postmark (set MAILBEACON_POSTMARK_BASIC_AUTH)")
    return missing


def unauthenticated(settings: Settings) -> list[str]:
    """The webhook routes that take anyone's requests although the tracker is reachable from
    other machines (the ALLOW_UNAUTHENTICATED_WEBHOOKS opt-out)."""
    if settings.listens_on_loopback("tracker") or not settings.tracker.allow_unauthenticated_webhooks:
        return []
    routes = [GENERIC_ROUTES] if settings.tracker.webhook_token is None else []
    return routes + (["/webhooks/postmark"] if settings.tracker.postmark_basic_auth is None else [])


def body_limit(tracker: TrackerSettings, max_payload: int | None) -> int:
    """The largest body taken: MAX_WEBHOOK_BYTES, and no more than one NATS message can carry
    as an event once NATS said how much that is."""
    if max_payload is None:
        return tracker.max_webhook_bytes
    return max(0, min(tracker.max_webhook_bytes, max_payload - EVENT_ROOM_BYTES - HEADER_ROOM_BYTES))


def too_large(size: int, limit: int) -> WebhookError:
    # 413 and never 503: a provider retries a 503 for days, and this body will never fit.
    return WebhookError(f"body of {size} bytes is larger than the {limit} bytes one event can carry", 413)


def check_event_size(encoded: int, max_payload: int | None) -> None:
    """An event that can never be stored (larger than a NATS message once encoded) is a 413."""
    if max_payload is not None and encoded + HEADER_ROOM_BYTES > max_payload:
        raise WebhookError(
            f"an event of this webhook takes {encoded} bytes, more than NATS stores in one message "
            f"({max_payload} bytes)",
            413,
        )


def check_depth(text: bytes | str, tracker: TrackerSettings, what: str = "body") -> None:
    if nests_deeper_than(text, tracker.max_json_depth):
        raise WebhookError(
            f"{what} nests JSON deeper than {tracker.max_json_depth} levels (MAILBEACON_MAX_JSON_DEPTH)"
        )
