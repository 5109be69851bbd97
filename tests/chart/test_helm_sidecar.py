"""The proxy as a native sidecar, from the library chart alone (docs/kubernetes.md "A Job with the native sidecar").

An app chart that depends on ``deploy/helm/mailbeacon-sidecar`` renders only its own objects
(no operator, CRD, RBAC or Secret of mailbeacon's), and its Job's pod has the proxy as the
first init container with ``restartPolicy: Always`` and a startupProbe: the app starts once the
proxy answers, and the Job completes when the app does.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mailbeacon.contract.settings import Settings
from tests.sidecar_chart import LIBRARY

helm_python = pytest.importorskip("helm_python")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "mailbeacon"
EXAMPLES = ROOT / "deploy" / "examples"
# Native sidecars need 1.29; the newest schemas kubernetes-validate knows.
NATIVE_SIDECAR_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/examples/newsletter-job, its file:// dependency pointed at the library where it lies."""
    chart = tmp_path_factory.mktemp("example") / "newsletter-job"
    shutil.copytree(EXAMPLES / "newsletter-job", chart)
    metadata = yaml.safe_load((chart / "Chart.yaml").read_text())
    assert metadata["dependencies"] == [
        {
            "name": "mailbeacon-sidecar",
            "version": "0.1.0",
            "repository": "file://../../helm/mailbeacon-sidecar",
        }
    ]
    assert (EXAMPLES / "newsletter-job" / "../../helm/mailbeacon-sidecar").resolve() == LIBRARY
    metadata["dependencies"][0]["repository"] = f"file://{LIBRARY}"
    (chart / "Chart.yaml").write_text(yaml.safe_dump(metadata))
    helm_python.dependency_build(str(chart))
    return chart


def render(chart: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = helm_python.Chart.load(str(chart)).render(values, name="newsletter", namespace="marketing")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def validate(doc: dict[str, Any]) -> None:
    for version in NATIVE_SIDECAR_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_an_app_chart_gets_only_its_own_objects(example: Path) -> None:
    docs = render(example, {})
    assert [doc["kind"] for doc in docs] == ["CronJob"]  # no operator, CRD, RBAC, Secret, Service
    for doc in docs:
        validate(doc)
    # The library brings named templates only: no CRD Helm would install, no manifest.
    (packaged,) = (example / "charts").iterdir()
    with tarfile.open(packaged) as archive:
        files = [name.split("/", 1)[1] for name in archive.getnames()]
    assert not [name for name in files if name.startswith("crds/")]
    assert all(Path(name).name.startswith("_") for name in files if name.startswith("templates/"))
    assert yaml.safe_load((LIBRARY / "Chart.yaml").read_text())["type"] == "library"


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    spec = job["spec"]["jobTemplate"]["spec"] if job["kind"] == "CronJob" else job["spec"]
    pod: dict[str, Any] = spec["template"]["spec"]
    return pod


def test_the_proxy_is_a_native_sidecar_the_app_waits_for(
    example: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job,) = render(example, {"schedule": ""})
    assert job["kind"] == "Job"
    validate(job)
    pod = pod_of(job)
    assert pod["restartPolicy"] == "Never"
    proxy = pod["initContainers"][0]
    assert proxy["name"] == "mailbeacon-proxy" and proxy["restartPolicy"] == "Always"
    # The kubelet starts the app once this answers: the proxy is connected to NATS and listens.
    ports = {port["name"]: port["containerPort"] for port in proxy["ports"]}
    assert proxy["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "proxy-http"}
    assert "proxy-http" in ports
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in proxy["env"]}
    app_env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    # The app is told where the proxy answers, and only the pod's containers can reach it.
    assert (
        env["MAILBEACON_SMTP_LISTEN"] == "127.0.0.1:2525" == f"{app_env['SMTP_HOST']}:{app_env['SMTP_PORT']}"
    )
    assert ports["smtp"] == 2525
    assert env["MAILBEACON_UPSTREAM_SMTP"]["secretKeyRef"] == {"name": "mailbeacon", "key": "upstream-smtp"}
    assert {m["name"] for m in proxy["volumeMounts"]} <= {v["name"] for v in pod["volumes"]}
    # What the chart sets, the proxy takes at start.
    with monkeypatch.context() as patched:
        for key in [k for k in os.environ if k.startswith("MAILBEACON_")]:
            patched.delenv(key)
        for key, value in env.items():
            if isinstance(value, str):
                patched.setenv(key, value)
        settings = Settings()
    assert settings.proxy.default_campaign == "marketing/newsletter"
    assert settings.shutdown_delay_seconds == 0  # it stops after the app: no delay to sit out
    # The kubectl example is exactly this rendering.
    documented = yaml.safe_load((EXAMPLES / "job-with-native-sidecar.yaml").read_text())
    assert documented == job


def test_the_cron_job_runs_the_same_pod(example: Path) -> None:
    (cron,) = render(example, {})
    (job,) = render(example, {"schedule": ""})
    assert cron["spec"]["schedule"] == "0 9 1 * *"
    assert pod_of(cron) == pod_of(job)


def test_example_chart_lints_clean(example: Path) -> None:
    report = helm_python.lint(str(example), {}, strict=True, kube_version="v1.30.0")
    # An example app chart needs no icon (the one INFO message); nothing else is said.
    assert report["errors"] == [] and all(m["severity"] <= 1 for m in report["messages"]), report


def test_library_chart_lints_clean() -> None:
    report = helm_python.lint(str(LIBRARY), {}, strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and report["messages"] == [], report


def test_the_mailbeacon_chart_takes_the_proxy_from_the_library() -> None:
    """One definition: the chart's subchart is the library itself (a link, not a copy), declared
    as its dependency; its old helper includes the library's template."""
    assert (CHART / "charts" / "mailbeacon-sidecar").resolve() == LIBRARY
    metadata = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert {
        "name": "mailbeacon-sidecar",
        "version": "0.1.0",
        "repository": "file://../mailbeacon-sidecar",
    } in (metadata["dependencies"])
    library = yaml.safe_load((LIBRARY / "Chart.yaml").read_text())
    assert library["version"] == "0.1.0"
