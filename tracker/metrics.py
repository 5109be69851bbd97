"""Prometheus metrics of the tracker (names are part of the dashboard contract)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import Final

from aiohttp import web
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mailbeacon.http_guard import ConnectionLimits
from mailbeacon.publisher import EventPublisher


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


REQUESTS = LoopCounter("mailbeacon_tracker_requests", "Tracker requests by kind", ("kind",))
BUFFERED = Gauge("mailbeacon_tracker_buffered_events", "Pixel and click events waiting for NATS")
DROPPED = Gauge("mailbeacon_tracker_dropped_events", "Events dropped because the buffer was full")
PUBLISHED = Gauge("mailbeacon_tracker_published_events", "Events JetStream acknowledged since start")
NATS_CONNECTED = Gauge("mailbeacon_tracker_nats_connected", "1 while the tracker's NATS connection is up")
HELD_CLICKS = Gauge("mailbeacon_tracker_held_clicks", "Click events held for the scanner-burst window")
CONNECTIONS = Gauge("mailbeacon_tracker_connections", "Open client connections of this tracker process")
CONNECTIONS_REFUSED = Gauge(
    "mailbeacon_tracker_connections_refused",
    "Connections answered 503 above TRACKER_MAX_CONNECTIONS since start",
)
CONNECTIONS_TIMED_OUT = Gauge(
    "mailbeacon_tracker_connections_timed_out",
    "Connections closed for not sending request headers within TRACKER_HEADER_TIMEOUT_SECONDS since start",
)
ENGAGEMENTS = LoopCounter(
    "mailbeacon_tracker_engagements",
    "Opens and clicks by verdict (machine_kind, or 'human')",
    ("type", "verdict"),
)
REGISTRY.register(REQUESTS)
REGISTRY.register(ENGAGEMENTS)
WEBHOOKS = Counter(
    "mailbeacon_tracker_webhooks_total",
    "Provider webhook requests by outcome (stored, refused, invalid, unavailable)",
    ["provider", "outcome"],
)
WEBHOOK_EVENTS = Counter(
    "mailbeacon_tracker_webhook_events_total", "Events stored from provider webhooks", ["provider", "type"]
)


_engagement_children: dict[tuple[str, str], CountChild] = {}


def count_engagement(event_type: str, verdict: str) -> None:
    """``ENGAGEMENTS.labels(...).inc()`` without the label lookup on every pixel and click."""
    child = _engagement_children.get((event_type, verdict))
    if child is None:
        child = _engagement_children[(event_type, verdict)] = ENGAGEMENTS.labels(event_type, verdict)
    child.value += 1


PIXEL_REQUESTS = REQUESTS.labels("pixel")
CLICK_REQUESTS = REQUESTS.labels("click")


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
# The routes measured, by a fixed name (never a tracking id, URL or provider taken from the path).
ROUTES: Final = ("pixel", "click", "unsubscribe_page", "unsubscribe", "webhook")

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
                return on_error(request, exc)
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
                return on_error(request, exc)
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


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it ("0.0001", "1.0", "+Inf")."""
    return "+Inf" if bound == float("inf") else repr(bound)


REQUEST_LATENCY = RequestLatency()
REGISTRY.register(REQUEST_LATENCY)
