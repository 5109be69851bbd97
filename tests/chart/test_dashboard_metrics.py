"""Every query of the Grafana dashboard and the alert rules parses and uses metrics (and labels)
that the components really export; each component's metrics live in its own registry, with
every labelled counter's known label values created at zero; dashboard and rules are scoped
by namespace and job. (What the queries show against a real Prometheus: test_prometheus_end_to_end.)"""

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
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.registry import Collector

import aggregator.metrics
import campaign_operator.metrics
import smtp_proxy.metrics
import tracker.metrics
from mailbeacon.contract.events import EventType
from tests.chart.test_helm_chart import PRODUCTION, by_kind, manifests, render

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "helm" / "mailbeacon" / "dashboards" / "mailbeacon.json"
COMPONENT_METRICS = (aggregator.metrics, tracker.metrics, smtp_proxy.metrics, campaign_operator.metrics)
# Labels Prometheus adds when it scrapes (job, instance) and the Prometheus Operator's
# target labels (namespace, pod, service, container, endpoint).
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# Grafana's own variables, and the dashboard's constants (the chart's defaults).
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1d",
    "$complaint_rate_percent": "0.3",
    "$bounce_rate_percent": "5",
    "$min_volume": "100",
}
# Series every scrape target has, made by Prometheus itself.
SCRAPE_SERIES = {"up": set()}
# One series per component by design: which component and version a target runs.
SHARED = {"mailbeacon_build_info"}


def _families(collector: Collector) -> Iterator[tuple[str, str, set[str]]]:
    """(name, type, labels) of a collector's families; custom collectors name theirs when collected."""
    if isinstance(collector, Counter | Gauge | Histogram | Summary):
        yield collector._name, collector._type, set(collector._labelnames)
        return
    for family in collector.collect():
        yield family.name, family.type, set(getattr(family, "_labelnames", ()))


def component_collectors(module: ModuleType) -> list[Collector]:
    """What a component's own registry holds."""
    registry = module.REGISTRY
    assert isinstance(registry, CollectorRegistry) and registry is not REGISTRY, module
    return list(registry._collector_to_names)


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
    for name, labels in SCRAPE_SERIES.items():
        series[name] = labels | SCRAPE_LABELS
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
            found = re.fullmatch(r"label_values\((\w+(?:\{[^}]*\})?),\s*(\w+)\)", query)
            assert found, query
            selector, label = found.groups()
            yield f"variable {variable['name']}", f"count by ({label}) ({selector})"


def alert_queries() -> Iterator[tuple[str, str]]:
    rule = next(iter(by_kind(manifests(render(PRODUCTION)), "PrometheusRule").values()))
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            yield f"alert {alert['alert']}", alert["expr"]


def _parse(expr: str) -> Any:
    return promql_parser.parse(substitute(expr, GRAFANA_VARIABLES))


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's interpolation of ``$name`` (longest names first: ``$job`` is no prefix problem)."""
    for variable in sorted(variables, key=len, reverse=True):
        expr = expr.replace(variable, variables[variable])
    return expr


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
                if name in SHARED:
                    continue
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
        "mailbeacon_operator_injections",
    }


def test_components_register_nothing_in_the_process_wide_registry() -> None:
    """prometheus_client's default registry is shared by everything in a process (all components
    in `mailbeacon up`): it keeps only the process's own collectors, served next to each
    component's registry."""
    names = {name for collector in REGISTRY._collector_to_names for name, _, _ in _families(collector)}
    assert names and all(name.startswith(("process_", "python_")) for name in names), sorted(names)
    for module in COMPONENT_METRICS:
        build = {
            sample.labels["component"]
            for family in module.REGISTRY.collect()
            if family.name == "mailbeacon_build_info"
            for sample in family.samples
        }
        assert build == {module.__name__.split(".")[0].replace("smtp_", "").replace("campaign_", "")}


