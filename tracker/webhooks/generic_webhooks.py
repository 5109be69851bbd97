"""The generic JSON webhooks of the original tracking guide: bounce, delivery, complaint.

Shapes accepted (``tracking_id`` or ``email`` is required)::

    POST /track/bounce/     {"tracking_id": "...", "email": "...", "bounce_type": "hard"|"soft",
                             "reason": "...", "timestamp": "2026-11-27T10:00:00Z"}
    POST /track/delivery/   {"tracking_id": "...", "email": "...", "timestamp": ...}
    POST /track/complaint/  {"tracking_id": "...", "email": "...", "reason": "...", "timestamp": ...}

The time is the sender's (any age: history imported from another system keeps its dates);
the arrival time replaces it only when it cannot be a time, see :func:`event_time`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mailbeacon.contract.events import Event, EventType, new_event_id, parse_tracking_id


class WebhookError(ValueError):
    """A request we refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    event_type: EventType
    names: frozenset[str]  # values accepted in an optional "event" field
    answer: str


ENDPOINTS: dict[str, Endpoint] = {
    "bounce": Endpoint(EventType.BOUNCED, frozenset({"bounce", "bounced"}), "Event recorded"),
    "delivery": Endpoint(EventType.DELIVERED, frozenset({"delivery", "delivered"}), "Delivery recorded"),
    "complaint": Endpoint(EventType.COMPLAINED, frozenset({"complaint", "complained"}), "Event recorded"),
}


_TIMESTAMP_FORMS = "timestamp must be an ISO 8601 time or Unix seconds"
# Unix seconds above this are taken as milliseconds (1e11 s lies in the year 5138).
_MILLISECONDS_FROM = 1e11


# When an event happened is the sender's to say, and an authentic event is never refused for
# its time: importing last year's bounces from another system is a real use. Only a time that
# cannot be when anything was sent or reported is replaced by the arrival time (the given one
# is kept in ``metadata.stated_time``), because first-seen times keep the earliest: a delivery
# "at" 1970 or 2099 would stay the copy's time for good.
EARLIEST_EVENT = datetime(1990, 1, 1, tzinfo=UTC)  # catches Unix 0, Go's and .NET's year 1, counters
MAX_EVENT_LEAD = timedelta(days=1)  # clock skew between the sender and us


def implausible_time(moment: datetime, received_at: datetime) -> str | None:
    """Why ``moment`` cannot be when an event that arrived at ``received_at`` happened."""
    if moment > received_at + MAX_EVENT_LEAD:
        return "is more than a day after its arrival"
    if moment < EARLIEST_EVENT:
        return "is before 1990"
    return None


@dataclass(frozen=True)
class EventTime:
    """An event's time, and what the sender stated when that could not be used."""

    occurred_at: datetime
    stated: Any = None
    problem: str | None = None

    def metadata(self) -> dict[str, Any]:
        """``stated_time`` and ``stated_time_problem`` when the stated time was replaced."""
        if self.problem is None:
            return {}
        return {"stated_time": _as_stated(self.stated), "stated_time_problem": self.problem}


def _as_stated(value: Any) -> Any:
    """The given time as JSON keeps it: text and finite numbers as they are, anything else as text."""
    if isinstance(value, str):
        return value[:100]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return json.dumps(value, default=str)[:100]  # NaN, 1e400, huge integers, objects


def event_time(value: Any, received_at: datetime) -> EventTime:
    """The time an event happened: ``value`` as stated, or ``received_at`` when none is given
    or the given one is not a time or implausible (see :func:`implausible_time`)."""
    if value is None or value == "":
        return EventTime(received_at)
    try:
        moment = parse_timestamp(value)
    except WebhookError as exc:  # every unreadable time becomes one
        return EventTime(received_at, value, exc.reason)
    problem = implausible_time(moment, received_at)
    if problem:
        return EventTime(received_at, value, f"{moment.isoformat()} {problem}")
    return EventTime(moment)


