"""Prometheus metrics of the aggregator.

Labels carry campaigns (``namespace/name``), event types and fixed names only, never
recipients, URLs or tracking ids (unbounded cardinality and personal data).

Two kinds of series:

- process counters (``mailbeacon_events_total``, batch latency, duplicates...): what this
  replica did; sum them across replicas.
- campaign gauges (``mailbeacon_campaign_*``): the exact statistics from the database,
  read every few seconds; every replica reports the same value, so aggregate them with
  ``max by (campaign)``.

They live in the aggregator's own registry, :data:`REGISTRY`, which its port serves (in
`mailbeacon up` too: each component's port serves only its own series). Every label value
a counter can take exists at zero before its first increment (a campaign's event types as
soon as the campaign is known): a series that first appears with its first increment
hides that increment from ``rate()`` and ``increase()``, and a rare event has nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailbeacon.bus.suppressions import REASONS
from mailbeacon.contract.build_info import register_build_info
from mailbeacon.contract.events import EventType

REGISTRY = CollectorRegistry(auto_describe=True)
BUILD_INFO = register_build_info(REGISTRY, "aggregator")

EVENTS = Counter(
    "mailbeacon_events_total",
    "Events applied to campaign statistics",
    ["campaign", "type"],
    registry=REGISTRY,
)
RECEIVED = Counter(
    "mailbeacon_aggregator_events_received_total", "Events taken from the stream", registry=REGISTRY
)
DUPLICATES = Counter(
    "mailbeacon_aggregator_duplicate_events_total", "Repeated events ignored", registry=REGISTRY
)
PARKED_TOTAL = Counter(
    "mailbeacon_aggregator_events_parked_total",
    "Events stored to wait for a message not seen yet",
    registry=REGISTRY,
)
INVALID = Counter("mailbeacon_aggregator_invalid_events_total", "Malformed events dropped", registry=REGISTRY)
REJECTED = Counter(
    "mailbeacon_aggregator_events_rejected_total",
    "Valid events the database refused to store every time (terminated so they stop stalling ingest)",
    registry=REGISTRY,
)
BATCH_FAILURES = Counter(
    "mailbeacon_aggregator_batch_failures_total", "Batches rolled back and redelivered", registry=REGISTRY
)
PRUNED = Counter(
    "mailbeacon_aggregator_pruned_events_total", "Stored events removed by retention", registry=REGISTRY
)
BATCH_SECONDS = Histogram(
    "mailbeacon_aggregator_batch_seconds",
    "Time to store one batch of events",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
LAG = Gauge(
    "mailbeacon_aggregator_ingest_lag_events",
    "Events in the stream not yet delivered to the aggregator",
    registry=REGISTRY,
)
LAG_SECONDS = Gauge(
    "mailbeacon_aggregator_ingest_lag_seconds",
    "Age of the newest stored event when its batch committed",
    registry=REGISTRY,
)
PARKED = Gauge(
    "mailbeacon_aggregator_parked_events", "Stored events waiting for their message", registry=REGISTRY
)
PARKED_EXPIRED = Counter(
    "mailbeacon_aggregator_parked_events_expired_total",
    "Parked events deleted after waiting PARKED_EVENT_TTL_HOURS for their message (they never counted)",
    ["type"],
    registry=REGISTRY,
)
PARKED_DROPPED = Counter(
    "mailbeacon_aggregator_parked_events_dropped_total",
    "Oldest parked events deleted beyond PARKED_EVENT_LIMIT (they never counted)",
    ["type"],
    registry=REGISTRY,
)
SUPPRESSIONS_RECORDED = Counter(
    "mailbeacon_aggregator_suppressions_recorded_total",
    "Unsubscribes and complaints put into the suppression bucket (repeats included)",
    ["reason"],
    registry=REGISTRY,
)
SUPPRESSION_WATCH_OVERFLOW = Counter(
    "mailbeacon_aggregator_suppression_watch_overflow_total",
    "Parked unsubscribes/complaints no longer watched because newer ones filled the watch "
    "(the next start's catch-up records any that get applied)",
    registry=REGISTRY,
)

EVENT_TYPES = tuple(t.value for t in EventType)
# Everything but ``sent`` can wait for its message (a ``sent`` makes the message).
PARKED_TYPES = tuple(t for t in EVENT_TYPES if t != EventType.SENT.value)
for _type in PARKED_TYPES:
    PARKED_EXPIRED.labels(_type)
    PARKED_DROPPED.labels(_type)
for _reason in REASONS:
    SUPPRESSIONS_RECORDED.labels(_reason)


class BatchCounts(Protocol):
    """What one ingested batch did (ingest's ``BatchResult``; ingest counts here, so this
    module does not import it)."""

    @property
    def duplicates(self) -> int: ...
    @property
    def parked(self) -> int: ...
    @property
    def by_type(self) -> Mapping[tuple[str, str], int]: ...


# The children of mailbeacon_events_total, by (campaign, type): bound once per campaign.
_events: dict[tuple[str, str], Counter] = {}


def campaign_seen(campaign: str) -> None:
    """Create a campaign's ``mailbeacon_events_total`` series at zero, every type at once."""
    if (campaign, EVENT_TYPES[0]) in _events:
        return
    for event_type in EVENT_TYPES:
        _events[(campaign, event_type)] = EVENTS.labels(campaign, event_type)


