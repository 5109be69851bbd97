"""The chart's spool volumes and SMTP limits: where the spool lives, and the limits reaching the proxy."""

from __future__ import annotations

from typing import Any

import pytest

from mailbeacon.contract.settings import Settings
from tests.chart.test_helm_chart import RELAY, by_kind, env_of, helm_python, manifests, render, validate

SHARED_PROXY = {"enabled": True, "relayNetworks": ["10.244.0.0/16"]}


def pod_of(docs: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    pod: dict[str, Any] = by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]
    return pod


@pytest.mark.slow
@pytest.mark.parametrize(
    ("deployment", "size"), [("mb-mailbeacon-tracker", "256Mi"), ("mb-mailbeacon-proxy", "128Mi")]
)
def test_the_spool_is_an_emptydir_at_data_dir_on_a_read_only_root(deployment: str, size: str) -> None:
    """A stop while NATS is unreachable writes DATA_DIR/spool: an emptyDir of its own (it survives
    a restart of the container), writable although the root filesystem is read-only."""
    docs = manifests(render({"proxy": SHARED_PROXY, "secrets": {"upstreamSmtp": RELAY}}))
    pod = pod_of(docs, deployment)
    (container,) = pod["containers"]
    data_dir = env_of(docs, deployment)["MAILBEACON_DATA_DIR"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    spool = mounts[f"{data_dir}/spool"]
    assert "readOnly" not in spool
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[spool["name"]] == {"name": spool["name"], "emptyDir": {"sizeLimit": size}}
    assert spool["name"] != mounts["/tmp"]["name"]  # sized apart from Python's temporary files
    for doc in docs:
        validate(doc)


def test_spool_sizes_and_smtp_limits_reach_the_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "tracker": {"spoolSizeLimit": "1Gi"},
        "proxy": {
            **SHARED_PROXY,
            "maxConnections": 50,
            "spoolSizeLimit": "64Mi",
            "auth": {"failureDelaySeconds": 0, "maxFailures": 5},  # 0: no tarpit, and no default instead
        },
        "secrets": {"upstreamSmtp": RELAY},
    }
    docs = manifests(render(values))
    sizes = {
        name: {v["name"]: v.get("emptyDir", {}).get("sizeLimit") for v in pod_of(docs, name)["volumes"]}[
            "spool"
        ]
        for name in ("mb-mailbeacon-tracker", "mb-mailbeacon-proxy")
    }
    assert sizes == {"mb-mailbeacon-tracker": "1Gi", "mb-mailbeacon-proxy": "64Mi"}
    proxy = env_of(docs, "mb-mailbeacon-proxy")
    with monkeypatch.context() as patched:
        for key, value in proxy.items():
            if isinstance(value, str):
                patched.setenv(key, value)
        settings = Settings()
    assert (
        settings.proxy.smtp_max_connections,
        settings.proxy.smtp_auth_failure_delay,
        settings.proxy.smtp_auth_max_failures,
    ) == (
        50,
        0.0,
        5,
    )


def test_the_proxy_limits_default_to_the_settings_defaults() -> None:
    proxy = env_of(
        manifests(render({"proxy": SHARED_PROXY, "secrets": {"upstreamSmtp": RELAY}})), "mb-mailbeacon-proxy"
    )
    defaults = Settings()
    assert proxy["MAILBEACON_SMTP_MAX_CONNECTIONS"] == str(defaults.proxy.smtp_max_connections) == "200"
    assert float(proxy["MAILBEACON_SMTP_AUTH_FAILURE_DELAY"]) == defaults.proxy.smtp_auth_failure_delay == 1.0
    assert proxy["MAILBEACON_SMTP_AUTH_MAX_FAILURES"] == str(defaults.proxy.smtp_auth_max_failures) == "3"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"proxy": {"maxConnections": 0}}, "/proxy/maxConnections"),
        ({"proxy": {"auth": {"failureDelaySeconds": 31}}}, "/proxy/auth/failureDelaySeconds"),
        ({"proxy": {"auth": {"maxFailures": 0}}}, "/proxy/auth/maxFailures"),
        ({"proxy": {"spoolSizeLimit": "lots"}}, "/proxy/spoolSizeLimit"),
        ({"tracker": {"spoolSizeLimit": 256}}, "/tracker/spoolSizeLimit"),
    ],
)
def test_invalid_limits_are_refused_by_the_schema(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(values)
    assert complaint in str(refused.value)
