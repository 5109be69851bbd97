"""Chart basics (issue 16, defect 9): ``helm test``, a README whose values table is generated from
``values.yaml``, and the escape hatches platform teams expect (pod labels, priority class, extra
volumes and env, probe overrides, an image registry mirror)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

from mailbeacon.web.server import add_health_routes, bound_port, serve
from tests.chart.test_helm_chart import (
    CHART,
    NAMESPACE,
    ROOT,
    Manifest,
    by_kind,
    manifests,
    pod_specs,
    render,
    validate,
)

PROXY = {
    "proxy": {"enabled": True, "relayNetworks": ["10.244.0.0/16"]},
    "secrets": {"upstreamSmtp": "smtp://relay:587"},
}
COMPONENTS = ("tracker", "aggregator", "operator", "proxy")


def _values_doc() -> ModuleType:
    """deploy/helm/values_doc.py (a script, outside every package)."""
    spec = importlib.util.spec_from_file_location("values_doc", ROOT / "deploy" / "helm" / "values_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- helm test ------------------------------------------------------------------------------------


def test_helm_test_checks_every_enabled_component_through_its_service() -> None:
    docs = manifests(render(PROXY))
    pods = [doc for doc in docs if doc["kind"] == "Pod"]
    assert len(pods) == 1
    pod = pods[0]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/mailbeacon/mailbeacon:0.1.0"  # our image
    assert container["command"][:3] == ["python", "-m", "mailbeacon.app.healthcheck"]
    importlib.util.find_spec("mailbeacon.app.healthcheck")  # the module the image runs
    services = by_kind(docs, "Service")
    wanted = set()
    for name, service in services.items():
        port = next(p for p in service["spec"]["ports"] if p["name"] == "http")["port"]
        wanted.add(f"http://{name}.{NAMESPACE}.svc:{port}")
    assert set(container["args"]) == wanted
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    validate(pod)
    # Fewer components, fewer checks; none at all renders no Pod.
    alone = manifests(render({"aggregator": {"enabled": False}, "operator": {"enabled": False}}))
    assert [p["spec"]["containers"][0]["args"] for p in alone if p["kind"] == "Pod"] == [
        [f"http://mb-mailbeacon-tracker.{NAMESPACE}.svc:80"]
    ]


async def _component(ready: Callable[[], bool]) -> web.AppRunner:
    app = web.Application()
    add_health_routes(app, ready=ready)
    return await serve(app, "127.0.0.1:0")


async def _healthcheck(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailbeacon.app.healthcheck",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.mark.slow
async def test_the_test_pods_command_passes_only_when_every_component_is_ready() -> None:
    """The command the Pod runs, against components' real health routes."""
    state = {"ready": False}
    healthy = await _component(lambda: True)
    starting = await _component(lambda: state["ready"])
    try:
        urls = [f"http://127.0.0.1:{bound_port(runner)}" for runner in (healthy, starting)]
        code, output = await _healthcheck("--within", "0.5", *urls)
        assert code == 1, output
        assert f"FAIL {urls[1]}/readyz 503" in output and f"ok   {urls[0]}/readyz 200" in output
        # It waits for a component still starting, within its time.
        asyncio.get_running_loop().call_later(0.5, state.update, {"ready": True})
        code, output = await _healthcheck("--within", "20", *urls)
        assert code == 0, output
    finally:
        await healthy.cleanup()
        await starting.cleanup()
    code, output = await _healthcheck("--within", "0", "http://127.0.0.1:9")  # nothing listening
    assert code == 1 and "no answer" in output


# --- README ---------------------------------------------------------------------------------------


def test_the_readme_values_table_is_generated_from_values_yaml() -> None:
    values_doc = _values_doc()
    readme = (CHART / "README.md").read_text()
    assert values_doc.generated_readme(readme) == readme, "run: python deploy/helm/values_doc.py"


