"""Every query of the Grafana dashboard and the alert rules parses and uses metrics (and labels)
that the components really export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Summary
from prometheus_client.registry import Collector

import aggregator.metrics
import campaign_operator.metrics
import smtp_proxy.metrics
import tracker.metrics
from tests.test_helm_chart import PRODUCTION, by_kind, manifests, render

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "helm" / "mailbeacon" / "dashboards" / "mailbeacon.json"
COMPONENT_METRICS = (aggregator.metrics, tracker.metrics, smtp_proxy.metrics, campaign_operator.metrics)
# Labels Prometheus adds when it scrapes (job, instance) and the Prometheus Operator's
# target labels (namespace, pod, service, container, endpoint).
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1d"}


def _families(collector: Collector) -> Iterator[tuple[str, str, set[str]]]:
    """(name, type, labels) of a collector's families; custom collectors name theirs when collected."""
    if isinstance(collector, Counter | Gauge | Histogram | Summary):
        yield collector._name, collector._type, set(collector._labelnames)
        return
    for family in collector.collect():
        yield family.name, family.type, set(getattr(family, "_labelnames", ()))


def component_collectors(module: ModuleType) -> list[Collector]:
    """The metrics a component's module defines: its metrics (label children excepted) and
    the custom collectors it registered."""
    registered = {id(c) for c in REGISTRY._collector_to_names}
    found: dict[int, Collector] = {}
    for value in vars(module).values():
        if isinstance(value, Counter | Gauge | Histogram | Summary):
            if not value._labelvalues:  # a cached .labels(...) child belongs to its parent
                assert id(value) in registered, value  # registered process-wide
                found[id(value)] = value
        elif id(value) in registered:
            found[id(value)] = value
    return list(found.values())


def exported() -> dict[str, set[str]]:
    """Series names the components export, with the labels each carries."""
    series: dict[str, set[str]] = {}
    for module in COMPONENT_METRICS:
        for collector in component_collectors(module):
            for name, kind, own_labels in _families(collector):
                labels = own_labels | SCRAPE_LABELS
                if kind == "counter":
                    series[f"{name}_total"] = labels
                elif kind == "histogram":
                    series[f"{name}_bucket"] = labels | {"le"}
                    series[f"{name}_sum"] = series[f"{name}_count"] = labels
                elif kind == "summary":
                    series[f"{name}_sum"] = series[f"{name}_count"] = labels
                else:
                    series[name] = labels
    return series


def campaign_gauges() -> set[str]:
    """The aggregator's per-campaign statistics: every replica reports the same values."""
    return {name for name, _, _ in _families(aggregator.metrics.CAMPAIGNS)}


@dataclass
class Selector:
    metric: str
    labels: set[str]  # the labels its matchers name
    # The innermost aggregation around it: (operator, "by" labels), or None.
    aggregation: tuple[str, set[str]] | None


@dataclass
class Usage:
    selectors: list[Selector] = field(default_factory=list)
    groupings: list[tuple[set[str], set[str]]] = field(default_factory=list)  # (by labels, metrics below)


def _walk(node: Any, usage: Usage, aggregation: tuple[str, set[str]] | None = None) -> set[str]:
    """Collect selectors and groupings; returns the metric names under ``node``."""
    if isinstance(node, promql_parser.VectorSelector):
        assert node.name, f"selector without a metric name: {node}"
        usage.selectors.append(Selector(node.name, {m.name for m in node.matchers.matchers}, aggregation))
        return {node.name}
    if isinstance(node, promql_parser.MatrixSelector):
        return _walk(node.vector_selector, usage, aggregation)
    if isinstance(node, promql_parser.Call):
        return set().union(*(_walk(arg, usage, aggregation) for arg in node.args)) if node.args else set()
    if isinstance(node, promql_parser.AggregateExpr):
        by = set()
        if node.modifier is not None and node.modifier.type == promql_parser.AggModifierType.By:
            by = set(node.modifier.labels)
        inner = (str(node.op), by)
        below = _walk(node.expr, usage, inner)
        if node.param is not None:
            below |= _walk(node.param, usage, aggregation)
        if by:
            usage.groupings.append((by, below))
        return below
    if isinstance(node, promql_parser.BinaryExpr):
        return _walk(node.lhs, usage, aggregation) | _walk(node.rhs, usage, aggregation)
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return _walk(node.expr, usage, aggregation)
    return set()  # number and string literals


