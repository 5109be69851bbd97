"""Every query of the Grafana dashboard and the alert rules parses and uses metrics (and labels)
that the components really export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Summary

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


def exported() -> dict[str, set[str]]:
    """Series names the components export, with the labels each carries."""
    series: dict[str, set[str]] = {}
    collectors = {id(c): c for module in COMPONENT_METRICS for c in vars(module).values()}
    for collector in collectors.values():
        if not isinstance(collector, Counter | Gauge | Histogram | Summary) or collector._labelvalues:
            continue  # label children (cached .labels(...)) belong to their registered parent
        assert collector in REGISTRY._collector_to_names, collector  # registered process-wide
        name, labels = collector._name, set(collector._labelnames) | SCRAPE_LABELS
        if isinstance(collector, Counter):
            series[f"{name}_total"] = labels
        elif isinstance(collector, Histogram):
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = series[f"{name}_count"] = labels
        elif isinstance(collector, Summary):
            series[f"{name}_sum"] = series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


@dataclass
class Usage:
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)  # (metric, matcher labels)
    groupings: list[tuple[set[str], set[str]]] = field(default_factory=list)  # (by labels, metrics below)


def _walk(node: Any, usage: Usage) -> set[str]:
    """Collect selectors and groupings; returns the metric names under ``node``."""
    if isinstance(node, promql_parser.VectorSelector):
        assert node.name, f"selector without a metric name: {node}"
        usage.selectors.append((node.name, {m.name for m in node.matchers.matchers}))
        return {node.name}
    if isinstance(node, promql_parser.MatrixSelector):
        return _walk(node.vector_selector, usage)
    if isinstance(node, promql_parser.Call):
        return set().union(*(_walk(arg, usage) for arg in node.args)) if node.args else set()
    if isinstance(node, promql_parser.AggregateExpr):
        below = _walk(node.expr, usage)
        if node.param is not None:
            below |= _walk(node.param, usage)
        if node.modifier is not None and node.modifier.type == promql_parser.AggModifierType.By:
            usage.groupings.append((set(node.modifier.labels), below))
        return below
    if isinstance(node, promql_parser.BinaryExpr):
        return _walk(node.lhs, usage) | _walk(node.rhs, usage)
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return _walk(node.expr, usage)
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
    for metric, labels in usage.selectors:
        assert metric in series, f"{where}: {metric} is not exported by any component"
        assert labels <= series[metric], f"{where}: {metric} has no label {labels - series[metric]}"
    for by, metrics in usage.groupings:
        known = set().union(*(series[m] for m in metrics))
        assert by <= known, f"{where}: grouping by {by - known}, which {metrics} do not carry"


def test_dashboard_covers_what_operators_watch() -> None:
    queries = " ".join(expr for where, expr in QUERIES if where.startswith("panel"))
    for needed in (
        'state=~"sent|delivered|bounced',  # per-campaign sent/delivered/bounced
        "human_opened",  # human vs total opens and clicks
        "mailbeacon_campaign_rate_percent",  # rates
        "topk(10",  # top campaigns
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


def test_operator_metrics_carry_a_campaigns_numbers() -> None:
    """The per-campaign series the dashboard and alerts read are what the operator exports."""
    from campaign_operator.guardrails import judge
    from campaign_operator.status import Headline
    from mailbeacon.campaigns import CampaignKey, CampaignSpec

    key = CampaignKey("metrics-test", "newsletter")
    spec = CampaignSpec.model_validate({"guardrails": {"minDelivered": 10, "complaintRatePercent": 0.5}})
    numbers = Headline(
        sent=100, delivered=90, complained=1, unique_opens=40, human_unique_opens=30, open_rate=44.44
    )
    campaign_operator.metrics.export(key, spec, numbers, judge(spec.guardrails, numbers))

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"campaign": str(key), **labels})

    assert value("mailbeacon_campaign_messages", state="delivered") == 90
    assert value("mailbeacon_campaign_messages", state="human_opened") == 30
    assert value("mailbeacon_campaign_rate_percent", rate="open") == 44.44
    assert value("mailbeacon_campaign_guardrail_breached", guardrail="complaint_rate") == 1
    assert value("mailbeacon_campaign_guardrail_ratio", guardrail="complaint_rate") == pytest.approx(
        100 / 90 / 0.5
    )
    assert value("mailbeacon_campaign_guardrail_threshold_percent", guardrail="complaint_rate") == 0.5
    assert value("mailbeacon_campaign_paused") == 0
    campaign_operator.metrics.forget(key)
    assert value("mailbeacon_campaign_messages", state="delivered") is None


def test_alert_thresholds_follow_the_values() -> None:
    values = yaml.safe_load(yaml.safe_dump(PRODUCTION))
    values["metrics"]["prometheusRule"].update({"ingestLagEvents": 1234, "warningRatio": 0.7})
    rule = next(iter(by_kind(manifests(render(values)), "PrometheusRule").values()))
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert exprs["MailbeaconIngestLag"].endswith("> 1234")
    assert ">= 0.7" in exprs["MailbeaconComplaintRateRising"]
    labels = {r["alert"]: r["labels"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert all(entry["team"] == "email" for entry in labels.values())