def test_every_value_has_a_row_with_a_description() -> None:
    values_doc = _values_doc()
    schema = __import__("json").loads((CHART / "values.schema.json").read_text())
    rows = values_doc.rows((CHART / "values.yaml").read_text(), schema)
    keys = {key for key, _, _, _ in rows}
    for key in (
        "image.registry",
        "secrets.secretKeys",
        "nats.auth.method",
        "tracker.podDisruptionBudget.maxUnavailable",
        "tracker.resources",
        "networkPolicy.egress.nats",
        "operator.releaseOnUninstall",
        "proxy.startupProbe",
    ):
        assert key in keys, key
    assert "tracker.resources.requests" not in keys  # inside a value documented as a whole
    assert all(description and kind for _, kind, _, description in rows), [
        r for r in rows if not (r[1] and r[3])
    ]


def test_the_generator_notices_a_stale_table() -> None:
    values_doc = _values_doc()
    readme = (CHART / "README.md").read_text()
    head, marker, table = readme.partition(values_doc.START)
    stale = head + marker + table.replace("| `secrets.secretKeys` |", "| `secrets.oldName` |")
    assert stale != readme and values_doc.generated_readme(stale) == readme
    assert values_doc.main(["--check"]) == 0  # what a CI step or pre-commit hook would run


# --- escape hatches -------------------------------------------------------------------------------

HATCHES: dict[str, Any] = {
    "podLabels": {"team": "mail", "app.kubernetes.io/component": "hijacked"},
    "priorityClassName": "mail-critical",
    "extraVolumes": [{"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}],
    "extraVolumeMounts": [{"name": "ca-bundle", "mountPath": "/etc/corporate-ca", "readOnly": True}],
    "extraEnv": [{"name": "MAILBEACON_LOG_LEVEL", "value": "DEBUG"}],
    "livenessProbe": {"periodSeconds": 20, "failureThreshold": 6},
    "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9999}, "timeoutSeconds": 1},
    "startupProbe": {"failureThreshold": 90},
}


def _pod(docs: list[Manifest], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return next((template, pod) for n, template, pod in pod_specs(docs) if n == f"mb-mailbeacon-{name}")


@pytest.mark.slow
def test_every_component_takes_the_escape_hatches() -> None:
    values: dict[str, Any] = {
        **PROXY,
        "image": {"registry": "registry.example.com/mirror", "repository": "mailbeacon/mailbeacon"},
    }
    for name in COMPONENTS:
        values[name] = {**values.get(name, {}), **HATCHES}
    docs = manifests(render(values))
    for name in COMPONENTS:
        template, pod = _pod(docs, name)
        container = pod["containers"][0]
        assert template["labels"]["team"] == "mail", name
        assert template["labels"]["app.kubernetes.io/component"] == name  # selectors never move
        assert pod["priorityClassName"] == "mail-critical"
        assert {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}} in pod["volumes"]
        assert {"name": "ca-bundle", "mountPath": "/etc/corporate-ca", "readOnly": True} in container[
            "volumeMounts"
        ]
        assert [e["value"] for e in container["env"] if e["name"] == "MAILBEACON_LOG_LEVEL"][-1] == "DEBUG"
        liveness, readiness = container["livenessProbe"], container["readinessProbe"]
        assert (liveness["periodSeconds"], liveness["failureThreshold"]) == (20, 6)
        assert liveness["httpGet"]["path"] == "/healthz"  # the rest of the default stays
        assert readiness["httpGet"] == {"path": "/readyz", "port": 9999} and readiness["timeoutSeconds"] == 1
        assert container["startupProbe"]["failureThreshold"] == 90
        assert container["image"] == "registry.example.com/mirror/mailbeacon/mailbeacon:0.1.0"
    for doc in docs:
        validate(doc)


def test_a_probe_override_with_its_own_handler_replaces_the_default_one() -> None:
    values = {"tracker": {"livenessProbe": {"tcpSocket": {"port": "http"}}}}
    _, pod = _pod(manifests(render(values)), "tracker")
    probe = pod["containers"][0]["livenessProbe"]
    assert probe["tcpSocket"] == {"port": "http"} and "httpGet" not in probe
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod})


def test_an_empty_registry_leaves_the_repository_whole() -> None:
    values = {"image": {"registry": "", "repository": "docker.io/acme/mailbeacon", "tag": "1.2.3"}}
    _, pod = _pod(manifests(render(values)), "tracker")
    assert pod["containers"][0]["image"] == "docker.io/acme/mailbeacon:1.2.3"