def record_batch(result: BatchCounts, received: int) -> None:
    RECEIVED.inc(received)
    DUPLICATES.inc(result.duplicates)
    PARKED_TOTAL.inc(result.parked)
    for key, count in result.by_type.items():
        child = _events.get(key)
        if child is None:  # a campaign's first events
            campaign_seen(key[0])
            child = _events.get(key)
            if child is None:  # a type outside EventType: never, but counted all the same
                child = _events[key] = EVENTS.labels(*key)
        child.inc(count)


_MESSAGE_STATES = {
    "sent": "sent_count",
    "failed": "failed_count",
    "delivered": "delivered_count",
    "deferred": "deferred_count",
    "bounced": "bounced_count",
    "hard_bounced": "hard_bounced_count",
    "soft_bounced": "soft_bounced_count",
    "complained": "complained_count",
    "unsubscribed": "unsubscribed_count",
}
_SINGLE = {
    "recipients": ("total_recipients", "Distinct recipients with a sent or failed message"),
    "unique_opens": ("unique_opens", "Messages opened at least once"),
    "human_unique_opens": ("human_unique_opens", "Messages opened at least once by a person"),
    "opens": ("total_opens", "Open events"),
    "unique_clicks": ("unique_clicks", "Messages clicked at least once"),
    "human_unique_clicks": ("human_unique_clicks", "Messages clicked at least once by a person"),
    "clicks": ("total_clicks", "Click events"),
}
_RATES = ("delivery", "open", "click", "human_open", "human_click", "bounce", "complaint")


class CampaignStatistics(Collector):
    """Campaign gauges from the last snapshot of the database's statistics."""

    def __init__(self) -> None:
        self._snapshot: list[Mapping[str, Any]] = []

    def update(self, campaigns: Iterable[Mapping[str, Any]]) -> None:
        self._snapshot = list(campaigns)
        for stats in self._snapshot:
            campaign_seen(str(stats["campaign"]))

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot
        messages = GaugeMetricFamily(
            "mailbeacon_campaign_messages",
            "Messages per campaign by what happened to them",
            labels=["campaign", "state"],
        )
        rates = GaugeMetricFamily(
            "mailbeacon_campaign_rate_percent",
            "Campaign rates as docs/architecture.md (Statistics) defines them",
            labels=["campaign", "rate"],
        )
        singles = {
            name: GaugeMetricFamily(f"mailbeacon_campaign_{name}", help_text, labels=["campaign"])
            for name, (_, help_text) in _SINGLE.items()
        }
        for stats in snapshot:
            campaign = str(stats["campaign"])
            for state, field in _MESSAGE_STATES.items():
                messages.add_metric([campaign, state], float(stats.get(field, 0)))
            for rate in _RATES:
                rates.add_metric([campaign, rate], float(stats.get(f"{rate}_rate", 0.0)))
            for name, (field, _) in _SINGLE.items():
                singles[name].add_metric([campaign], float(stats.get(field, 0)))
        yield messages
        yield rates
        yield from singles.values()


CAMPAIGNS = CampaignStatistics()
REGISTRY.register(CAMPAIGNS)


class CampaignDomains(Collector):
    """``mailbeacon_campaign_domain_messages{campaign,domain,state}``: copies per mailbox provider
    (``domain`` is one of aggregator.store.domains.PROVIDERS, never a recipient's own domain)."""

    def __init__(self) -> None:
        self._snapshot: Mapping[str, Mapping[str, Mapping[str, int]]] = {}

    def update(self, snapshot: Mapping[str, Mapping[str, Mapping[str, int]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "mailbeacon_campaign_domain_messages",
            "Messages per campaign and mailbox provider by what happened to them",
            labels=["campaign", "domain", "state"],
        )
        for campaign, providers in self._snapshot.items():
            for provider, counts in providers.items():
                for state, value in counts.items():
                    family.add_metric([campaign, provider, state], float(value))
        yield family


DOMAINS = CampaignDomains()
REGISTRY.register(DOMAINS)
