"""The event contract: one JSON object per NATS message (docs/architecture.md "The event contract")."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

SUBJECT_PREFIX = "mailbeacon.events"
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class EventType(StrEnum):
    SENT = "sent"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    OPENED = "opened"
    CLICKED = "clicked"
    BOUNCED = "bounced"
    FAILED = "failed"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"


BounceKind = Literal["hard", "soft"]

SOURCES = (
    "proxy",
    "pixel",
    "click",
    "unsubscribe",
    "webhook:generic",
    "webhook:sendgrid",
    "webhook:mailgun",
    "webhook:ses",
    "webhook:postmark",
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_event_id() -> str:
    """A random id for events that have no natural identity (pixel loads, clicks)."""
    return uuid.uuid4().hex


def derived_event_id(source: str, *parts: str) -> str:
    """An id derived from a provider's own event identity, so a retried webhook is the same event.

    Long or odd provider ids are hashed to keep the id a safe ``Nats-Msg-Id`` and column value.
    """
    natural = ":".join(parts)
    if len(natural) <= 100 and natural.isascii() and natural.isprintable() and " " not in natural:
        return f"{source}:{natural}"
    # surrogatepass: a lone surrogate from a provider's JSON escape still hashes (to a stable id).
    digest = hashlib.sha256(natural.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"{source}:{digest}"


# Column sizes of the store. A NUL character or an oversized value would make the database
# refuse the whole batch it arrives in, so the contract never lets one through: text is cut
# to its size (code that writes or reads events without the model takes the sizes from
# mailbeacon.contract.codec). A longer event id is refused instead.
EVENT_ID_MAX_LENGTH = 200
TEXT_LIMITS = {
    "campaign": 320,
    "recipient": 320,  # the longest address the store keeps; anything longer is no address anyway
    "ip": 64,
    "machine_kind": 64,
    "source": 32,
    "user_agent": 1000,
    "url": 8000,
    "reason": 4000,
}
# The text fields validation cuts to their size (the recipient is trimmed and lower-cased first).
CUT_TEXT_FIELDS = ("campaign", "ip", "machine_kind", "source", "user_agent", "url", "reason")


# A lone surrogate (aiohttp's reading of a non-UTF-8 header byte, a JSON ``\ud800`` escape)
# validates as text but no UTF-8 JSON encoder accepts it, so the event could never be
# published: it becomes U+FFFD, as a decoder replaces any byte that is not UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
# What an event id must not hold: it is a Nats-Msg-Id and a database key (PostgreSQL
# refuses NUL), and an id nobody can print or encode identifies nothing.
_UNFIT_FOR_ID = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def _encodable(value: str) -> str:
    # isascii() is a flag lookup in CPython: the common case costs nothing.
    if value.isascii() or _SURROGATE.search(value) is None:
        return value
    return _SURROGATE.sub("\ufffd", value)


def _clean(value: str, limit: int) -> str:
    if "\x00" in value:
        value = value.replace("\x00", "")
    value = _encodable(value)
    return value if len(value) <= limit else value[:limit]


def _has_surrogate(value: Any) -> bool:
    if type(value) is str:
        return not value.isascii() and _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_surrogate(item) for item in value)
    return False


def _encodable_metadata(value: Any) -> Any:
    if type(value) is str:
        return _encodable(value)
    if isinstance(value, dict):
        return {_encodable_metadata(k): _encodable_metadata(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable_metadata(item) for item in value]
    return value


def storable_recipient(address: str) -> str:
    """An address as events store it: trimmed, lower-cased, cleaned like any text.

    Whatever compares addresses with stored ones (the suppression keys) uses this too, so
    an address with undecodable bytes means the same thing on both sides.
    """
    return _clean(address.strip().lower(), TEXT_LIMITS["recipient"])


def storable_text(field: str, value: str) -> str:
    """``value`` as validation leaves the text field ``field`` of an Event: NUL removed, lone
    surrogates made U+FFFD and cut to the column's size. For code that builds events
    without validation (the tracker's hot path)."""
    return _clean(value, TEXT_LIMITS[field])


class Event(BaseModel):
    """One thing that happened to one recipient copy of a message."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: str = Field(min_length=1, max_length=EVENT_ID_MAX_LENGTH)
    type: EventType
    tracking_id: str | None = None
    campaign: str | None = None
    recipient: str | None = None
    occurred_at: datetime = Field(default_factory=utcnow)
    ip: str | None = None
    user_agent: str | None = None
    url: str | None = None
    bounce_kind: BounceKind | None = None
    reason: str | None = None
    machine: bool = False
    machine_kind: str | None = None
    source: str = "proxy"
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("event_id")
    @classmethod
    def _event_id(cls, value: str) -> str:
        if _UNFIT_FOR_ID.search(value):
            raise ValueError("event_id must not contain control characters or lone surrogates")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Rebuilt only when needed: nearly all metadata is a few plain strings.
        return _encodable_metadata(value) if _has_surrogate(value) else value

    @field_validator("tracking_id")
    @classmethod
    def _tracking_id(cls, value: str | None) -> str | None:
        if value is None or _CANONICAL_UUID.fullmatch(value):
            return value  # already canonical: the common case, checked without building a UUID
        return str(uuid.UUID(value))  # canonical lower-case form, rejects garbage

    @field_validator("recipient")
    @classmethod
    def _recipient(cls, value: str | None) -> str | None:
        return storable_recipient(value) if value else None

    @field_validator(*CUT_TEXT_FIELDS)
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _clean(value, TEXT_LIMITS[info.field_name or ""]) if value is not None else None

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # Naive times are taken as UTC; everything is stored and compared in UTC.
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    @property
    def subject(self) -> str:
        return subject_for(self.type)

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Event:
        return cls.model_validate_json(data)


def subject_for(event_type: EventType | str) -> str:
    return f"{SUBJECT_PREFIX}.{EventType(event_type).value}"


def parse_tracking_id(value: str) -> str | None:
    """The canonical form of a tracking id, or None when it is not a UUID."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        return None