def _samples(registry: CollectorRegistry, name: str) -> set[tuple[str, ...]]:
    """The label values of a counter family's ``_total`` samples."""
    return {
        tuple(sample.labels.values())
        for family in registry.collect()
        if family.name == name
        for sample in family.samples
        if sample.name == f"{name}_total"
    }


# Label values the components count, as the README and the dashboard name them; the newest
# (signed mail, the connection cap, ended AUTH sessions, parked events by type) included.
EXPECTED_AT_ZERO: list[tuple[ModuleType, str, set[tuple[str, ...]]]] = [
    (
        smtp_proxy.metrics,
        "mailbeacon_proxy_messages",
        {(r,) for r in ("accepted", "partial", "deferred", "rejected", "suppressed", "paused")},
    ),
    (smtp_proxy.metrics, "mailbeacon_proxy_copies", {("sent",), ("failed",), ("deferred",)}),
    (smtp_proxy.metrics, "mailbeacon_proxy_copies_suppressed", {("unsubscribed",), ("complained",)}),
    (
        smtp_proxy.metrics,
        "mailbeacon_proxy_untracked_messages",
        {
            (w,)
            for w in (
                "no_campaign",
                "unknown_campaign",
                "dkim_signed",
                "signed",
                "tracking_off",
                "recipient_opt_out",
            )
        },
    ),
    (smtp_proxy.metrics, "mailbeacon_proxy_upstream_errors", {("4xx",), ("5xx",)}),
    (smtp_proxy.metrics, "mailbeacon_proxy_auth", {("success",), ("failure",), ("too_many_failures",)}),
    (
        smtp_proxy.metrics,
        "mailbeacon_proxy_refused",
        {
            (r,)
            for r in (
                "relay_denied",
                "too_many_recipients",
                "path_too_long",
                "bad_address",
                "too_many_connections",
            )
        },
    ),
    (
        tracker.metrics,
        "mailbeacon_tracker_webhooks",
        {
            (p, o)
            for p in ("generic", "sendgrid", "mailgun", "ses", "postmark")
            for o in ("stored", "refused", "invalid", "unavailable")
        },
    ),
    (
        tracker.metrics,
        "mailbeacon_tracker_engagements",
        {
            (t, v)
            for t in ("opened", "clicked")
            for v in ("human", "security_scanner", "burst", "honeypot", "apple_privacy_proxy")
        },
    ),
    (
        tracker.metrics,
        "mailbeacon_tracker_requests",
        {
            ("pixel", "200"),
            ("pixel", "400"),
            ("click", "302"),
            ("click_forged", "400"),
            ("click_honeypot", "200"),
            ("unsubscribe", "200"),
            ("webhook_generic_bounce", "401"),
            ("webhook_sendgrid", "403"),
        },
    ),
    (
        aggregator.metrics,
        "mailbeacon_aggregator_parked_events_expired",
        {
            (t,)
            for t in (
                "delivered",
                "deferred",
                "opened",
                "clicked",
                "bounced",
                "failed",
                "complained",
                "unsubscribed",
            )
        },
    ),
    (
        aggregator.metrics,
        "mailbeacon_aggregator_parked_events_dropped",
        {
            (t,)
            for t in (
                "delivered",
                "deferred",
                "opened",
                "clicked",
                "bounced",
                "failed",
                "complained",
                "unsubscribed",
            )
        },
    ),
    (aggregator.metrics, "mailbeacon_aggregator_suppressions_recorded", {("unsubscribed",), ("complained",)}),
]


@pytest.mark.parametrize(
    ("module", "name", "values"), EXPECTED_AT_ZERO, ids=[n for _, n, _ in EXPECTED_AT_ZERO]
)
def test_labelled_counters_start_at_zero_for_every_value_they_can_take(
    module: ModuleType, name: str, values: set[tuple[str, ...]]
) -> None:
    """A series that appears with its first increment hides that increment from rate() and
    increase(): a rare bounce or refused webhook would never show. So they exist from the start."""
    assert values <= _samples(module.REGISTRY, name)


