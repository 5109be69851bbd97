"""``mailbeacon_build_info{component,version}``: one series of value 1 per component.

Every component exports it in its own registry, so it is the one series every scrape target
of mailbeacon has: the dashboard lists its namespaces and jobs from it, and it says which
version runs where.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Gauge

NAME = "mailbeacon_build_info"


def mailbeacon_version() -> str:
    try:
        return version("mailbeacon")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def register_build_info(registry: CollectorRegistry, component: str) -> Gauge:
    gauge = Gauge(
        NAME,
        "The component and mailbeacon version of this target (always 1)",
        ["component", "version"],
        registry=registry,
    )
    gauge.labels(component, mailbeacon_version()).set(1)
    return gauge