def parse_timestamp(value: Any) -> datetime:
    """RFC 3339 / ISO 8601 text or Unix seconds (milliseconds are recognised by size), in UTC.

    Whatever a provider sends, the answer is a time or a :class:`WebhookError` (400): digits
    other than ASCII, NaN and infinities, numbers and offsets beyond the calendar's years
    1-9999 are refused here rather than failing later as a server error.
    """
    if isinstance(value, bool):
        raise WebhookError(_TIMESTAMP_FORMS)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise WebhookError(_TIMESTAMP_FORMS)
        if not text.isascii():
            raise WebhookError(f"timestamp {text[:40]!r} is not an ISO 8601 time")
        if text.replace(".", "", 1).isdigit():
            return parse_timestamp(float(text))
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            # Near year 1 or 9999 an offset can carry the time outside the calendar.
            return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except (ValueError, OverflowError) as exc:
            raise WebhookError(f"timestamp {text[:40]!r} is not an ISO 8601 time") from exc
    if isinstance(value, int | float):
        try:
            seconds = value / 1000 if value > _MILLISECONDS_FROM else value
            return datetime.fromtimestamp(seconds, UTC)  # NaN: ValueError, inf: OverflowError
        except (OverflowError, OSError, ValueError) as exc:
            raise WebhookError("timestamp is out of range") from exc
    raise WebhookError(_TIMESTAMP_FORMS)


def _text(payload: dict[str, Any], name: str, limit: int = 2000) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise WebhookError(f"{name} must be a string")
    return value.strip()[:limit] or None


def parse_generic(kind: str, body: bytes, received_at: datetime) -> tuple[Event, str]:
    """The event a generic webhook describes, and the success message to answer with."""
    endpoint = ENDPOINTS.get(kind)
    if endpoint is None:
        raise WebhookError(f"unknown event {kind!r}", 404)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookError("body is not valid JSON") from exc
    if not isinstance(payload, dict):
        raise WebhookError("body must be a JSON object")
    named = payload.get("event", payload.get("type"))
    if named is not None and str(named).lower() not in endpoint.names:
        raise WebhookError(f"unknown event {str(named)[:40]!r} for /track/{kind}/")
    tracking_id = None
    raw_id = payload.get("tracking_id")
    if raw_id not in (None, ""):
        tracking_id = parse_tracking_id(str(raw_id)) if isinstance(raw_id, str) else None
        if tracking_id is None:
            raise WebhookError("tracking_id is not a UUID")
    email = _text(payload, "email", 320)
    if email is not None and "@" not in email:
        raise WebhookError("email is not an address")
    if tracking_id is None and email is None:
        raise WebhookError("missing field: tracking_id or email is required")
    bounce_kind = None
    if endpoint.event_type is EventType.BOUNCED:
        bounce_kind = (_text(payload, "bounce_type", 20) or "hard").lower()
        if bounce_kind not in ("hard", "soft"):
            raise WebhookError("bounce_type must be 'hard' or 'soft'")
    timestamp = payload.get("timestamp")
    when = event_time(timestamp, received_at)
    reason = _text(payload, "reason")
    supplied_id = _text(payload, "event_id", 150)
    if supplied_id:
        event_id = f"generic:{supplied_id}"
    elif timestamp is not None and timestamp != "":
        # The same report retried is the same event: derive the id from its content (and from
        # the time as stated when it was replaced: the arrival time differs on every retry).
        stated = when.occurred_at.isoformat() if when.problem is None else _as_stated(timestamp)
        identity = json.dumps([kind, tracking_id, email, bounce_kind, reason, stated])
        event_id = f"generic:{hashlib.sha256(identity.encode()).hexdigest()[:32]}"
    else:
        event_id = new_event_id()
    event = Event(
        event_id=event_id,
        type=endpoint.event_type,
        tracking_id=tracking_id,
        recipient=email,
        occurred_at=when.occurred_at,
        bounce_kind=bounce_kind,
        reason=reason,
        source="webhook:generic",
        metadata={"payload": payload, **when.metadata()},
    )
    return event, endpoint.answer