def dashboard_queries() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()  # type: ignore[union-attr]
            yield f"variable {variable['name']}", f"count by ({label}) ({metric})"


def alert_queries() -> Iterator[tuple[str, str]]:
    rule = next(iter(by_kind(manifests(render(PRODUCTION)), "PrometheusRule").values()))
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            yield f"alert {alert['alert']}", alert["expr"]


def _parse(expr: str) -> Any:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return promql_parser.parse(expr)


QUERIES = [*dashboard_queries(), *alert_queries()]


@pytest.mark.parametrize(("where", "expr"), QUERIES, ids=[where for where, _ in QUERIES])
def test_query_uses_exported_metrics_and_labels(where: str, expr: str) -> None:
    series = exported()
    usage = Usage()
    _walk(_parse(expr), usage)
    assert usage.selectors, f"{where}: no metric in {expr}"
    for selector in usage.selectors:
        metric, labels = selector.metric, selector.labels
        assert metric in series, f"{where}: {metric} is not exported by any component"
        assert labels <= series[metric], f"{where}: {metric} has no label {labels - series[metric]}"
    for by, metrics in usage.groupings:
        known = set().union(*(series[m] for m in metrics))
        assert by <= known, f"{where}: grouping by {by - known}, which {metrics} do not carry"


VALUE_QUERIES = [(where, expr) for where, expr in QUERIES if not where.startswith("variable")]


@pytest.mark.parametrize(("where", "expr"), VALUE_QUERIES, ids=[where for where, _ in VALUE_QUERIES])
def test_campaign_gauges_are_taken_once_across_aggregator_replicas(where: str, expr: str) -> None:
    """Every aggregator replica reports the same campaign statistics: a query must take one
    value per campaign (``max by (campaign)``), never add the replicas up; process counters
    are what a query sums."""
    usage = Usage()
    _walk(_parse(expr), usage)
    gauges = campaign_gauges()
    for selector in usage.selectors:
        if selector.metric in gauges:
            assert selector.aggregation is not None, f"{where}: {selector.metric} without max by (campaign)"
            operator, by = selector.aggregation
            assert operator == "max" and "campaign" in by, f"{where}: {selector.metric} in {operator} by {by}"


def test_no_metric_is_exported_by_two_components() -> None:
    owners: dict[str, str] = {}
    for module in COMPONENT_METRICS:
        for collector in component_collectors(module):
            for name, _, _ in _families(collector):
                assert name not in owners, f"{name} is exported by {owners[name]} and {module.__name__}"
                owners[name] = module.__name__
    # The campaign statistics are the aggregator's (from the database); the operator exports
    # only what it alone knows: guardrails, pauses, its own counters.
    assert {n for n, owner in owners.items() if owner == "campaign_operator.metrics"} == {
        "mailbeacon_campaign_guardrail_threshold_percent",
        "mailbeacon_campaign_guardrail_min_volume",
        "mailbeacon_campaign_guardrail_ratio",
        "mailbeacon_campaign_guardrail_breached",
        "mailbeacon_campaign_paused",
        "mailbeacon_operator_auto_pauses",
        "mailbeacon_operator_statistics_errors",
    }


