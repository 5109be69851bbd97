"""Prometheus metrics of the SMTP proxy (names are part of the dashboard contract)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MESSAGES = Counter(
    "mailbeacon_proxy_messages_total",
    "Messages received from apps, by the answer they got",
    ["result"],  # accepted, partial, deferred, rejected, paused
)
COPIES = Counter(
    "mailbeacon_proxy_copies_total",
    "Per-recipient copies relayed upstream, by outcome",
    ["result"],  # sent, failed, deferred
)
UNTRACKED = Counter("mailbeacon_proxy_untracked_messages_total", "Messages relayed without tracking", ["why"])
REWRITE_FAILURES = Counter(
    "mailbeacon_proxy_rewrite_failures_total", "Copies relayed unchanged because rewriting failed"
)
UPSTREAM_ERRORS = Counter(
    "mailbeacon_proxy_upstream_errors_total",
    "Upstream refusals and failures by SMTP code class",
    ["code_class"],
)
RELAY_SECONDS = Histogram(
    "mailbeacon_proxy_relay_seconds",
    "Time to relay all copies of one message upstream",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
