"""Prometheus metrics of the SMTP proxy (names are part of the dashboard contract).

They live in the proxy's own registry, :data:`REGISTRY`, which its HTTP port serves: in
`mailbeacon up` every component's port serves only that component's series, so summing
over the scraped targets counts each event once. Every label value a counter can take
is created at zero here: a series that first appears with its first increment hides
that increment from ``rate()`` and ``increase()``, which is all a rare event has.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.build_info import register_build_info

REGISTRY = CollectorRegistry(auto_describe=True)
BUILD_INFO = register_build_info(REGISTRY, "proxy")

MESSAGE_RESULTS = ("accepted", "partial", "deferred", "rejected", "suppressed", "paused")
COPY_RESULTS = ("sent", "failed", "deferred")
SUPPRESSION_REASONS = ("unsubscribed", "complained")
UNTRACKED_WHY = (
    "no_campaign",
    "unknown_campaign",
    "dkim_signed",
    "signed",
    "tracking_off",
    "recipient_opt_out",
)
UPSTREAM_CODE_CLASSES = ("4xx", "5xx")
AUTH_RESULTS = ("success", "failure", "too_many_failures")
REFUSAL_REASONS = (
    "relay_denied",
    "too_many_recipients",
    "path_too_long",
    "bad_address",
    "too_many_connections",
)

MESSAGES = Counter(
    "mailbeacon_proxy_messages_total",
    "Messages received from apps, by the answer they got",
    ["result"],
    registry=REGISTRY,
)
COPIES = Counter(
    "mailbeacon_proxy_copies_total",
    "Per-recipient copies relayed upstream, by outcome",
    ["result"],
    registry=REGISTRY,
)
SUPPRESSED = Counter(
    "mailbeacon_proxy_copies_suppressed_total",
    "Copies not relayed because their recipient unsubscribed from or complained about the campaign",
    ["reason"],
    registry=REGISTRY,
)
UNTRACKED = Counter(
    "mailbeacon_proxy_untracked_messages_total",
    "Messages or copies relayed without tracking, by why",
    ["why"],
    registry=REGISTRY,
)
REWRITE_FAILURES = Counter(
    "mailbeacon_proxy_rewrite_failures_total",
    "Messages relayed unchanged because rewriting failed",
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "mailbeacon_proxy_upstream_errors_total",
    "Upstream refusals and failures by SMTP code class",
    ["code_class"],
    registry=REGISTRY,
)
RELAY_SECONDS = Histogram(
    "mailbeacon_proxy_relay_seconds",
    "Time to relay all copies of one message upstream",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
RETRIES = Counter(
    "mailbeacon_proxy_copy_retries_total",
    "Copies retried after a transient upstream refusal",
    registry=REGISTRY,
)
UPSTREAM_CONNECTIONS = Gauge(
    "mailbeacon_proxy_upstream_connections", "Open upstream SMTP sessions", registry=REGISTRY
)
AUTH = Counter("mailbeacon_proxy_auth_total", "SMTP AUTH attempts by result", ["result"], registry=REGISTRY)
REFUSED = Counter(
    "mailbeacon_proxy_refused_total",
    "Commands and connections refused by relay policy and limits, by reason",
    ["reason"],
    registry=REGISTRY,
)
HANDLER_ERRORS = Counter(
    "mailbeacon_proxy_handler_errors_total",
    "Unexpected errors answered with 451 instead of a crash",
    registry=REGISTRY,
)
NATS_CONNECTED = Gauge(
    "mailbeacon_proxy_nats_connected",
    "1 while the proxy's NATS connection is up (sent/failed events wait in its buffer otherwise)",
    registry=REGISTRY,
)

for _counter, _values in (
    (MESSAGES, MESSAGE_RESULTS),
    (COPIES, COPY_RESULTS),
    (SUPPRESSED, SUPPRESSION_REASONS),
    (UNTRACKED, UNTRACKED_WHY),
    (UPSTREAM_ERRORS, UPSTREAM_CODE_CLASSES),
    (AUTH, AUTH_RESULTS),
    (REFUSED, REFUSAL_REASONS),
):
    for _value in _values:
        _counter.labels(_value)


def watch_publisher(publisher: EventPublisher) -> None:
    """Report the publisher's connection at scrape time."""
    NATS_CONNECTED.set_function(lambda: 1 if publisher.connected else 0)
