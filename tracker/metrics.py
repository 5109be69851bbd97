"""Prometheus metrics of the tracker (names are part of the dashboard contract)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from mailbeacon.jetstream import EventPublisher

REQUESTS = Counter("mailbeacon_tracker_requests_total", "Tracker requests by kind", ["kind"])
BUFFERED = Gauge("mailbeacon_tracker_buffered_events", "Pixel and click events waiting for NATS")
DROPPED = Gauge("mailbeacon_tracker_dropped_events", "Events dropped because the buffer was full")


def watch_publisher(publisher: EventPublisher) -> None:
    """Report the publisher's buffer at scrape time instead of updating on every event."""
    BUFFERED.set_function(lambda: publisher.buffered)
    DROPPED.set_function(lambda: publisher.dropped)
