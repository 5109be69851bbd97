"""Reading stored events: filters, keyset pagination, a message's timeline, CSV rows.

Lists are newest first by ``(occurred_at, id)`` and paginate with an opaque cursor that
names the last row shown, so a page is one index range scan however deep it is, and rows
arriving meanwhile never shift or repeat a page.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from multidict import MultiMapping
from sqlalchemy import and_, or_, select

from aggregator.store.db import Database
from aggregator.store.models import EVENTS, MESSAGES
from aggregator.store.times import as_utc, iso_utc, parse_moment
from mailbeacon.contract.events import EventType, parse_tracking_id
from mailbeacon.contract.signing import HONEYPOT_URL

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
CSV_COLUMNS = (
    "occurred_at",
    "type",
    "campaign",
    "tracking_id",
    "recipient",
    "url",
    "bounce_kind",
    "reason",
    "machine",
    "machine_kind",
    "ip",
    "user_agent",
    "source",
    "event_id",
    "received_at",
    "applied",
)


class BadQuery(ValueError):
    """A filter or cursor that cannot be used; the message says why (answered as 400)."""


@dataclass(frozen=True)
class EventFilter:
    campaign: str | None = None
    types: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[Any]:
        e = EVENTS.c
        found: list[Any] = []
        if self.campaign is not None:
            found.append(e.campaign == self.campaign)
        if self.types:
            found.append(e.type.in_(self.types))
        if self.since is not None:
            found.append(e.occurred_at >= self.since)
        if self.until is not None:
            found.append(e.occurred_at < self.until)
        return found


def _moment(name: str, value: str, end_of_day: bool) -> datetime:
    """RFC 3339 or a plain date; ``until=2026-05-01`` includes that whole day."""
    value = value.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime.combine(day, time(), tzinfo=UTC)
            return moment + timedelta(days=1) if end_of_day else moment
        if "T" in value and " " in value:
            value = value.replace(" ", "+", 1)  # a "+02:00" offset sent unencoded arrives as a space
        return parse_moment(value)
    except OverflowError as exc:  # the day after 9999-12-31
        raise BadQuery(f"{name} must be a time between the years 1 and 9999 (UTC), got {value!r}") from exc
    except ValueError as exc:
        raise BadQuery(
            f"{name} must be a date (2026-05-01) or an RFC 3339 time between the years 1 and 9999 "
            f"(UTC), got {value!r}"
        ) from exc


def parse_filter(query: MultiMapping[str], campaign: str | None) -> EventFilter:
    """``type`` (repeated or comma-separated), ``since`` and ``until`` from a query string."""
    types: list[str] = []
    for part in ",".join(query.getall("type", [])).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part not in EventType.__members__.values():
            allowed = ", ".join(t.value for t in EventType)
            raise BadQuery(f"unknown event type {part!r}; use one of {allowed}")
        types.append(part)
    since = _moment("since", query["since"], False) if query.get("since") else None
    until = _moment("until", query["until"], True) if query.get("until") else None
    if since and until and since >= until:
        raise BadQuery("since must be earlier than until")
    return EventFilter(campaign, tuple(dict.fromkeys(types)), since, until)


_WHOLE_NUMBER = re.compile(r"[0-9]{1,6}")  # ASCII digits only: "²".isdigit() is true
_MAX_ROW_ID = 2**63 - 1  # events.id is a 64-bit integer
_ROW_ID = re.compile(r"[0-9]{1,19}")


def parse_limit(value: str | None) -> int:
    """``limit``: 1 to :data:`MAX_LIMIT` (anything else is a 400, never clamped)."""
    if not value:
        return DEFAULT_LIMIT
    if not _WHOLE_NUMBER.fullmatch(value) or not 1 <= int(value) <= MAX_LIMIT:
        raise BadQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(value)


def encode_cursor(occurred_at: datetime, row_id: int) -> str:
    raw = f"{as_utc(occurred_at).isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, _, row_id = raw.partition("|")
        if not _ROW_ID.fullmatch(row_id) or int(row_id) > _MAX_ROW_ID:
            raise ValueError("not a row id")
        return parse_moment(moment), int(row_id)
    except (ValueError, binascii.Error) as exc:  # UnicodeDecodeError is a ValueError
        raise BadQuery("cursor is not one this server handed out") from exc


def describe(row: Mapping[str, Any]) -> str:
    """One line on what the event says, for timelines."""
    kind = row["type"]
    if kind == EventType.CLICKED.value:
        if row["url"] == HONEYPOT_URL:
            return "hidden honeypot link (automated click)"
        return str(row["url"] or "")
    if kind == EventType.BOUNCED.value:
        return f"{row['bounce_kind'] or ''} bounce {row['reason'] or ''}".strip()
    if kind == EventType.OPENED.value and row["machine"]:
        return f"automated: {row['machine_kind'] or 'machine'}"
    return str(row["reason"] or "")


def event_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "event_id": row["event_id"],
        "type": row["type"],
        "occurred_at": iso_utc(row["occurred_at"]),
        "received_at": iso_utc(row["received_at"]),
        "campaign": row["campaign"],
        "tracking_id": row["tracking_id"],
        # Pixel loads and clicks do not name the recipient; their message does.
        "recipient": row["recipient"] or row.get("message_recipient"),
        "url": row["url"],
        "bounce_kind": row["bounce_kind"],
        "reason": row["reason"],
        "machine": bool(row["machine"]),
        "machine_kind": row["machine_kind"],
        "ip": row["ip"],
        "user_agent": row["user_agent"],
        "source": row["source"],
        "applied": bool(row["applied"]),
        "detail": describe(row),
    }


def with_message_recipient(query: Any) -> Any:
    """``query`` over events, plus the recipient of each event's message."""
    return query.add_columns(MESSAGES.c.recipient.label("message_recipient")).select_from(
        EVENTS.outerjoin(MESSAGES, MESSAGES.c.tracking_id == EVENTS.c.tracking_id)
    )