# `metrics.X.labels("value")` and `X.labels(f"...")` calls in the components' code.
_LITERAL_LABELS = re.compile(r"metrics\.([A-Z_]+)\.labels\(\"([a-z_0-9]+)\"\)")


@pytest.mark.parametrize("package", ["smtp_proxy", "tracker", "aggregator"])
def test_every_label_value_the_code_counts_exists_from_the_start(package: str) -> None:
    module = {"smtp_proxy": smtp_proxy.metrics, "tracker": tracker.metrics, "aggregator": aggregator.metrics}[
        package
    ]
    found = 0
    for path in sorted((ROOT / package).rglob("*.py")):
        for metric, value in _LITERAL_LABELS.findall(path.read_text()):
            collector = getattr(module, metric)
            name = collector._name
            assert (value,) in _samples(module.REGISTRY, name), (
                f"{path.name}: {metric}.labels({value!r}) not at zero"
            )
            found += 1
    assert found or package != "smtp_proxy"
    # Derived values: the proxy's code classes, the tracker's verdicts and providers.
    if package == "tracker":
        made = set()
        for path in (ROOT / "tracker" / "classify.py", ROOT / "tracker" / "engagement" / "bursts.py"):
            made |= set(re.findall(r"Verdict\(\s*\"(\w+)\"", path.read_text()))
        assert made == set(tracker.metrics.MACHINE_KINDS)
        from tracker.webhooks.esp import ADAPTERS

        assert set(tracker.metrics.PROVIDERS) == {"generic", *ADAPTERS}


def test_a_campaigns_event_counters_exist_once_it_is_known() -> None:
    aggregator.metrics.campaign_seen("metrics-test/new-campaign")
    types = {
        v
        for c, v in _samples(aggregator.metrics.REGISTRY, "mailbeacon_events")
        if c == "metrics-test/new-campaign"
    }
    assert types == {t.value for t in EventType}


