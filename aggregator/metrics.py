"""Prometheus metrics of the aggregator. Labels carry campaigns and event types only,
never recipients, URLs or tracking ids (unbounded cardinality and personal data)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from aggregator.ingest import BatchResult

EVENTS = Counter("mailbeacon_events_total", "Events applied to campaign statistics", ["campaign", "type"])
DUPLICATES = Counter("mailbeacon_aggregator_duplicate_events_total", "Repeated events ignored")
INVALID = Counter("mailbeacon_aggregator_invalid_events_total", "Malformed events dropped")
BATCH_FAILURES = Counter("mailbeacon_aggregator_batch_failures_total", "Batches rolled back and redelivered")
BATCH_SECONDS = Histogram(
    "mailbeacon_aggregator_batch_seconds",
    "Time to store one batch of events",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LAG = Gauge(
    "mailbeacon_aggregator_ingest_lag_events", "Events in the stream not yet delivered to the aggregator"
)
PARKED = Gauge("mailbeacon_aggregator_parked_events", "Stored events waiting for their message")


def record_batch(result: BatchResult) -> None:
    DUPLICATES.inc(result.duplicates)
    for (campaign, event_type), count in result.by_type.items():
        EVENTS.labels(campaign, event_type).inc(count)
