"""What every ESP adapter shares: the request it sees, what it answers, and small helpers.

An adapter is a module with two functions::

    async def verify(request: WebhookRequest, context: VerifyContext) -> Authentic
    def parse(request: WebhookRequest, context: ParseContext) -> WebhookResult

``verify`` decides whether the request really comes from the provider (401 for a missing
or wrong signature, 403 for a stale one, 503 while the provider's secret is not
configured) and names the request's replay key; ``parse`` turns an authentic body into events (400 when malformed).
Neither touches the network except the SNS certificate lookup, which goes through the
context so tests and operators can provide certificates ahead of time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailbeacon.contract.events import Event, EventType, derived_event_id, parse_tracking_id
from mailbeacon.contract.settings import Settings
from tracker import classify
from tracker.webhooks.generic_webhooks import WebhookError, implausible_time, parse_timestamp

__all__ = [
    "Authentic",
    "ParseContext",
    "VerifyContext",
    "WebhookError",
    "WebhookRequest",
    "WebhookResult",
    "event_for",
    "load_json",
    "parse_timestamp",
]


@dataclass(frozen=True)
class WebhookRequest:
    """One POST as the adapter sees it: no framework objects, so adapters are plain functions."""

    headers: Mapping[str, str]  # case-insensitive in practice (aiohttp's CIMultiDictProxy)
    body: bytes
    received_at: datetime


@dataclass(frozen=True)
class Authentic:
    """A verified request. ``replay_key`` names what makes a signed request unique; the
    shared replay guard (``tracker.webhooks.replay``) refuses it when it comes back with another body."""

    replay_key: str | None = None


@dataclass
class WebhookResult:
    events: list[Event] = field(default_factory=list)
    note: str = "ok"  # what the answer says, e.g. "3 events stored, 1 ignored"
    ignored: int = 0  # authentic records we have no event type for
    confirm_url: str | None = None  # SNS: the SubscribeURL to visit


CertificateLoader = Callable[[str], Awaitable[bytes]]


@dataclass
class VerifyContext:
    settings: Settings
    now: datetime
    load_certificate: CertificateLoader  # SNS: PEM bytes for a SigningCertURL
    # Off loopback, webhooks that can go without credentials (Postmark) must have them,
    # unless ALLOW_UNAUTHENTICATED_WEBHOOKS (docs/tracker.md "ESP webhooks").
    credentials_required: bool = True


@dataclass(frozen=True)
class ParseContext:
    machine_networks: Sequence[classify.Network] = ()
    max_json_depth: int = 64  # for JSON inside the body (an SNS notification's Message)


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookError("body is not valid JSON") from exc


def mapping(value: Any) -> dict[str, Any]:
    """A nested provider object, or an empty one when it is missing or of another shape."""
    return value if isinstance(value, dict) else {}


def text(value: Any, limit: int = 2000) -> str | None:
    """A provider field as text (numbers allowed), or None when absent or empty."""
    if value is None or isinstance(value, bool | dict | list):
        return None
    result = str(value).strip()[:limit]
    return result or None


def address(value: Any) -> str | None:
    result = text(value, 320)
    return result if result and "@" in result else None


def tracking_id_from(*candidates: Any) -> str | None:
    """The first candidate that is a UUID: providers echo our metadata in various shapes."""
    for candidate in candidates:
        if isinstance(candidate, list) and candidate:
            candidate = candidate[0]
        if isinstance(candidate, str):
            found = parse_tracking_id(candidate.strip())
            if found:
                return found
    return None


def payload_digest(record: Any) -> str:
    """A stable id for records without their own: a retried delivery carries the same record."""
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def event_for(
    source: str,
    natural_id: Sequence[str],
    event_type: EventType,
    record: Mapping[str, Any],
    *,
    occurred_at: datetime,
    tracking_id: str | None,
    recipient: str | None,
    verdict: classify.Verdict | None = None,
    **fields: Any,
) -> Event:
    """The normalized event; the provider's raw record is kept in ``metadata.payload``."""
    metadata: dict[str, Any] = {"provider": source.removeprefix("webhook:"), "payload": dict(record)}
    metadata.update(fields.pop("metadata", {}))
    if verdict is not None and verdict.machine:
        metadata["machine_evidence"] = verdict.evidence
    return Event(
        event_id=derived_event_id(source, *natural_id),
        type=event_type,
        tracking_id=tracking_id,
        recipient=recipient,
        occurred_at=occurred_at,
        source=source,
        machine=bool(verdict and verdict.machine),
        machine_kind=verdict.machine_kind if verdict else None,
        metadata=metadata,
        **fields,
    )


def timestamp_or(value: Any, fallback: datetime) -> datetime:
    """The provider's event time, or ``fallback`` (its arrival) when that is missing,
    unreadable or implausibly far from the arrival.

    An authentic record with an odd time is still worth keeping; refusing it would make
    the provider retry the whole batch for days.
    """
    if value in (None, ""):
        return fallback
    try:
        moment = parse_timestamp(value)
    except WebhookError:  # parse_timestamp turns every unreadable time into one
        return fallback
    return fallback if implausible_time(moment, fallback) else moment


def check_freshness(signed_at: datetime, now: datetime, max_age: float, what: str) -> None:
    age = (now - signed_at).total_seconds()
    if age > max_age:
        raise WebhookError(f"{what} is {int(age)}s old (limit {int(max_age)}s): refused as stale", 403)
    if age < -300:  # clocks disagree a little; far in the future is forged or broken
        raise WebhookError(f"{what} lies in the future", 403)


def not_configured(provider: str, variable: str) -> WebhookError:
    return WebhookError(f"{provider} webhooks are not configured: set MAILBEACON_{variable}", 503)
