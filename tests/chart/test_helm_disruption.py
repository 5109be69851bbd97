"""Drains and spread (issue 16, defect 6): a PodDisruptionBudget for each replicated component
that never blocks ``kubectl drain``, and pods spread over nodes and zones by default.

Whether a budget blocks is computed as the disruption controller does: with every pod healthy,
an eviction is allowed while ``currentHealthy - desiredHealthy > 0``, where desiredHealthy is
``minAvailable`` (a percentage rounded up) or ``expected - maxUnavailable`` (rounded up).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.chart.test_helm_chart import Manifest, by_kind, helm_python, manifests, pod_specs, render, validate

REPLICATED = {
    "tracker": {},
    "aggregator": {"database": {"url": "postgresql://mb:pw@db:5432/mb"}},
    "proxy": {
        "proxy": {"enabled": True, "relayNetworks": ["10.244.0.0/16"]},
        "secrets": {"upstreamSmtp": "smtp://relay:587"},
    },
}


def _scaled(value: Any, expected: int) -> int:
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(int(value[:-1]) * expected / 100)
    return int(value)


def disruptions_allowed(pdb: Manifest, expected: int) -> int:
    spec = pdb["spec"]
    if "minAvailable" in spec:
        desired = _scaled(spec["minAvailable"], expected)
    else:
        desired = max(0, expected - _scaled(spec["maxUnavailable"], expected))
    return max(0, expected - desired)


def _values(component: str, replicas: int, **more: Any) -> dict[str, Any]:
    values: dict[str, Any] = {key: value for key, value in REPLICATED[component].items() if key != component}
    own = {**REPLICATED[component].get(component, {}), "replicas": replicas, **more}
    return {**values, component: own}


@pytest.mark.parametrize("component", REPLICATED)
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_no_budget_blocks_a_drain(component: str, replicas: int) -> None:
    docs = manifests(render(_values(component, replicas)))
    pdb = by_kind(docs, "PodDisruptionBudget")[f"mb-mailbeacon-{component}"]
    assert "minAvailable" not in pdb["spec"]
    assert disruptions_allowed(pdb, replicas) >= 1
    # Crash-looping pods may always be evicted (clusters that know the policy).
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    validate(pdb)


def test_budgets_follow_the_autoscaler_and_percentages() -> None:
    values = {"tracker": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 10}}}
    pdb = by_kind(manifests(render(values)), "PodDisruptionBudget")["mb-mailbeacon-tracker"]
    # Relative to however many pods the autoscaler runs now.
    assert all(disruptions_allowed(pdb, current) >= 1 for current in range(1, 11))
    values = {"tracker": {"replicas": 1, "podDisruptionBudget": {"maxUnavailable": "25%"}}}
    pdb = by_kind(manifests(render(values)), "PodDisruptionBudget")["mb-mailbeacon-tracker"]
    assert disruptions_allowed(pdb, 1) == 1 and disruptions_allowed(pdb, 8) == 2


@pytest.mark.parametrize(
    "budget",
    [{"maxUnavailable": 0}, {"maxUnavailable": "0%"}, {"minAvailable": 1}, {"enabled": True, "min": 1}],
)
def test_a_budget_that_could_block_is_refused(budget: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render({"tracker": {"podDisruptionBudget": budget}})


def test_budgets_can_be_turned_off_and_the_operator_has_none() -> None:
    docs = manifests(render({"tracker": {"podDisruptionBudget": {"enabled": False}}}))
    assert set(by_kind(docs, "PodDisruptionBudget")) == {"mb-mailbeacon-aggregator"}


def _scheduling(docs: list[Manifest], component: str) -> dict[str, Any]:
    return next(pod for name, _, pod in pod_specs(docs) if name == f"mb-mailbeacon-{component}")


@pytest.mark.slow
@pytest.mark.parametrize("component", REPLICATED)
def test_pods_spread_over_nodes_and_zones_by_default(component: str) -> None:
    docs = manifests(render(_values(component, 3)))
    pod = _scheduling(docs, component)
    template = next(t for name, t, _ in pod_specs(docs) if name == f"mb-mailbeacon-{component}")
    labels = template["labels"]
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread)  # soft: never unschedulable
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items() for c in spread)
    preferred = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = preferred[0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    # Only its own component: the selector must not match another component's pods.
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
    for doc in docs:
        validate(doc)


def test_presets_can_be_hard_off_or_replaced() -> None:
    hard = _scheduling(manifests(render({"tracker": {"podAntiAffinityPreset": "hard"}})), "tracker")
    required = hard["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required[0]["topologyKey"] == "kubernetes.io/hostname"
    off = _scheduling(
        manifests(render({"tracker": {"podAntiAffinityPreset": "none", "topologySpreadPreset": "none"}})),
        "tracker",
    )
    assert "affinity" not in off and "topologySpreadConstraints" not in off
    own_affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["mail"]}]}
                ]
            }
        }
    }
    own_spread = [
        {
            "maxSkew": 2,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "tracker"}},
        }
    ]
    replaced = _scheduling(
        manifests(render({"tracker": {"affinity": own_affinity, "topologySpreadConstraints": own_spread}})),
        "tracker",
    )
    assert replaced["affinity"] == own_affinity and replaced["topologySpreadConstraints"] == own_spread


def test_the_single_operator_is_not_spread() -> None:
    operator = _scheduling(manifests(render()), "operator")
    assert "affinity" not in operator and "topologySpreadConstraints" not in operator
