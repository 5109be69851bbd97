"""Prometheus metrics of the tracker (names are part of the dashboard contract).

They live in the tracker's own registry, :data:`REGISTRY`, which its port serves (in
`mailbeacon up` too: each component's port serves only its own series). Every label value
a counter can take is created at zero here: a series that first appears with its first
increment hides that increment from ``rate()`` and ``increase()``, and a rare event has
nothing else. The children a pixel or click counts on are bound once (``PIXEL_OK``...):
no label lookup on the hot path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.build_info import register_build_info
from mailbeacon.contract.events import EventType
from mailbeacon.web.http_guard import ConnectionLimits

REGISTRY = CollectorRegistry(auto_describe=True)
BUILD_INFO = register_build_info(REGISTRY, "tracker")


class CountChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter kept in plain numbers, exported like prometheus_client's Counter.

    Every pixel and click counts twice; prometheus_client's Counter takes a lock for each
    increment. The tracker counts on its one event loop, so a plain addition does the same
    job (``labels(...).inc()`` as with a Counter; children are cached by their labels).
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self._children: dict[tuple[str, ...], CountChild] = {}

    def labels(self, *values: str) -> CountChild:
        key = tuple(str(value) for value in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, not {key}")
            child = self._children[key] = CountChild()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


REQUESTS = LoopCounter(
    "mailbeacon_tracker_requests", "Tracker requests by kind and the HTTP status answered", ("kind", "status")
)
BUFFERED = Gauge(
    "mailbeacon_tracker_buffered_events", "Pixel and click events waiting for NATS", registry=REGISTRY
)
DROPPED = Gauge(
    "mailbeacon_tracker_dropped_events", "Events dropped because the buffer was full", registry=REGISTRY
)
PUBLISHED = Gauge(
    "mailbeacon_tracker_published_events", "Events JetStream acknowledged since start", registry=REGISTRY
)
NATS_CONNECTED = Gauge(
    "mailbeacon_tracker_nats_connected", "1 while the tracker's NATS connection is up", registry=REGISTRY
)
HELD_CLICKS = Gauge(
    "mailbeacon_tracker_held_clicks", "Click events held for the scanner-burst window", registry=REGISTRY
)
CONNECTIONS = Gauge(
    "mailbeacon_tracker_connections", "Open client connections of this tracker process", registry=REGISTRY
)
CONNECTIONS_REFUSED = Gauge(
    "mailbeacon_tracker_connections_refused",
    "Connections answered 503 above TRACKER_MAX_CONNECTIONS since start",
    registry=REGISTRY,
)
CONNECTIONS_TIMED_OUT = Gauge(
    "mailbeacon_tracker_connections_timed_out",
    "Connections closed for not sending request headers within TRACKER_HEADER_TIMEOUT_SECONDS since start",
    registry=REGISTRY,
)
ENGAGEMENTS = LoopCounter(
    "mailbeacon_tracker_engagements",
    "Opens and clicks by verdict (machine_kind, or 'human'); a click counts once its burst window is over",
    ("type", "verdict"),
)
REGISTRY.register(REQUESTS)
REGISTRY.register(ENGAGEMENTS)
WEBHOOKS = Counter(
    "mailbeacon_tracker_webhooks_total",
    "Provider webhook requests by outcome (stored, refused, invalid, unavailable)",
    ["provider", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_EVENTS = Counter(
    "mailbeacon_tracker_webhook_events_total",
    "Events stored from provider webhooks",
    ["provider", "type"],
    registry=REGISTRY,
)

# The label values, each series created at zero below.
# Machine verdicts (tracker.classify, tracker.engagement.bursts); tests hold this to the verdicts made there.
MACHINE_KINDS: Final = (
    "apple_privacy_proxy",
    "burst",
    "head_request",
    "honeypot",
    "image_proxy",
    "link_preview",
    "no_user_agent",
    "prefetch",
    "security_scanner",
)
PROVIDERS: Final = ("generic", "sendgrid", "mailgun", "ses", "postmark")
OUTCOMES: Final = ("stored", "refused", "invalid", "unavailable")
GENERIC_KINDS: Final = ("bounce", "delivery", "complaint")
GENERIC_TYPES: Final = (EventType.BOUNCED, EventType.DELIVERED, EventType.COMPLAINED)
PROVIDER_TYPES: Final = tuple(t for t in EventType if t is not EventType.SENT)
# The routes measured, by a fixed name (never a tracking id, URL or provider taken from the path).
ROUTES: Final = ("pixel", "click", "unsubscribe_page", "unsubscribe", "webhook")
# Statuses a webhook answers with (tracker.webhooks.webhooks, tracker.webhooks.webhook_limits, tracker.webhooks.esp).
WEBHOOK_STATUSES: Final = ("200", "400", "401", "403", "413", "503")
# kind -> the statuses it answers with, all known in advance.
REQUEST_KINDS: Final = {
    "pixel": ("200", "400"),
    "click": ("302",),
    "click_invalid": ("400",),
    "click_forged": ("400",),
    "click_honeypot": ("200",),
    "unsubscribe_page": ("200", "400"),
    "unsubscribe": ("200", "400"),
    **{f"webhook_generic_{kind}": WEBHOOK_STATUSES for kind in GENERIC_KINDS},
    **{f"webhook_{provider}": WEBHOOK_STATUSES for provider in PROVIDERS if provider != "generic"},
}

for _kind, _statuses in REQUEST_KINDS.items():
    for _status in _statuses:
        REQUESTS.labels(_kind, _status)
for _route in ROUTES:  # a handler that failed unexpectedly, answered 503 by its route's guard
    REQUESTS.labels(_route, "503")
for _provider in PROVIDERS:
    for _outcome in OUTCOMES:
        WEBHOOKS.labels(_provider, _outcome)
    for _type in GENERIC_TYPES if _provider == "generic" else PROVIDER_TYPES:
        WEBHOOK_EVENTS.labels(_provider, _type.value)

_engagement_children: dict[tuple[str, str], CountChild] = {
    (event_type, verdict): ENGAGEMENTS.labels(event_type, verdict)
    for event_type in (EventType.OPENED.value, EventType.CLICKED.value)
    for verdict in ("human", *MACHINE_KINDS)
}


def count_engagement(event_type: str, verdict: str) -> None:
    """``ENGAGEMENTS.labels(...).inc()`` without the label lookup on every pixel and click."""
    child = _engagement_children.get((event_type, verdict))
    if child is None:
        child = _engagement_children[(event_type, verdict)] = ENGAGEMENTS.labels(event_type, verdict)
    child.value += 1


# The children counted on every pixel load and click, and on the rarer answers.
PIXEL_OK = REQUESTS.labels("pixel", "200")
PIXEL_INVALID = REQUESTS.labels("pixel", "400")
CLICK_OK = REQUESTS.labels("click", "302")
CLICK_INVALID = REQUESTS.labels("click_invalid", "400")
CLICK_FORGED = REQUESTS.labels("click_forged", "400")
CLICK_HONEYPOT = REQUESTS.labels("click_honeypot", "200")
UNSUBSCRIBE_PAGE_OK = REQUESTS.labels("unsubscribe_page", "200")
UNSUBSCRIBE_PAGE_INVALID = REQUESTS.labels("unsubscribe_page", "400")
UNSUBSCRIBE_OK = REQUESTS.labels("unsubscribe", "200")
UNSUBSCRIBE_REFUSED = REQUESTS.labels("unsubscribe", "400")


def count_request(kind: str, status: int) -> None:
    """A webhook's request by the status it was answered with (not on the pixel/click path)."""
    REQUESTS.labels(kind, str(status)).inc()