def test_dashboard_covers_what_operators_watch() -> None:
    queries = " ".join(expr for where, expr in QUERIES if where.startswith("panel"))
    for needed in (
        'state=~"sent|delivered|bounced',  # per-campaign sent/delivered/bounced
        "mailbeacon_campaign_human_unique_opens",  # human vs total opens and clicks
        "mailbeacon_campaign_unique_opens",
        "mailbeacon_campaign_human_unique_clicks",
        "mailbeacon_campaign_unique_clicks",
        "mailbeacon_campaign_rate_percent",  # rates
        "topk(10",  # top campaigns
        "mailbeacon_tracker_request_seconds_bucket",  # tracker latency
        "mailbeacon_tracker_buffered_events",  # tracker buffer
        "mailbeacon_proxy_messages_total",  # proxy throughput
        "mailbeacon_proxy_upstream_errors_total",  # proxy errors
        "mailbeacon_aggregator_ingest_lag_events",  # ingest lag
    ):
        assert needed in queries, needed
    alerts = {where for where, _ in QUERIES if where.startswith("alert")}
    assert {
        "alert MailbeaconBounceRateHigh",
        "alert MailbeaconComplaintRateHigh",
        "alert MailbeaconBounceRateRising",
        "alert MailbeaconComplaintRateRising",
        "alert MailbeaconIngestLag",
        "alert MailbeaconTrackerDroppingEvents",
        "alert MailbeaconProxyUpstreamErrors",
    } <= alerts


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "mailbeacon" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["description"], panel["title"]
    # The ConfigMap carries the same JSON.
    config_map = by_kind(manifests(render()), "ConfigMap")["mb-mailbeacon-dashboard"]
    assert json.loads(config_map["data"]["mailbeacon.json"]) == dashboard


def test_operator_exports_a_campaigns_guardrails_not_its_statistics() -> None:
    """The operator's series are the campaign's own limits and its verdicts, which the alert
    rules hold the aggregator's numbers against."""
    from campaign_operator.guardrails import judge
    from campaign_operator.status import Headline
    from mailbeacon.campaigns import CampaignKey, CampaignSpec

    key = CampaignKey("metrics-test", "newsletter")
    spec = CampaignSpec.model_validate({"guardrails": {"minDelivered": 10, "complaintRatePercent": 0.5}})
    numbers = Headline(sent=100, delivered=90, complained=1, unique_opens=40, open_rate=44.44)
    campaign_operator.metrics.export(key, spec, judge(spec.guardrails, numbers))

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"campaign": str(key), **labels})

    assert value("mailbeacon_campaign_guardrail_breached", guardrail="complaint_rate") == 1
    assert value("mailbeacon_campaign_guardrail_breached", guardrail="bounce_rate") == 0
    assert value("mailbeacon_campaign_guardrail_ratio", guardrail="complaint_rate") == pytest.approx(
        100 / 90 / 0.5
    )
    assert value("mailbeacon_campaign_guardrail_threshold_percent", guardrail="complaint_rate") == 0.5
    assert value("mailbeacon_campaign_guardrail_threshold_percent", guardrail="bounce_rate") == 5
    assert value("mailbeacon_campaign_guardrail_min_volume") == 10
    assert value("mailbeacon_campaign_paused") == 0
    # The statistics come from the aggregator alone.
    assert value("mailbeacon_campaign_messages", state="delivered") is None
    assert value("mailbeacon_campaign_rate_percent", rate="open") is None
    campaign_operator.metrics.forget(key)
    assert value("mailbeacon_campaign_guardrail_threshold_percent", guardrail="complaint_rate") is None
    assert value("mailbeacon_campaign_guardrail_min_volume") is None
    assert value("mailbeacon_campaign_paused") is None


def test_alert_thresholds_follow_the_values() -> None:
    values = yaml.safe_load(yaml.safe_dump(PRODUCTION))
    values["metrics"]["prometheusRule"].update({"ingestLagEvents": 1234, "warningRatio": 0.7})
    rule = next(iter(by_kind(manifests(render(values)), "PrometheusRule").values()))
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert exprs["MailbeaconIngestLag"].endswith("> 1234")
    assert "+ 0.3) * 0.7) <" in exprs["MailbeaconComplaintRateRising"]
    values["metrics"]["prometheusRule"].update({"complaintRatePercent": 0.1, "minVolume": 500})
    rule = next(iter(by_kind(manifests(render(values)), "PrometheusRule").values()))
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert '{state="delivered"}) + 0.1)' in exprs["MailbeaconComplaintRateHigh"]
    assert exprs["MailbeaconComplaintRateHigh"].endswith('{state="delivered"}) + 500)')
    labels = {r["alert"]: r["labels"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert all(entry["team"] == "email" for entry in labels.values())
