"""Prometheus metrics of the tracker (names are part of the dashboard contract)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge

from mailbeacon.jetstream import EventPublisher

REQUESTS = Counter("mailbeacon_tracker_requests_total", "Tracker requests by kind", ["kind"])
BUFFERED = Gauge("mailbeacon_tracker_buffered_events", "Pixel and click events waiting for NATS")
DROPPED = Gauge("mailbeacon_tracker_dropped_events", "Events dropped because the buffer was full")
PUBLISHED = Gauge("mailbeacon_tracker_published_events", "Events JetStream acknowledged since start")
NATS_CONNECTED = Gauge("mailbeacon_tracker_nats_connected", "1 while the tracker's NATS connection is up")
HELD_CLICKS = Gauge("mailbeacon_tracker_held_clicks", "Click events held for the scanner-burst window")
ENGAGEMENTS = Counter(
    "mailbeacon_tracker_engagements_total",
    "Opens and clicks by verdict (machine_kind, or 'human')",
    ["type", "verdict"],
)
WEBHOOKS = Counter(
    "mailbeacon_tracker_webhooks_total",
    "Provider webhook requests by outcome (stored, refused, invalid, unavailable)",
    ["provider", "outcome"],
)
WEBHOOK_EVENTS = Counter(
    "mailbeacon_tracker_webhook_events_total", "Events stored from provider webhooks", ["provider", "type"]
)


_engagement_children: dict[tuple[str, str], Counter] = {}


def count_engagement(event_type: str, verdict: str) -> None:
    """``ENGAGEMENTS.labels(...).inc()`` without the label lookup on every pixel and click."""
    child = _engagement_children.get((event_type, verdict))
    if child is None:
        child = _engagement_children[(event_type, verdict)] = ENGAGEMENTS.labels(event_type, verdict)
    child.inc()


PIXEL_REQUESTS = REQUESTS.labels("pixel")
CLICK_REQUESTS = REQUESTS.labels("click")


def watch_publisher(publisher: EventPublisher, held: Callable[[], int] = lambda: 0) -> None:
    """Report the publisher's buffer at scrape time instead of updating on every event."""
    BUFFERED.set_function(lambda: publisher.buffered)
    DROPPED.set_function(lambda: publisher.dropped)
    PUBLISHED.set_function(lambda: publisher.published)
    NATS_CONNECTED.set_function(lambda: 1 if publisher.connected else 0)
    HELD_CLICKS.set_function(held)


def outcome_of(status: int) -> str:
    if status < 300:
        return "stored"
    if status in (401, 403):
        return "refused"
    if status >= 500:
        return "unavailable"
    return "invalid"