async def list_events(
    db: Database, flt: EventFilter, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page, newest first, and the cursor of the next page (None on the last)."""
    e = EVENTS.c
    conditions = flt.conditions()
    if cursor:
        at, row_id = decode_cursor(cursor)
        conditions.append(or_(e.occurred_at < at, and_(e.occurred_at == at, e.id < row_id)))
    query = (
        with_message_recipient(select(EVENTS))
        .where(*conditions)
        .order_by(e.occurred_at.desc(), e.id.desc())
        .limit(limit + 1)
    )
    async with db.read_engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    page = [dict(r) for r in rows[:limit]]
    following = encode_cursor(page[-1]["occurred_at"], page[-1]["id"]) if len(rows) > limit else None
    return [event_json(r) for r in page], following


async def stream_events(db: Database, flt: EventFilter, chunk: int = 1000) -> AsyncIterator[dict[str, Any]]:
    """Every matching event, newest first, read a chunk at a time (never all in memory)."""
    cursor: str | None = None
    while True:
        page, cursor = await list_events(db, flt, chunk, cursor)
        for row in page:
            yield row
        if cursor is None:
            return


def csv_cell(value: Any) -> str:
    """A value as a spreadsheet-safe CSV cell: formulas from recipients' data are defused."""
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


async def message_timeline(db: Database, tracking_id: str) -> dict[str, Any] | None:
    """A recipient copy, its first-seen times, and all its events oldest first."""
    canonical = parse_tracking_id(tracking_id)
    if canonical is None:
        raise BadQuery("tracking id must be a UUID")
    m, e = MESSAGES.c, EVENTS.c
    async with db.read_engine.connect() as conn:
        message = (await conn.execute(select(MESSAGES).where(m.tracking_id == canonical))).mappings().first()
        events = (
            (
                await conn.execute(
                    select(EVENTS).where(e.tracking_id == canonical).order_by(e.occurred_at, e.id)
                )
            )
            .mappings()
            .all()
        )
    if message is None and not events:
        return None
    times = (
        "sent_at",
        "delivered_at",
        "deferred_at",
        "first_opened_at",
        "first_human_opened_at",
        "first_clicked_at",
        "first_human_clicked_at",
        "bounced_at",
        "complained_at",
        "unsubscribed_at",
    )
    return {
        "tracking_id": canonical,
        "known": message is not None,
        "campaign": message["campaign"] if message else None,
        "recipient": message["recipient"] if message else None,
        "message_id": message["message_id"] if message else None,
        "status": message["status"] if message else None,
        "bounce_kind": message["bounce_kind"] if message else None,
        "open_count": message["open_count"] if message else 0,
        "click_count": message["click_count"] if message else 0,
        **{name: iso_utc(message[name]) if message else None for name in times},
        "events": [event_json(dict(r)) for r in events],
    }