def watch_publisher(publisher: EventPublisher, held: Callable[[], int] = lambda: 0) -> None:
    """Report the publisher's buffer at scrape time instead of updating on every event."""
    BUFFERED.set_function(lambda: publisher.buffered)
    DROPPED.set_function(lambda: publisher.dropped)
    PUBLISHED.set_function(lambda: publisher.published)
    NATS_CONNECTED.set_function(lambda: 1 if publisher.connected else 0)
    HELD_CLICKS.set_function(held)


def watch_connections(limits: ConnectionLimits) -> None:
    CONNECTIONS.set_function(lambda: limits.open)
    CONNECTIONS_REFUSED.set_function(lambda: limits.refused)
    CONNECTIONS_TIMED_OUT.set_function(lambda: limits.timed_out)


def outcome_of(status: int) -> str:
    if status < 300:
        return "stored"
    if status in (401, 403):
        return "refused"
    if status >= 500:
        return "unavailable"
    return "invalid"


# Upper bounds of the latency buckets, in seconds: a pixel or redirect is answered in well
# under a millisecond, a webhook waits for JetStream's acknowledgement.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Answer = Callable[[web.Request], web.StreamResponse]
ErrorAnswer = Callable[[web.Request, Exception], web.StreamResponse]


class RequestLatency(Collector):
    """``mailbeacon_tracker_request_seconds{route}``: time the tracker's handlers take to answer.

    The histogram every pixel and click goes through. prometheus_client's Histogram takes a
    lock and walks the buckets on each observation (about 0.7 µs); the tracker runs on one
    event loop, so plain counters found by bisection do the same for a fifth of that. The
    time runs from the handler's start to its answer; queueing before the handler (a
    saturated loop, the network) shows in the ingress controller's metrics.
    """

    def __init__(self) -> None:
        self._counts = {route: [0] * (len(LATENCY_BUCKETS) + 1) for route in ROUTES}
        self._sums = dict.fromkeys(ROUTES, 0.0)

    def timed(self, route: str, handler: Handler, on_error: ErrorAnswer | None = None) -> Handler:
        """``handler`` with each answer's duration counted under ``route``.

        With ``on_error``, a failure of the handler is answered by ``on_error(request, exc)``
        (which may raise it again) inside the same coroutine: the tracker times and guards
        its routes in one layer instead of a middleware around every pixel and click.
        """
        counts, sums = self._counts[route], self._sums  # KeyError for a route outside ROUTES

        async def measured(request: web.Request) -> web.StreamResponse:
            started = perf_counter()
            try:
                return await handler(request)
            except Exception as exc:
                if on_error is None:
                    raise
                return _guarded(route, on_error(request, exc))
            finally:
                elapsed = perf_counter() - started
                counts[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
                sums[route] += elapsed

        return measured

    def timed_answer(self, route: str, answer: Answer, on_error: ErrorAnswer) -> Handler:
        """:meth:`timed` for a handler that never waits (pixel, click): a plain function
        called from the one coroutine aiohttp runs, rather than a second coroutine for it."""
        counts, sums = self._counts[route], self._sums

        async def measured(request: web.Request) -> web.StreamResponse:
            started = perf_counter()
            try:
                return answer(request)
            except Exception as exc:
                return _guarded(route, on_error(request, exc))
            finally:
                elapsed = perf_counter() - started
                counts[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
                sums[route] += elapsed

        return measured

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "mailbeacon_tracker_request_seconds",
            "Time the tracker takes to answer a request, by route",
            labels=["route"],
        )
        for route in ROUTES:
            counts, cumulative, buckets = self._counts[route], 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((_le(bound), float(cumulative)))
            family.add_metric([route], buckets, self._sums[route])
        yield family


def _guarded(route: str, response: web.StreamResponse) -> web.StreamResponse:
    """A handler's failure, answered by its route's guard, counted under the route's name."""
    REQUESTS.labels(route, str(response.status)).inc()
    return response


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it ("0.0001", "1.0", "+Inf")."""
    return "+Inf" if bound == float("inf") else repr(bound)


REQUEST_LATENCY = RequestLatency()
REGISTRY.register(REQUEST_LATENCY)
