"""The chart's side of zero-drop rollouts (docs/kubernetes.md "Zero-drop rollouts"): the delay a terminating
pod serves on, spent once (in the process, or in the kubelet's preStop sleep), and a grace
period that covers the delay, the drain and a margin. The process side: test_graceful_stop.py."""

from __future__ import annotations

import os
from typing import Any

import kubernetes_validate
import pytest

from mailbeacon.contract.settings import Settings
from tests.chart.test_helm_chart import RELAY, by_kind, manifests, render, validate

pytest.importorskip("helm_python")

SHARED_PROXY = {
    "proxy": {"enabled": True, "relayNetworks": ["10.0.0.0/8"]},
    "secrets": {"upstreamSmtp": RELAY},
}
# Each component's stop after the delay, as the chart budgets it: the tracker's drain
# (tracker.shutdownDrainSeconds, 20) plus 10 s; the aggregator's and the proxy's 60 s.
STOPS = {"tracker": 20 + 10, "aggregator": 60, "proxy": 60}


def pods(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    docs = manifests(render({**SHARED_PROXY, **values}))
    deployments = by_kind(docs, "Deployment")
    return {c: deployments[f"mb-mailbeacon-{c}"]["spec"]["template"]["spec"] for c in STOPS}


def settings_of(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    with monkeypatch.context() as patched:
        for key in [k for k in os.environ if k.startswith("MAILBEACON_")]:
            patched.delenv(key)
        for entry in container["env"]:
            if "value" in entry:
                patched.setenv(entry["name"], entry["value"])
        return Settings()


def test_pods_serve_on_while_the_endpoints_drop_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for component, pod in pods({}).items():
        container = pod["containers"][0]
        settings = settings_of(container, monkeypatch)
        # By default the process sits out the delay, with /readyz answering 503: no preStop.
        assert settings.shutdown_delay_seconds == 5, component
        assert "lifecycle" not in container, component
        # The grace period covers the delay, the component's drain and a margin.
        grace = pod["terminationGracePeriodSeconds"]
        assert grace == 5 + STOPS[component], component
        assert grace >= settings.shutdown_delay_seconds + settings.shutdown_drain_seconds + 10, component


@pytest.mark.parametrize("delay", [0, 12])
def test_the_delay_is_a_value(delay: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for component, pod in pods({"shutdown": {"delaySeconds": delay}}).items():
        assert settings_of(pod["containers"][0], monkeypatch).shutdown_delay_seconds == delay, component
        assert pod["terminationGracePeriodSeconds"] == delay + STOPS[component], component


@pytest.mark.slow
def test_the_kubelet_can_sleep_the_delay_instead_never_both(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"shutdown": {"delaySeconds": 8, "preStopSleep": True}}
    for component, pod in pods(values).items():
        container = pod["containers"][0]
        assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": 8}}}, component
        assert settings_of(container, monkeypatch).shutdown_delay_seconds == 0, component
        assert pod["terminationGracePeriodSeconds"] == 8 + STOPS[component], component
    # The native sleep action exists from Kubernetes 1.29 (on by default from 1.30).
    for doc in manifests(render({**SHARED_PROXY, **values})):
        if doc["kind"] == "Deployment":
            for version in ("1.30.0", kubernetes_validate.latest_version()):
                kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.slow
def test_default_pods_still_validate_on_the_oldest_supported_kubernetes() -> None:
    for doc in manifests(render(SHARED_PROXY)):
        validate(doc)  # 1.25 and the newest


@pytest.mark.parametrize(
    "values",
    [{"shutdown": {"delaySeconds": -1}}, {"shutdown": {"delaySeconds": 301}}, {"shutdown": {"wait": 5}}],
)
def test_bad_shutdown_values_are_refused(values: dict[str, Any]) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(values)
    assert "/shutdown" in str(refused.value)