def test_dashboard_and_rules_are_scoped_by_namespace_and_job() -> None:
    """Every selector of the dashboard follows its namespace and job variables; every selector
    of the alert rules names this release's job (and namespace, but for proxy sidecars, which
    run in the apps' namespaces)."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"namespace", "job", "campaign"} <= set(variables)
    for where, expr in QUERIES:
        usage = Usage()
        _walk(_parse(expr), usage)
        for selector in usage.selectors:
            if where.startswith(("panel", "variable")):
                if where in ("variable namespace", "variable job"):
                    continue  # they list what the scope may be
                assert {"namespace", "job"} <= selector.labels, f"{where}: {selector.metric} not scoped"
            else:
                assert "job" in selector.labels, (
                    f"{where}: {selector.metric} not scoped to the release's jobs"
                )
    for where, expr in QUERIES:
        if where.startswith("panel"):
            assert '$namespace"' in expr and '$job"' in expr, where
            assert "vector(" not in expr, f"{where}: a made-up value where the metric does not exist"


def test_every_alert_links_its_runbook_section() -> None:
    runbook = (ROOT / "docs" / "runbooks.md").read_text()
    sections = set(re.findall(r"^## (\w+)$", runbook, re.M))
    rule = next(iter(by_kind(manifests(render(PRODUCTION)), "PrometheusRule").values()))
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    for name, alert in alerts.items():
        url = alert["annotations"]["runbook_url"]
        assert url == f"https://github.com/mailbeacon/mailbeacon/blob/main/docs/runbooks.md#{name.lower()}"
    assert sections == set(alerts), "one runbook section per alert, and no section without its alert"
    for section in re.split(r"^## ", runbook, flags=re.M)[1:]:
        assert all(part in section for part in ("**Means.**", "**Check.**", "**Do.**")), section[:60]


def test_rules_cover_every_component_and_the_blind_spots() -> None:
    rule = next(iter(by_kind(manifests(render(PRODUCTION)), "PrometheusRule").values()))
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    for component in ("Tracker", "Aggregator", "Operator", "Proxy"):
        assert exprs[f"Mailbeacon{component}Absent"].startswith("absent(up{")
    assert (
        'up{namespace="mailbeacon",job=~"mb-mailbeacon-(tracker|aggregator|operator)"} == 0'
        in exprs["MailbeaconTargetDown"]
    )
    assert "mailbeacon_tracker_webhooks_total" in exprs["MailbeaconWebhooksFailing"]
    assert "mailbeacon_tracker_nats_connected" in exprs["MailbeaconNatsDisconnected"]
    assert "mailbeacon_proxy_nats_connected" in exprs["MailbeaconNatsDisconnected"]
    # Components a release does not run have no absent() rule that could never clear.
    values = yaml.safe_load(yaml.safe_dump(PRODUCTION))
    values["operator"] = {**values.get("operator", {}), "enabled": False}
    values["proxy"] = {"enabled": False}
    rule = next(iter(by_kind(manifests(render(values)), "PrometheusRule").values()))
    names = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"MailbeaconTrackerAbsent", "MailbeaconAggregatorAbsent"} <= names
    assert not {"MailbeaconOperatorAbsent", "MailbeaconProxyAbsent"} & names


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
        # The blind spots of issue 19: webhook outcomes per provider, withheld copies,
        # machine verdicts by kind, NATS connection state, refused recipients.
        "sum by (provider, outcome) (increase(mailbeacon_tracker_webhooks_total",
        "mailbeacon_proxy_copies_suppressed_total",
        "mailbeacon_tracker_engagements_total",
        "mailbeacon_tracker_nats_connected",
        "mailbeacon_proxy_nats_connected",
        "mailbeacon_proxy_refused_total",
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
        "alert MailbeaconWebhooksFailing",
        "alert MailbeaconNatsDisconnected",
        "alert MailbeaconTargetDown",
    } <= alerts


def test_guardrail_panel_judges_like_the_alert_rules() -> None:
    """The operator's guardrails where a Campaign resource exists, else the chart's defaults,
    which the chart writes into the dashboard's constants."""
    dashboard = json.loads(DASHBOARD.read_text())
    panel = next(p for p in dashboard["panels"] if p["title"] == "Guardrails: rate / threshold")
    complaint, bounce = (t["expr"] for t in panel["targets"])
    assert "mailbeacon_campaign_guardrail_threshold_percent" in complaint
    assert "or on (namespace, campaign) 0 *" in complaint and "$complaint_rate_percent" in complaint
    assert "$bounce_rate_percent" in bounce and "$min_volume" in bounce
    assert "mailbeacon_campaign_guardrail_ratio" not in complaint + bounce  # no operator needed
    values = yaml.safe_load(yaml.safe_dump(PRODUCTION))
    values["metrics"]["prometheusRule"].update(
        {"complaintRatePercent": 0.1, "bounceRatePercent": 2.5, "minVolume": 500}
    )
    config_map = by_kind(manifests(render(values)), "ConfigMap")["mb-mailbeacon-dashboard"]
    constants = {
        v["name"]: v["query"]
        for v in json.loads(config_map["data"]["mailbeacon.json"])["templating"]["list"]
        if v["type"] == "constant"
    }
    assert constants == {"complaint_rate_percent": "0.1", "bounce_rate_percent": "2.5", "min_volume": "500"}


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert "uid" not in dashboard and dashboard["schemaVersion"] >= 36  # Grafana assigns one on import
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["description"], panel["title"]
    # The ConfigMap carries the same JSON, with a uid of its release's own.
    config_map = by_kind(manifests(render()), "ConfigMap")["mb-mailbeacon-dashboard"]
    shipped = json.loads(config_map["data"]["mailbeacon.json"])
    uid = shipped.pop("uid")
    assert shipped == dashboard
    assert re.fullmatch(r"mailbeacon-[0-9a-f]{16}", uid)


