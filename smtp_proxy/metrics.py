"""Prometheus metrics of the SMTP proxy (names are part of the dashboard contract)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "mailbeacon_proxy_messages_total",
    "Messages received from apps, by the answer they got",
    ["result"],  # accepted, partial, deferred, rejected, suppressed, paused, error
)
COPIES = Counter(
    "mailbeacon_proxy_copies_total",
    "Per-recipient copies relayed upstream, by outcome",
    ["result"],  # sent, failed, deferred
)
SUPPRESSED = Counter(
    "mailbeacon_proxy_copies_suppressed_total",
    "Copies not relayed because their recipient unsubscribed from or complained about the campaign",
    ["reason"],  # unsubscribed, complained
)
UNTRACKED = Counter(
    "mailbeacon_proxy_untracked_messages_total",
    "Messages or copies relayed without tracking, by why",
    ["why"],  # no_campaign, unknown_campaign, dkim_signed, signed, tracking_off, recipient_opt_out
)
REWRITE_FAILURES = Counter(
    "mailbeacon_proxy_rewrite_failures_total", "Messages relayed unchanged because rewriting failed"
)
UPSTREAM_ERRORS = Counter(
    "mailbeacon_proxy_upstream_errors_total",
    "Upstream refusals and failures by SMTP code class",
    ["code_class"],
)
RELAY_SECONDS = Histogram(
    "mailbeacon_proxy_relay_seconds",
    "Time to relay all copies of one message upstream",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RETRIES = Counter("mailbeacon_proxy_copy_retries_total", "Copies retried after a transient upstream refusal")
UPSTREAM_CONNECTIONS = Gauge("mailbeacon_proxy_upstream_connections", "Open upstream SMTP sessions")
AUTH = Counter("mailbeacon_proxy_auth_total", "SMTP AUTH attempts by result", ["result"])
REFUSED = Counter(
    "mailbeacon_proxy_refused_total",
    "Commands refused by relay policy, by reason",
    ["reason"],  # relay_denied, too_many_recipients, path_too_long, bad_address
)
HANDLER_ERRORS = Counter(
    "mailbeacon_proxy_handler_errors_total", "Unexpected errors answered with 451 instead of a crash"
)
