"""Injection by annotation, the chart and the decisions (docs/kubernetes.md "Injection by annotation").

The sidecar the webhook adds is the library chart's rendering for the same inputs: the chart
renders MAILBEACON_INJECTION_TEMPLATE from the library's templates, and ``inject`` only fits it
to a pod's annotations. These tests compare the two for several inputs, so they cannot drift.
The webhook served by the running operator: test_injection_webhook.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from campaign_operator.injection.sidecar import (
    DEFAULT_CAMPAIGN,
    INJECT,
    PROXY_LABEL,
    UPSTREAM_PROVIDER,
    UPSTREAM_SECRET,
    InvalidTemplate,
    SidecarTemplate,
    inject,
)
from tests.chart.test_helm_chart import by_kind, manifests, render
from tests.sidecar_chart import LibraryApp

helm_python = pytest.importorskip("helm_python")

NATIVE_SIDECAR_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
INJECTION = {"operator": {"injection": {"enabled": True}}}
VALUES: dict[str, Any] = {
    "image": {"registry": "registry.example.com", "repository": "mailbeacon", "tag": "0.1.0"},
    "nats": {"url": "nats://nats.nats.svc:4222", "streamReplicas": 1, "streamMaxAgeDays": 14},
    "siteUrl": "https://t.shop.example",
    "config": {"anonymizeIp": True, "logLevel": "WARNING"},
    "operator": {
        "injection": {
            "enabled": True,
            "secretName": "mailbeacon-sidecar",
            "defaultCampaign": "shop/receipts",
            "upstreamProvider": "postmark",
            "resources": {"requests": {"cpu": "20m", "memory": "80Mi"}, "limits": {"memory": "200Mi"}},
            "spoolSizeLimit": "32Mi",
        }
    },
}
# The library's parameters for the same values: what an app chart author would write.
PARAMS: dict[str, Any] = {
    "image": "registry.example.com/mailbeacon:0.1.0",
    "imagePullPolicy": "IfNotPresent",
    "natsUrl": "nats://nats.nats.svc:4222",
    "siteUrl": "https://t.shop.example",
    "secretName": "mailbeacon-sidecar",
    "defaultCampaign": "shop/receipts",
    "upstreamProvider": "postmark",
    "anonymizeIp": True,
    "logLevel": "WARNING",
    "resources": {"requests": {"cpu": "20m", "memory": "80Mi"}, "limits": {"memory": "200Mi"}},
    "spoolSizeLimit": "32Mi",
    # The stream as the release's components provision it, whichever starts first.
    "extraEnv": [
        {"name": "MAILBEACON_STREAM_REPLICAS", "value": "1"},
        {"name": "MAILBEACON_STREAM_MAX_AGE_DAYS", "value": "14"},
        {"name": "MAILBEACON_STREAM_FAST_BATCHES", "value": "true"},
    ],
}


def operator_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = by_kind(docs, "Deployment")["mb-mailbeacon-operator"]["spec"]["template"]["spec"]
    return {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}


@pytest.fixture(scope="module")
def template() -> SidecarTemplate:
    raw = json.loads(operator_env(manifests(render(VALUES)))["MAILBEACON_INJECTION_TEMPLATE"])
    return SidecarTemplate.parse(raw)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> LibraryApp:
    return LibraryApp(tmp_path_factory.mktemp("library") / "app")


def app_pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "shop-7d9f-",
            "namespace": "shop",
            "labels": {"app.kubernetes.io/name": "shop"},
            "annotations": {INJECT: "true", **(annotations or {})},
        },
        "spec": {
            "containers": [
                {
                    "name": "shop",
                    "image": "registry.example.com/shop:1.4.2",
                    "env": [
                        {"name": "SMTP_HOST", "value": "smtp.sendgrid.net"},
                        {"name": "LANG", "value": "C"},
                    ],
                }
            ],
            **spec,
        },
    }


@pytest.mark.parametrize(
    ("annotations", "params"),
    [
        ({}, {}),
        (
            {DEFAULT_CAMPAIGN: "newsletter", UPSTREAM_SECRET: "ses-relay", UPSTREAM_PROVIDER: "ses"},
            {
                "defaultCampaign": "shop/newsletter",
                "upstreamSecretName": "ses-relay",
                "upstreamProvider": "ses",
            },
        ),
        ({DEFAULT_CAMPAIGN: "marketing/spring"}, {"defaultCampaign": "marketing/spring"}),
        ({DEFAULT_CAMPAIGN: ""}, {"defaultCampaign": ""}),
    ],
    ids=["values", "annotations", "other-namespace", "untracked"],
)
def test_the_injected_sidecar_is_the_library_charts(
    template: SidecarTemplate, library: LibraryApp, annotations: dict[str, str], params: dict[str, Any]
) -> None:
    result = inject(app_pod(annotations), template)
    assert result.outcome == "injected" and result.pod is not None
    expected = library.pod(**{**PARAMS, **params})["spec"]
    spec = result.pod["spec"]
    assert spec["initContainers"] == expected["initContainers"]
    assert spec["volumes"] == expected["volumes"]
    # The app's own SMTP_HOST is pointed at the sidecar in place; its other settings stay.
    host, port = expected["containers"][0]["env"]
    assert spec["containers"][0]["env"] == [host, {"name": "LANG", "value": "C"}, port]
    assert result.pod["metadata"]["labels"][PROXY_LABEL] == "sidecar"
    for version in NATIVE_SIDECAR_VERSIONS:
        kubernetes_validate.validate(result.pod, version, strict=True)


def test_pods_are_injected_once_and_only_when_asked(template: SidecarTemplate) -> None:
    unannotated = app_pod()
    del unannotated["metadata"]["annotations"]
    assert inject(unannotated, template).outcome == "not_requested"
    assert inject(app_pod({INJECT: "false"}), template).outcome == "not_requested"
    injected = inject(app_pod(), template).pod
    assert injected is not None
    again = inject(injected, template)
    assert (again.outcome, again.pod) == ("already_injected", None)
    # A container another webhook added after us (reinvocation) gets the environment, nothing else.
    grown = copy.deepcopy(injected)
    grown["spec"]["containers"].append({"name": "mailer", "image": "registry.example.com/mailer:1"})
    completed = inject(grown, template)
    assert completed.outcome == "completed" and completed.pod is not None
    assert completed.pod["spec"]["initContainers"] == injected["spec"]["initContainers"]
    assert completed.pod["spec"]["volumes"] == injected["spec"]["volumes"]
    assert completed.pod["spec"]["containers"][1]["env"] == template.app_env
    # An app's own init containers come after the proxy: they can send mail too.
    with_init = inject(
        app_pod(initContainers=[{"name": "migrate", "image": "registry.example.com/shop:1"}]), template
    )
    assert with_init.pod is not None
    assert [c["name"] for c in with_init.pod["spec"]["initContainers"]] == ["mailbeacon-proxy", "migrate"]


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (DEFAULT_CAMPAIGN, "Spring Sale!"),
        (UPSTREAM_SECRET, "Not_A_Secret"),
        (UPSTREAM_PROVIDER, "sendmail"),
    ],
)
def test_a_wrong_annotation_leaves_the_pod_alone_with_a_warning(
    template: SidecarTemplate, annotation: str, value: str
) -> None:
    result = inject(app_pod({annotation: value}), template)
    assert (result.outcome, result.pod) == ("invalid_annotation", None)
    assert len(result.warnings) == 1 and annotation in result.warnings[0]


def test_a_template_carrying_a_password_is_refused(template: SidecarTemplate) -> None:
    raw = {
        "initContainer": copy.deepcopy(template.container),
        "volumes": template.volumes,
        "appEnv": template.app_env,
    }
    for entry in raw["initContainer"]["env"]:
        if entry["name"] == "MAILBEACON_NATS_URL":
            entry["value"] = "nats://mailbeacon:s3cret@nats.nats.svc:4222"
    with pytest.raises(InvalidTemplate, match="MAILBEACON_NATS_URL"):
        SidecarTemplate.parse(raw)
    plain = copy.deepcopy(raw["initContainer"])
    plain.pop("restartPolicy")
    with pytest.raises(InvalidTemplate, match="native sidecar"):
        SidecarTemplate.parse({**raw, "initContainer": plain})


# --- the chart's objects --------------------------------------------------------------------


def test_injection_is_off_by_default() -> None:
    docs = manifests(render())
    assert not by_kind(docs, "MutatingWebhookConfiguration")
    assert not [k for k in operator_env(docs) if k.startswith("MAILBEACON_INJECTION_")]


@pytest.mark.slow
def test_the_webhook_configuration_never_blocks_a_pod() -> None:
    docs = manifests(render(INJECTION))
    (configuration,) = by_kind(docs, "MutatingWebhookConfiguration").values()
    (webhook,) = configuration["webhooks"]
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["sideEffects"] == "None"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert 1 <= webhook["timeoutSeconds"] <= 10
    assert webhook["namespaceSelector"] == {"matchLabels": {"mailbeacon.io/injection": "enabled"}}
    assert webhook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "operations": ["CREATE"],
            "scope": "Namespaced",
        }
    ]
    service = webhook["clientConfig"]["service"]
    assert service["path"] == "/inject-proxy"  # the handler's id in the operator
    services = by_kind(docs, "Service")
    assert services[service["name"]]["spec"]["ports"] == [
        {"name": "webhook", "port": service["port"], "targetPort": "webhook", "protocol": "TCP"}
    ]
    operator = by_kind(docs, "Deployment")["mb-mailbeacon-operator"]["spec"]["template"]["spec"]
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in operator["containers"][0]["ports"]
    env = operator_env(docs)
    assert env["MAILBEACON_INJECTION_LISTEN"] == "0.0.0.0:9443"
    # The operator makes its certificate for the Service's names and trusts the configuration
    # above with its CA: RBAC for that one object, and nothing random in the chart.
    names = env["MAILBEACON_INJECTION_DNS_NAMES"].split(",")
    assert f"{service['name']}.{service['namespace']}.svc" in names
    assert env["MAILBEACON_INJECTION_WEBHOOK_CONFIGURATION"] == configuration["metadata"]["name"]
    (role,) = [
        r for r in by_kind(docs, "ClusterRole").values() if r["metadata"]["name"].endswith("-injection")
    ]
    assert role["rules"] == [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": [configuration["metadata"]["name"]],
            "verbs": ["get", "patch"],
        }
    ]
    assert "caBundle" not in webhook["clientConfig"]
    # The same on every render (GitOps); the chart's Secret is defect 1's matter (its generated key).
    again = manifests(render(INJECTION))
    assert [d for d in again if d["kind"] != "Secret"] == [d for d in docs if d["kind"] != "Secret"]
    for doc in docs:
        for version in NATIVE_SIDECAR_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_cert_manager_provides_the_certificate_when_asked() -> None:
    values = {"operator": {"injection": {"enabled": True, "certManager": {"enabled": True}}}}
    docs = manifests(render(values))
    (configuration,) = by_kind(docs, "MutatingWebhookConfiguration").values()
    (certificate,) = by_kind(docs, "Certificate").values()
    assert configuration["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"mailbeacon/{certificate['metadata']['name']}"
    }
    service = configuration["webhooks"][0]["clientConfig"]["service"]
    assert f"{service['name']}.{service['namespace']}.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"]["name"] in by_kind(docs, "Issuer")
    # The Secret cert-manager writes is mounted read-only where the operator reads it.
    pod = by_kind(docs, "Deployment")["mb-mailbeacon-operator"]["spec"]["template"]["spec"]
    volume = next(
        v
        for v in pod["volumes"]
        if v.get("secret", {}).get("secretName") == certificate["spec"]["secretName"]
    )
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
    env = operator_env(docs)
    assert Path(env["MAILBEACON_INJECTION_CERT_FILE"]).parent == Path(mount["mountPath"])
    assert "MAILBEACON_INJECTION_WEBHOOK_CONFIGURATION" not in env  # cert-manager injects the CA
    assert not [r for r in by_kind(docs, "ClusterRole") if r.endswith("-injection")]
    own = {
        "operator": {
            "injection": {
                "enabled": True,
                "certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}},
            }
        }
    }
    docs = manifests(render(own))
    assert not by_kind(docs, "Issuer")
    (certificate,) = by_kind(docs, "Certificate").values()
    assert certificate["spec"]["issuerRef"] == {
        "name": "corp-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }


def test_default_values_with_injection_lint_clean() -> None:
    report = helm_python.lint(
        str(Path(__file__).resolve().parents[2] / "deploy" / "helm" / "mailbeacon"),
        {**INJECTION, "secrets": {"apiTokens": ["chart-test-api-token-0123456789abcdef"]}},
        strict=True,
        kube_version="v1.30.0",
    )
    assert report["errors"] == [] and report["messages"] == [], report


def test_notes_say_how_to_turn_injection_on_for_a_namespace() -> None:
    notes = render(INJECTION)["mailbeacon/templates/NOTES.txt"]
    assert "kubectl label namespace NAMESPACE mailbeacon.io/injection=enabled" in notes
    assert "Injection" not in render()["mailbeacon/templates/NOTES.txt"]