@pytest.mark.slow
def test_each_release_has_its_own_dashboard_uid() -> None:
    def uid(name: str, values: dict[str, Any] | None = None) -> str:
        config_map = by_kind(manifests(render(values, name=name)), "ConfigMap")[
            f"{name}-mailbeacon-dashboard"
        ]
        return str(json.loads(config_map["data"]["mailbeacon.json"])["uid"])

    assert uid("mb") == uid("mb")  # stable across renders: links to it keep working
    assert uid("mb") != uid("other")
    assert uid("mb", {"grafana": {"dashboard": {"uid": "mail-prod"}}}) == "mail-prod"


def test_operator_exports_a_campaigns_guardrails_not_its_statistics() -> None:
    """The operator's series are the campaign's own limits and its verdicts, which the alert
    rules hold the aggregator's numbers against."""
    from campaign_operator.guardrails import judge
    from campaign_operator.status import Headline
    from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec

    key = CampaignKey("metrics-test", "newsletter")
    spec = CampaignSpec.model_validate({"guardrails": {"minDelivered": 10, "complaintRatePercent": 0.5}})
    numbers = Headline(sent=100, delivered=90, complained=1, unique_opens=40, open_rate=44.44)
    campaign_operator.metrics.export(key, spec, judge(spec.guardrails, numbers))

    def value(name: str, **labels: str) -> float | None:
        return campaign_operator.metrics.REGISTRY.get_sample_value(name, {"campaign": str(key), **labels})

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


def test_without_the_aggregator_the_operator_exports_what_the_status_last_showed() -> None:
    """An aggregator outage (or an operator restarted during one) keeps every campaign's
    guardrail series: thresholds and pause from the spec, verdicts from the status's numbers."""
    from campaign_operator.wiring import export_known
    from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec

    key = CampaignKey("metrics-test", "outage")
    spec = CampaignSpec.model_validate({"paused": True, "guardrails": {"minDelivered": 10}})

    def value(name: str, **labels: str) -> float | None:
        return campaign_operator.metrics.REGISTRY.get_sample_value(name, {"campaign": str(key), **labels})

    export_known(key, spec, {})  # never read: no verdict is made up
    assert value("mailbeacon_campaign_guardrail_threshold_percent", guardrail="bounce_rate") == 5
    assert value("mailbeacon_campaign_guardrail_min_volume") == 10
    assert value("mailbeacon_campaign_paused") == 1
    assert value("mailbeacon_campaign_guardrail_breached", guardrail="bounce_rate") is None
    status = {
        "sent": 100,
        "delivered": 95,
        "bounced": 5,
        "complained": 1,
        "bounceRate": 5.0,
        "conditions": [],
    }
    export_known(key, spec, status)
    assert value("mailbeacon_campaign_guardrail_breached", guardrail="bounce_rate") == 1
    assert value("mailbeacon_campaign_guardrail_ratio", guardrail="bounce_rate") == pytest.approx(1.0)
    assert value("mailbeacon_campaign_guardrail_breached", guardrail="complaint_rate") == 1  # 1.05 % >= 0.3 %
    campaign_operator.metrics.forget(key)


def test_alert_thresholds_follow_the_values() -> None:
    values = yaml.safe_load(yaml.safe_dump(PRODUCTION))
    values["metrics"]["prometheusRule"].update({"ingestLagEvents": 1234, "warningRatio": 0.7})
    rule = next(iter(by_kind(manifests(render(values)), "PrometheusRule").values()))
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert exprs["MailbeaconIngestLag"].endswith("> 1234")
    assert "+ 0.3) * 0.7) <" in exprs["MailbeaconComplaintRateRising"]
    values["metrics"]["prometheusRule"].update(
        {"complaintRatePercent": 0.1, "minVolume": 500, "webhookFailureRatio": 0.25}
    )
    rule = next(iter(by_kind(manifests(render(values)), "PrometheusRule").values()))
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert 'state="delivered"}) + 0.1)' in exprs["MailbeaconComplaintRateHigh"]
    assert exprs["MailbeaconComplaintRateHigh"].endswith('state="delivered"}) + 500)')
    assert exprs["MailbeaconWebhooksFailing"].endswith("> 0.25")
    labels = {r["alert"]: r["labels"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert all(entry["team"] == "email" for entry in labels.values())
