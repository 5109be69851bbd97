"""The injection webhook served by the running operator: real AdmissionReviews over HTTPS.

kopf's runtime runs the operator (``KopfRunner``) against the Kubernetes API test server, with
the chart's MutatingWebhookConfiguration created in it; the webhook serves on kopf's own HTTPS
server on 127.0.0.1. As the API server would, the test trusts only the caBundle the operator
wrote into that configuration, checks the certificate against the webhook Service's DNS name,
POSTs admission.k8s.io/v1 AdmissionReviews, applies the returned JSON patch to the pod and
validates the result as Kubernetes would.
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from kopf.testing import KopfRunner

from campaign_operator.injection.sidecar import DEFAULT_CAMPAIGN, INJECT, UPSTREAM_SECRET
from campaign_operator.injection.tls import make_certificate
from campaign_operator.injection.webhook import WEBHOOK_ID
from campaign_operator.metrics import REGISTRY
from campaign_operator.wiring import register
from mailbeacon.contract.settings import Settings
from tests.chart.test_helm_chart import by_kind, manifests, render
from tests.kube_api import MUTATING_WEBHOOK_CONFIGURATIONS, PODS, FakeKubernetes
from tests.kube_patch import json_patch
from tests.support import eventually, free_port, make_settings

pytest.importorskip("helm_python")

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "helm" / "mailbeacon" / "crds" / "campaigns.mailbeacon.io.yaml"
NATIVE_SIDECAR_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


@pytest.fixture(scope="module")
def chart() -> dict[str, Any]:
    """What the chart renders with injection on: the configuration and the operator's settings."""
    docs = manifests(render({"operator": {"injection": {"enabled": True}}}))
    (configuration,) = by_kind(docs, "MutatingWebhookConfiguration").values()
    pod = by_kind(docs, "Deployment")["mb-mailbeacon-operator"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"] if "value" in e}
    return {"configuration": configuration, "env": env}


@pytest.fixture
def kube(chart: dict[str, Any]) -> Iterator[FakeKubernetes]:
    server = FakeKubernetes(
        [yaml.safe_load(CRD.read_text())],
        namespaces=["default", "shop"],
        builtins=[PODS, MUTATING_WEBHOOK_CONFIGURATIONS],
    ).start()
    try:
        yield server
    finally:
        server.stop()


def operator_settings(tmp_path: Path, nats_url: str, chart: dict[str, Any], **overrides: Any) -> Settings:
    env = chart["env"]
    values = {
        "nats_url": nats_url,
        "operator_listen": "127.0.0.1:0",
        "injection_listen": f"127.0.0.1:{free_port()}",
        "injection_template": json.loads(env["MAILBEACON_INJECTION_TEMPLATE"]),
        "injection_dns_names": env["MAILBEACON_INJECTION_DNS_NAMES"],
        "injection_webhook_configuration": env["MAILBEACON_INJECTION_WEBHOOK_CONFIGURATION"],
    }
    return make_settings(tmp_path, **(values | overrides))


@contextmanager
def operator_running(
    kube: FakeKubernetes, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    registry = kopf.OperatorRegistry()
    register(registry, settings)
    with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=registry, timeout=30):
        yield


def pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod as a ReplicaSet controller creates it (no name yet, defaults filled in)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "shop-6c9b7d-",
            "namespace": "shop",
            "labels": {"app.kubernetes.io/name": "shop"},
            "annotations": annotations if annotations is not None else {INJECT: "true"},
        },
        "spec": {
            "containers": [
                {
                    "name": "shop",
                    "image": "registry.example.com/shop:1.4.2",
                    "env": [{"name": "SMTP_HOST", "value": "smtp.sendgrid.net"}],
                    "resources": {},
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "restartPolicy": "Always",
            "serviceAccountName": "default",
        },
    }


def review(obj: dict[str, Any]) -> dict[str, Any]:
    kind = {"group": "", "version": "v1", "kind": "Pod"}
    resource = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


class ApiServer:
    """Calls the webhook as the API server does: HTTPS, trusting only the configuration's caBundle,
    checking the certificate against the Service's DNS name."""

    def __init__(self, port: int, ca_pem: bytes, configuration: dict[str, Any]) -> None:
        service = configuration["webhooks"][0]["clientConfig"]["service"]
        self.url = f"https://127.0.0.1:{port}{service['path']}"
        self.hostname = f"{service['name']}.{service['namespace']}.svc"
        self.context = ssl.create_default_context(cadata=ca_pem.decode())

    async def admit(self, obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The response, and the object as the API server would store it (the patch applied)."""
        sent = review(obj)
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.url, json=sent, ssl=self.context, server_hostname=self.hostname) as answer,
        ):
            assert answer.status == 200, await answer.text()
            body = await answer.json()
        assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
        response: dict[str, Any] = body["response"]
        assert response["uid"] == sent["request"]["uid"]
        assert response["allowed"] is True  # never a refused pod
        if "patch" not in response:
            return response, obj
        assert response["patchType"] == "JSONPatch"
        return response, json_patch(obj, json.loads(base64.b64decode(response["patch"])))


def validate(obj: dict[str, Any]) -> None:
    for version in NATIVE_SIDECAR_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


async def test_annotated_pods_get_the_sidecar_from_the_running_webhook(
    tmp_path: Path,
    nats_url: str,
    kube: FakeKubernetes,
    chart: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configuration = chart["configuration"]
    name = configuration["metadata"]["name"]
    async with aiohttp.ClientSession() as http:  # kubectl apply of the chart's configuration
        url = f"{kube.url}/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
        async with http.post(url, json=configuration) as created:
            assert created.status == 201
    settings = operator_settings(tmp_path, nats_url, chart)
    port = int((settings.operator.injection_listen or "").rsplit(":", 1)[1])
    assert WEBHOOK_ID == "inject-proxy"
    with operator_running(kube, settings, tmp_path, monkeypatch):

        async def ca_installed() -> bytes | None:
            stored = kube.get("mutatingwebhookconfigurations", None, name)
            bundle = stored and stored["webhooks"][0]["clientConfig"].get("caBundle")
            return base64.b64decode(bundle) if bundle else None

        before = {o: injections(o) for o in ("injected", "invalid_annotation", "already_injected")}
        ca_pem = await eventually(ca_installed, within=20)
        # Only caBundle was written: the rest is the chart's (failurePolicy Ignore and all).
        stored = kube.get("mutatingwebhookconfigurations", None, name)
        assert stored is not None
        written = copy.deepcopy(stored["webhooks"])
        del written[0]["clientConfig"]["caBundle"]
        assert written == configuration["webhooks"]
        api = ApiServer(port, ca_pem, configuration)
        await eventually(lambda: _answers(api), within=20)

        # Annotated: the sidecar, its volumes, SMTP_HOST/SMTP_PORT pointing at it.
        asked = pod({INJECT: "true", DEFAULT_CAMPAIGN: "receipts", UPSTREAM_SECRET: "shop-relay"})
        response, injected = await api.admit(asked)
        validate(injected)
        spec = injected["spec"]
        proxy = spec["initContainers"][0]
        assert proxy["name"] == "mailbeacon-proxy" and proxy["restartPolicy"] == "Always"
        assert proxy["startupProbe"]["httpGet"]["path"] == "/healthz"
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in proxy["env"]}
        assert env["MAILBEACON_DEFAULT_CAMPAIGN"] == "shop/receipts"
        assert env["MAILBEACON_UPSTREAM_SMTP"]["secretKeyRef"]["name"] == "shop-relay"
        assert env["MAILBEACON_SECRET_KEYS"]["secretKeyRef"]["name"] == "mailbeacon"  # values' default
        assert {m["name"] for m in proxy["volumeMounts"]} <= {v["name"] for v in spec["volumes"]}
        app_env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
        assert app_env == {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": "2525"}
        assert injected["metadata"]["labels"]["mailbeacon.io/proxy"] == "sidecar"
        # Everything else is the pod as it was asked for.
        assert injected["metadata"]["annotations"] == asked["metadata"]["annotations"]
        assert spec["containers"][0]["image"] == asked["spec"]["containers"][0]["image"]

        # Without the annotation, and once injected (a reinvocation): no patch at all.
        for untouched in (pod({}), pod({INJECT: "false"}), injected):
            response, admitted = await api.admit(untouched)
            assert "patch" not in response and admitted == untouched

        # A wrong annotation: the pod is created as it is, and kubectl shows why.
        response, admitted = await api.admit(pod({INJECT: "true", DEFAULT_CAMPAIGN: "Spring Sale!"}))
        assert "patch" not in response
        assert any(DEFAULT_CAMPAIGN in warning for warning in response["warnings"])

        assert injections("injected") - before["injected"] == 1
        assert injections("invalid_annotation") - before["invalid_annotation"] == 1
        assert injections("already_injected") - before["already_injected"] == 1


async def _answers(api: ApiServer) -> bool:
    try:
        response, _ = await api.admit(pod({}))
    except aiohttp.ClientConnectionError:
        return False
    return "patch" not in response


def injections(outcome: str) -> float:
    """mailbeacon_operator_injections_total{outcome} of this process (the operator runs in it)."""
    return REGISTRY.get_sample_value("mailbeacon_operator_injections_total", {"outcome": outcome}) or 0.0


async def test_a_given_certificate_is_served_and_the_configuration_left_alone(
    tmp_path: Path,
    nats_url: str,
    kube: FakeKubernetes,
    chart: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cert-manager's mode: the operator serves the mounted certificate (an unencrypted key, as
    cert-manager writes it) and writes nothing into the configuration (cert-manager's CA injector
    does)."""
    names = chart["env"]["MAILBEACON_INJECTION_DNS_NAMES"].split(",")
    made = make_certificate(names)
    key = serialization.load_pem_private_key(made.key_pem, made.password.encode())
    (tmp_path / "tls.crt").write_bytes(made.cert_pem)
    (tmp_path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    settings = operator_settings(
        tmp_path,
        nats_url,
        chart,
        injection_cert_file=str(tmp_path / "tls.crt"),
        injection_key_file=str(tmp_path / "tls.key"),
        injection_webhook_configuration=None,
        injection_dns_names="",
    )
    port = int((settings.operator.injection_listen or "").rsplit(":", 1)[1])
    with operator_running(kube, settings, tmp_path, monkeypatch):
        api = ApiServer(port, made.ca_pem, chart["configuration"])
        await eventually(lambda: _answers(api), within=20)
        _, injected = await api.admit(pod())
        validate(injected)
        assert injected["spec"]["initContainers"][0]["name"] == "mailbeacon-proxy"
    assert not [path for method, path in kube.requests if "mutatingwebhookconfigurations" in path]
