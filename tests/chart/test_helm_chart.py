"""The Helm chart rendered by real Helm (helm-python-sdk), linted, and validated like a cluster would."""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mailbeacon.app.cli import _parser
from mailbeacon.contract.settings import Settings

helm_python = pytest.importorskip("helm_python")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "mailbeacon"
EXAMPLES = ROOT / "deploy" / "examples"
PRODUCTION = yaml.safe_load((EXAMPLES / "values-production.yaml").read_text())
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known.
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
NAMESPACE = "mailbeacon"

Manifest = dict[str, Any]


# The chart refuses to render without credentials for the aggregator's API and pages
# (test_the_aggregator_needs_credentials_by_default), and without a click-signing key it could
# keep (test_helm_gitops.py); tests about other things give it this token and this key unless
# their values say how the aggregator is protected and where the key comes from.
API_TOKEN = "chart-test-api-token-0123456789abcdef"
SIGNING_KEY = "chart-test-signing-key-0123456789abcdef"
WITH_TOKEN: dict[str, Any] = {"secrets": {"apiTokens": [API_TOKEN], "secretKeys": [SIGNING_KEY]}}


def _protects_aggregator(values: dict[str, Any]) -> bool:
    secrets = values.get("secrets", {})
    aggregator = values.get("aggregator", {})
    return bool(
        {"apiTokens", "apiReadTokens", "existingSecret"} & set(secrets)
        or "auth" in aggregator
        or aggregator.get("enabled") is False
    )


def with_token(values: dict[str, Any]) -> dict[str, Any]:
    secrets = dict(values.get("secrets", {}))
    if not _protects_aggregator(values):
        secrets["apiTokens"] = [API_TOKEN]
    if not {"existingSecret", "secretKeys"} & set(secrets):
        secrets["secretKeys"] = [SIGNING_KEY]
    return {**values, "secrets": secrets}


def render(values: dict[str, Any] | None = None, name: str = "mb", *, token: bool = True) -> dict[str, str]:
    chart = helm_python.Chart.load(str(CHART))
    values = values or {}
    return dict(chart.render(with_token(values) if token else values, name=name, namespace=NAMESPACE))


def manifests(rendered: dict[str, str]) -> list[Manifest]:
    return [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(docs: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


@pytest.fixture(scope="module")
def default_docs() -> list[Manifest]:
    return manifests(render())


@pytest.fixture(scope="module")
def production_docs() -> list[Manifest]:
    return manifests(render(PRODUCTION))


# Prometheus Operator kinds are custom resources kubernetes-validate does not know; these
# closed schemas hold the fields of the upstream CRDs that the chart uses, so a misspelled
# field fails here as it would be pruned (or refused) in a cluster.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _STRING_MAP},
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name", "labels"],
    "properties": {"name": {"type": "string"}, "labels": _STRING_MAP},
}


def _resource(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


MONITORING_SCHEMAS = {
    "ServiceMonitor": _resource(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NAMESPACE_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    "PodMonitor": _resource(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NAMESPACE_SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    "PrometheusRule": _resource(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr", "labels", "annotations"],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"},
                                        "expr": {"type": "string"},
                                        "for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                                        "labels": {
                                            "type": "object",
                                            "required": ["severity"],
                                            "additionalProperties": {"type": "string"},
                                        },
                                        "annotations": {
                                            "type": "object",
                                            "required": ["summary", "description"],
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                }
            },
        }
    ),
}


def validate(doc: Manifest) -> None:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(doc, MONITORING_SCHEMAS[doc["kind"]])
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(_as_rendered_for(doc, version), version, strict=True)


def _as_rendered_for(doc: Manifest, version: str) -> Manifest:
    """The chart renders unhealthyPodEvictionPolicy only for clusters that know it (1.27+, by
    .Capabilities); the render here assumes the newest, so older versions see it without."""
    policy = doc.get("spec", {}).get("unhealthyPodEvictionPolicy")
    if (
        doc["kind"] != "PodDisruptionBudget"
        or policy is None
        or tuple(map(int, version.split(".")[:2])) >= (1, 27)
    ):
        return doc
    return {**doc, "spec": {k: v for k, v in doc["spec"].items() if k != "unhealthyPodEvictionPolicy"}}


# The value sets the chart is linted and validated with (issue 16, "Done when"): a first look
# on defaults, production (production-like, existing Secret), HA (replicated components,
# spread and budgets), an external PostgreSQL given as a value, an external NATS cluster with
# credentials and TLS from Secrets, and a release that only offers the proxy sidecar helper.
HA: dict[str, Any] = {
    "database": {"url": "postgresql://mb:pw@postgresql.db.svc:5432/mb"},
    "tracker": {"replicas": 3, "podAntiAffinityPreset": "hard"},
    "aggregator": {"replicas": 2, "podDisruptionBudget": {"maxUnavailable": "50%"}},
    "proxy": {"enabled": True, "replicas": 3, "relayNetworks": ["10.244.0.0/16"]},
    "secrets": {"upstreamSmtp": "smtp://relay.example.com:587?starttls=true"},
}
EXTERNAL_POSTGRESQL: dict[str, Any] = {
    "database": {"url": "postgresql://mailbeacon:pw@postgresql.db.svc:5432/mailbeacon"},
    "aggregator": {"migrateOnStart": False},
}
EXTERNAL_NATS: dict[str, Any] = {
    "nats": {
        "url": "tls://nats-0.nats.nats.svc:4222,tls://nats-1.nats.nats.svc:4222,tls://nats-2.nats.nats.svc:4222",
        "auth": {"method": "creds", "existingSecret": "mailbeacon-nats-creds"},
        "tls": {"secretName": "mailbeacon-nats-tls", "clientCertificate": True},
    },
    "networkPolicy": {"egress": {"enabled": True}},
}
SIDECAR_ONLY: dict[str, Any] = {
    "tracker": {"enabled": False},
    "aggregator": {"enabled": False},
    "operator": {"enabled": False},
    "grafana": {"dashboard": {"enabled": False}},
}
VALUE_SETS = {
    "default": {},
    "production": PRODUCTION,
    "ha": HA,
    "external-postgresql": EXTERNAL_POSTGRESQL,
    "external-nats": EXTERNAL_NATS,
    "sidecar": SIDECAR_ONLY,
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_clean(values: dict[str, Any]) -> None:
    report = helm_python.lint(
        str(CHART), with_token(values), strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
    )
    assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.slow  # kubernetes-validate on every value set
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_value_sets_render_valid_manifests(values: dict[str, Any]) -> None:
    for doc in manifests(render(values)):
        validate(doc)


@pytest.mark.slow
def test_default_values_render_valid_manifests(default_docs: list[Manifest]) -> None:
    kinds = sorted(doc["kind"] for doc in default_docs)
    assert kinds == sorted(
        ["Deployment"] * 3
        + ["Service"] * 3
        + ["NetworkPolicy"] * 3
        + ["PodDisruptionBudget"] * 2  # tracker, aggregator
        # The operator's, and the uninstall hook's (its Job releases the Campaigns).
        + ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] * 2
        + ["Role", "RoleBinding", "Job"]
        + ["Pod"]  # helm test
        + ["Secret", "ConfigMap"]
    )
    for doc in default_docs:
        validate(doc)


@pytest.mark.slow
def test_production_values_render_valid_manifests(production_docs: list[Manifest]) -> None:
    kinds = {doc["kind"] for doc in production_docs}
    assert {"Ingress", "HorizontalPodAutoscaler", "ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds
    assert "Secret" not in kinds  # secrets.existingSecret: the chart creates none
    assert set(by_kind(production_docs, "Deployment")) == {
        f"mb-mailbeacon-{c}" for c in ("tracker", "aggregator", "operator", "proxy")
    }
    for doc in production_docs:
        validate(doc)


def test_crd_is_a_valid_custom_resource_definition() -> None:
    for path in (CHART / "crds").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            validate(doc)


def pod_specs(docs: list[Manifest]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] == "Deployment":
            yield (
                doc["metadata"]["name"],
                doc["spec"]["template"]["metadata"],
                doc["spec"]["template"]["spec"],
            )


@pytest.mark.parametrize("which", ["default", "production"])
def test_pods_are_hardened_probed_and_bounded(which: str, request: pytest.FixtureRequest) -> None:
    docs: list[Manifest] = request.getfixturevalue(f"{which}_docs")
    for name, _, pod in pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        mounts_needed = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert (
                context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            ), name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            probe_port = container["readinessProbe"]["httpGet"]["port"]
            assert probe_port in {p["name"] for p in container["ports"]}, name
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], name
            # Writable: /tmp, and the spool's own emptyDir under it. Anything else mounted is a
            # Secret, read-only.
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert "/tmp" in mounts and "readOnly" not in mounts["/tmp"], name
            writable = {"/tmp", "/tmp/mailbeacon/spool"}
            assert all(m.get("readOnly") is True for path, m in mounts.items() if path not in writable), name
            assert {m["name"] for m in container["volumeMounts"]} <= mounts_needed, name
        for volume in pod["volumes"]:
            assert set(volume) & {"emptyDir", "secret"}, (name, volume)  # no hostPath, no PVC
        # Only the operator talks to the Kubernetes API.
        assert pod["automountServiceAccountToken"] is name.endswith("-operator"), name


def test_standard_labels_and_selectors(production_docs: list[Manifest]) -> None:
    for doc in production_docs:
        labels = doc["metadata"]["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/component",
            "helm.sh/chart",
        ):
            assert key in labels, (doc["kind"], doc["metadata"]["name"], key)
    pods = {name: template["labels"] for name, template, _ in pod_specs(production_docs)}
    ports = {
        name: {p["name"] for c in pod["containers"] for p in c["ports"]}
        for name, _, pod in pod_specs(production_docs)
    }
    for service in by_kind(production_docs, "Service").values():
        selected = [n for n, labels in pods.items() if service["spec"]["selector"].items() <= labels.items()]
        assert len(selected) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports[selected[0]], (service["metadata"]["name"], port)
        # The ServiceMonitor scrapes the port named "http" of every Service.
        assert "http" in {p["name"] for p in service["spec"]["ports"]}
    for name, doc in by_kind(production_docs, "Deployment").items():
        assert doc["spec"]["selector"]["matchLabels"].items() <= pods[name].items()
    for name, pdb in by_kind(production_docs, "PodDisruptionBudget").items():
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pods[name].items()


def test_every_component_runs_a_real_command_with_real_settings(production_docs: list[Manifest]) -> None:
    commands = set(_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    fields = {
        name.removeprefix("MAILBEACON_") for variable in Settings.variables() for name in variable.names
    }
    for name, _, pod in pod_specs(production_docs):
        for container in pod["containers"]:
            assert container["args"][0] in commands, name
            assert container["args"][0] in {"tracker", "aggregator", "operator", "proxy"}
            for env in container["env"]:
                assert env["name"].startswith("MAILBEACON_"), env
                assert env["name"].removeprefix("MAILBEACON_") in fields, (name, env["name"])


def env_of(docs: list[Manifest], deployment: str) -> dict[str, Any]:
    pod = by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}


def test_secrets_come_from_the_existing_secret(production_docs: list[Manifest]) -> None:
    aggregator = env_of(production_docs, "mb-mailbeacon-aggregator")
    assert aggregator["MAILBEACON_DATABASE_URL"]["secretKeyRef"] == {
        "name": "mailbeacon-secrets",
        "key": "database-url",
        "optional": False,
    }
    tracker = env_of(production_docs, "mb-mailbeacon-tracker")
    assert tracker["MAILBEACON_SECRET_KEYS"]["secretKeyRef"]["name"] == "mailbeacon-secrets"
    assert tracker["MAILBEACON_SENDGRID_PUBLIC_KEY"]["secretKeyRef"]["optional"] is True
    proxy = env_of(production_docs, "mb-mailbeacon-proxy")
    assert proxy["MAILBEACON_UPSTREAM_SMTP"]["secretKeyRef"]["name"] == "mailbeacon-secrets"
    assert proxy["MAILBEACON_SMTP_LISTEN"] == "0.0.0.0:2525"
    assert proxy["MAILBEACON_DEFAULT_CAMPAIGN"] == "shop/transactional"
    operator = env_of(production_docs, "mb-mailbeacon-operator")
    assert operator["MAILBEACON_AGGREGATOR_URL"] == "http://mb-mailbeacon-aggregator.mailbeacon.svc:8090"
    assert operator["MAILBEACON_OPERATOR_NAMESPACES"] == "marketing,shop"
    for name in ("MAILBEACON_DATABASE_URL", "MAILBEACON_UPSTREAM_SMTP", "MAILBEACON_SECRET_KEYS"):
        for deployment in ("mb-mailbeacon-aggregator", "mb-mailbeacon-tracker", "mb-mailbeacon-proxy"):
            value = env_of(production_docs, deployment).get(name)
            assert value is None or "secretKeyRef" in value  # never a literal secret in a pod spec


def literal_env(docs: list[Manifest]) -> Iterator[tuple[str, dict[str, str]]]:
    for name, _, pod in pod_specs(docs):
        for container in pod["containers"]:
            yield name, {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize("which", ["default", "production"])
def test_every_rendered_setting_is_accepted_by_the_components(
    which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart puts in a pod's environment, the component's settings take at start
    (a list format or a boolean spelled wrong would crash-loop the pod instead)."""
    docs: list[Manifest] = request.getfixturevalue(f"{which}_docs")
    for name, env in literal_env(docs):
        with monkeypatch.context() as patched:
            for key in [k for k in os.environ if k.startswith("MAILBEACON_")]:
                patched.delenv(key)
            for key, value in env.items():
                patched.setenv(key, value)
            settings = Settings()
        assert settings.site_url == "https://track.example.com", name


def test_shared_proxy_relays_only_for_its_networks_and_authenticated_clients(
    production_docs: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = env_of(production_docs, "mb-mailbeacon-proxy")
    pod = by_kind(production_docs, "Deployment")["mb-mailbeacon-proxy"]["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}

    def mounted(setting: str, volume: str, key: str) -> None:
        """The file a setting names is the Secret's key, mounted read-only."""
        path = Path(proxy[setting])
        assert str(path.parent) == mounts[volume]
        assert {"key": key, "path": path.name} in secrets[volume]["items"]

    with monkeypatch.context() as patched:
        for key, value in proxy.items():
            if isinstance(value, str):
                patched.setenv(key, value)
        settings = Settings()
    # Loopback (probes, a sidecar-style client) and the pods' network relay; others must AUTH.
    assert settings.proxy.smtp_relay_networks == ["127.0.0.0/8", "::1/128", "10.244.0.0/16"]
    # AUTH only after STARTTLS: no network may send passwords in clear but loopback.
    assert settings.proxy.smtp_auth_networks == ["127.0.0.0/8", "::1/128"]
    assert secrets["smtp-auth"]["secretName"] == "mailbeacon-smtp-users"
    mounted("MAILBEACON_SMTP_AUTH_FILE", "smtp-auth", "smtp-users")
    assert secrets["smtp-tls"]["secretName"] == "mailbeacon-smtp-tls"
    mounted("MAILBEACON_SMTP_TLS_CERT_FILE", "smtp-tls", "tls.crt")
    mounted("MAILBEACON_SMTP_TLS_KEY_FILE", "smtp-tls", "tls.key")
    assert secrets["dkim"]["secretName"] == "mailbeacon-dkim"
    mounted("MAILBEACON_DKIM_PRIVATE_KEY_FILE", "dkim", "dkim-private-key")
    assert (settings.proxy.dkim_selector, settings.proxy.dkim_domain) == ("mb2025", "example.com")
    # Readable by the container's group only (fsGroup), not by the world.
    assert all(secret["defaultMode"] == 0o440 for secret in secrets.values())


@pytest.mark.slow
def test_component_settings_reach_their_pods() -> None:
    values = {
        "database": {"url": "postgresql://mb:pw@db:5432/mb"},
        "nats": {"url": "nats://nats:4222", "streamMaxAgeDays": 14},
        "config": {
            "machineIpRanges": ["198.51.100.0/24", "2001:db8::/32"],
            "extraEnv": [{"name": "MAILBEACON_LOG_LEVEL", "value": "WARNING"}],
        },
        "tracker": {
            "eventBufferLimit": 250000,
            "shutdownDrainSeconds": 45,
            "extraEnv": [{"name": "MAILBEACON_CLICK_BURST_SECONDS", "value": "2"}],
        },
        "aggregator": {
            "migrateOnStart": False,
            "eventRetentionDays": 90,
            "batchSize": 1000,
            "parkedEventTtlHours": 24,
            "parkedEventLimit": 2500000,
        },
        "operator": {"extraEnv": [{"name": "MAILBEACON_LOG_LEVEL", "value": "DEBUG"}]},
        "proxy": {
            "enabled": True,
            "relayNetworks": ["10.0.0.0/8"],
            "maxMessageBytes": 10485760,
            "maxRecipients": 500,
            "upstream": {"poolSize": 20, "timeoutSeconds": 60, "retrySeconds": 120},
            "sesConfigurationSet": "no-tracking",
            "honourUnsubscribes": False,
            "upstreamProvider": "ses",
        },
        "secrets": {"upstreamSmtp": RELAY},
    }
    docs = manifests(render(values))
    tracker = env_of(docs, "mb-mailbeacon-tracker")
    assert tracker["MAILBEACON_MACHINE_IP_RANGES"] == "198.51.100.0/24,2001:db8::/32"
    assert tracker["MAILBEACON_EVENT_BUFFER_LIMIT"] == "250000"
    assert tracker["MAILBEACON_SHUTDOWN_DRAIN_SECONDS"] == "45"
    assert tracker["MAILBEACON_CLICK_BURST_SECONDS"] == "2"
    pod = by_kind(docs, "Deployment")["mb-mailbeacon-tracker"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60  # the delay (5) and the drain fit in the grace period
    aggregator = env_of(docs, "mb-mailbeacon-aggregator")
    assert aggregator["MAILBEACON_MIGRATE_ON_START"] == "false"
    assert aggregator["MAILBEACON_EVENT_RETENTION_DAYS"] == "90"
    assert aggregator["MAILBEACON_INGEST_BATCH_SIZE"] == "1000"
    assert aggregator["MAILBEACON_PARKED_EVENT_TTL_HOURS"] == "24"
    assert aggregator["MAILBEACON_PARKED_EVENT_LIMIT"] == "2500000"  # not 2.5e+06
    proxy = env_of(docs, "mb-mailbeacon-proxy")
    # Every component of the release provisions the stream alike, whichever starts first.
    for deployment in ("tracker", "aggregator", "operator", "proxy"):
        stream = env_of(docs, f"mb-mailbeacon-{deployment}")
        assert (stream["MAILBEACON_STREAM_MAX_AGE_DAYS"], stream["MAILBEACON_STREAM_REPLICAS"]) == ("14", "3")
    assert proxy["MAILBEACON_MAX_MESSAGE_BYTES"] == "10485760"
    assert proxy["MAILBEACON_SMTP_MAX_RECIPIENTS"] == "500"
    assert proxy["MAILBEACON_UPSTREAM_POOL_SIZE"] == "20"
    assert proxy["MAILBEACON_UPSTREAM_TIMEOUT"] == "60"
    assert proxy["MAILBEACON_UPSTREAM_RETRY_SECONDS"] == "120"
    assert proxy["MAILBEACON_SES_CONFIGURATION_SET"] == "no-tracking"
    assert proxy["MAILBEACON_HONOUR_UNSUBSCRIBES"] == "false"
    assert "MAILBEACON_SMTP_AUTH_FILE" not in proxy and "MAILBEACON_SMTP_TLS_CERT_FILE" not in proxy
    # The operator's own extraEnv comes last and wins over config.extraEnv.
    for deployment, level in (("mb-mailbeacon-operator", "DEBUG"), ("mb-mailbeacon-tracker", "WARNING")):
        pod = by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]
        levels = [e["value"] for e in pod["containers"][0]["env"] if e["name"] == "MAILBEACON_LOG_LEVEL"]
        assert levels[-1] == level, deployment
    for doc in docs:
        validate(doc)


def test_aggregator_migrates_a_fresh_database_by_default(default_docs: list[Manifest]) -> None:
    """A fresh PostgreSQL has no schema, and an aggregator refuses a schema it does not know."""
    assert env_of(default_docs, "mb-mailbeacon-aggregator")["MAILBEACON_MIGRATE_ON_START"] == "true"
    assert "MAILBEACON_EVENT_RETENTION_DAYS" not in env_of(default_docs, "mb-mailbeacon-aggregator")


def test_parked_events_are_bounded_by_default(default_docs: list[Manifest]) -> None:
    env = env_of(default_docs, "mb-mailbeacon-aggregator")
    assert (env["MAILBEACON_PARKED_EVENT_TTL_HOURS"], env["MAILBEACON_PARKED_EVENT_LIMIT"]) == (
        "72",
        "1000000",
    )


def test_chart_made_secret_holds_given_values() -> None:
    given = manifests(
        render(
            {
                "secrets": {
                    "secretKeys": ["new-key-0123456789abcdefghijklmnop", "old-key-0123456789abcdefghijklmnop"]
                },
                "database": {"url": "postgresql://mb:pw@db:5432/mb"},
            }
        )
    )
    secret = by_kind(given, "Secret")["mb-mailbeacon"]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "secret-keys": "new-key-0123456789abcdefghijklmnop,old-key-0123456789abcdefghijklmnop",
        "database-url": "postgresql://mb:pw@db:5432/mb",
        "api-tokens": API_TOKEN,
    }
    default = by_kind(manifests(render()), "Secret")["mb-mailbeacon"]
    assert "database-url" not in default["data"]  # SQLite fallback, announced in NOTES.txt


def test_operator_rbac_is_exactly_what_it_uses(
    default_docs: list[Manifest], production_docs: list[Manifest]
) -> None:
    wanted = [
        {
            "apiGroups": ["mailbeacon.io"],
            "resources": ["campaigns"],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {"apiGroups": ["mailbeacon.io"], "resources": ["campaigns/status"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]
    # (The uninstall hook's own RBAC, "-release...", is tested in test_helm_uninstall.py.)
    operator = "mb-mailbeacon-operator"
    assert [r["rules"] for n, r in by_kind(default_docs, "ClusterRole").items() if n == operator] == [wanted]
    roles = [doc for doc in production_docs if doc["kind"] == "Role" and doc["metadata"]["name"] == operator]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["marketing", "shop"]
    assert all(r["rules"] == wanted for r in roles)
    assert not by_kind(production_docs, "ClusterRole")
    bindings = [
        doc for doc in production_docs if doc["kind"] == "RoleBinding" and doc["metadata"]["name"] == operator
    ]
    assert {(b["subjects"][0]["name"], b["subjects"][0]["namespace"]) for b in bindings} == {
        ("mb-mailbeacon-operator", NAMESPACE)
    }


def test_dashboard_config_map_carries_the_sidecar_label(production_docs: list[Manifest]) -> None:
    config_map = by_kind(production_docs, "ConfigMap")["mb-mailbeacon-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Email"}
    uid = yaml.safe_load(config_map["data"]["mailbeacon.json"])["uid"]
    assert uid.startswith("mailbeacon-")  # its release's own


def test_notes_tell_what_to_do_next() -> None:
    notes = render()["mailbeacon/templates/NOTES.txt"]
    assert "WARNING: no database.url" in notes and "kubectl get campaigns -A" in notes
    production = render(PRODUCTION)["mailbeacon/templates/NOTES.txt"]
    assert "WARNING" not in production and "mb-mailbeacon-proxy.mailbeacon.svc:25" in production
    assert (
        "loopback, 10.244.0.0/16" in production
        and "Secret mailbeacon-smtp-users (after STARTTLS)" in production
    )
    exposed = yaml.safe_load(yaml.safe_dump(PRODUCTION))
    exposed["proxy"].update({"auth": {"existingSecret": ""}, "tls": {"secretName": ""}})
    exposed["proxy"]["service"] = {"type": "LoadBalancer"}
    notes = render(exposed)["mailbeacon/templates/NOTES.txt"]
    assert "Clients outside those networks cannot send" in notes
    assert "WARNING: the proxy's Service is LoadBalancer without STARTTLS" in notes


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"tracker": {"replicas": "two"}}, "/tracker/replicas"),
        ({"trackr": {"replicas": 2}}, "trackr"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"nats": {"url": "http://nats:4222"}}, "/nats/url"),
        ({"siteUrl": "track.example.com"}, "/siteUrl"),
        ({"secrets": {"secretKeys": ["short"]}}, "/secrets/secretKeys/0"),
        ({"secrets": {"secretKeys": ["k" * 31]}}, "/secrets/secretKeys/0"),
        ({"tracker": {"maxConnections": 0}}, "/tracker/maxConnections"),
        ({"tracker": {"headerTimeoutSeconds": 0}}, "/tracker/headerTimeoutSeconds"),
        ({"tracker": {"webhooks": {"maxJsonDepth": 1000}}}, "/tracker/webhooks/maxJsonDepth"),
        ({"secrets": {"upstreamSmtp": "mail.example.com:25"}}, "/secrets/upstreamSmtp"),
        ({"database": {"url": "mysql://db/mb"}}, "/database/url"),
        ({"proxy": {"upstreamProvider": "sendmail"}}, "/proxy/upstreamProvider"),
        ({"proxy": {"defaultCampaign": "Not A Name"}}, "/proxy/defaultCampaign"),
        ({"operator": {"statusInterval": 0}}, "/operator/statusInterval"),
        ({"operator": {"watchNamespaces": ["Marketing"]}}, "/operator/watchNamespaces/0"),
        (
            {"tracker": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}},
            "targetCPUUtilizationPercentage",
        ),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
        ({"metrics": {"prometheusRule": {"warningRatio": 2}}}, "/metrics/prometheusRule/warningRatio"),
        ({"config": {"logLevel": "LOUD"}}, "/config/logLevel"),
        ({"tracker": {"service": {"port": 70000}}}, "/tracker/service/port"),
        # An open relay is refused outright; so are networks that are not networks.
        ({"proxy": {"relayNetworks": ["0.0.0.0/0"]}}, "/proxy/relayNetworks/0"),
        ({"proxy": {"relayNetworks": ["::/0"]}}, "/proxy/relayNetworks/0"),
        ({"proxy": {"relayNetworks": ["10.0.0.0/33"]}}, "/proxy/relayNetworks/0"),
        ({"proxy": {"auth": {"clearTextNetworks": ["pods"]}}}, "/proxy/auth/clearTextNetworks/0"),
        ({"proxy": {"auth": {"existingSecret": "SMTP Users"}}}, "/proxy/auth/existingSecret"),
        ({"proxy": {"tls": {"required": "yes"}}}, "/proxy/tls/required"),
        ({"proxy": {"dkim": {"domain": "not a domain"}}}, "/proxy/dkim/domain"),
        ({"proxy": {"upstream": {"poolSize": 0}}}, "/proxy/upstream/poolSize"),
        ({"proxy": {"maxRecipients": 0}}, "/proxy/maxRecipients"),
        ({"proxy": {"extraEnv": [{"name": "MAILBEACON_X"}]}}, "/proxy/extraEnv/0"),
        ({"config": {"machineIpRanges": ["gateway.example.com"]}}, "/config/machineIpRanges/0"),
        ({"config": {"trustedProxies": ["10.0.0.0/8 "]}}, "/config/trustedProxies/0"),
        ({"tracker": {"eventBufferLimit": 0}}, "/tracker/eventBufferLimit"),
        ({"tracker": {"extraEnv": [{"value": "x"}]}}, "/tracker/extraEnv/0"),
        ({"aggregator": {"migrateOnStart": "always"}}, "/aggregator/migrateOnStart"),
        ({"aggregator": {"eventRetentionDays": -1}}, "/aggregator/eventRetentionDays"),
        ({"aggregator": {"parkedEventTtlHours": 0.5}}, "/aggregator/parkedEventTtlHours"),
        ({"aggregator": {"parkedEventLimit": 0}}, "/aggregator/parkedEventLimit"),
        ({"metrics": {"prometheusRule": {"complaintRatePercent": 101}}}, "complaintRatePercent"),
        ({"metrics": {"prometheusRule": {"minVolume": 0}}}, "/metrics/prometheusRule/minVolume"),
    ],
)
def test_invalid_values_are_refused_by_the_schema(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(values)
    assert complaint in str(refused.value)


RELAY = "smtp://relay.example.com:587?starttls=true"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"aggregator": {"replicas": 2}}, "needs PostgreSQL"),
        ({"proxy": {"enabled": True}}, "needs an upstream relay"),
        (
            {
                "aggregator": {"eventRetentionDays": 7},
                "nats": {"url": "nats://nats:4222", "streamMaxAgeDays": 30},
            },
            "must be longer than nats.streamMaxAgeDays",
        ),
        # The shared proxy: nobody may send (loopback only), AUTH nobody could use, TLS without a cert.
        ({"proxy": {"enabled": True}, "secrets": {"upstreamSmtp": RELAY}}, "no client could send"),
        (
            {
                "proxy": {"enabled": True, "auth": {"existingSecret": "smtp-users"}},
                "secrets": {"upstreamSmtp": RELAY},
            },
            "AUTH is offered only after STARTTLS",
        ),
        (
            {
                "proxy": {"enabled": True, "relayNetworks": ["10.0.0.0/8"], "tls": {"required": True}},
                "secrets": {"upstreamSmtp": RELAY},
            },
            "proxy.tls.required needs proxy.tls.secretName",
        ),
        (
            {
                "proxy": {
                    "enabled": True,
                    "relayNetworks": ["10.0.0.0/8"],
                    "dkim": {"existingSecret": "dkim"},
                },
                "secrets": {"upstreamSmtp": RELAY},
            },
            "needs proxy.dkim.selector and proxy.dkim.domain",
        ),
    ],
)
def test_contradictory_values_fail_with_a_reason(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmRenderError) as refused:
        render(values)
    assert complaint in str(refused.value)


def _leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path


def test_every_value_is_documented_and_typed() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    # Typed: every key of values.yaml has a schema with a type and a description.
    for path in _leaves(values):
        node = schema
        for depth, key in enumerate(path):
            if "properties" not in node or key not in node["properties"]:
                # Kubernetes objects passed through as they are (resources, securityContext...)
                assert node.get("type") == "object" and depth > 0, path
                break
            node = node["properties"][key]
            assert node.get("description"), path
            assert "type" in node or "oneOf" in node or "anyOf" in node, path
    # Documented: every key that holds a value has a comment right above it (keys inside
    # Kubernetes objects passed through as they are, like securityContext, excepted).
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).split(" #")[0].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        node = schema
        passed_through = False
        for part in path[:-1]:
            if "properties" not in node or part == "resources":
                passed_through = True
                break
            node = node["properties"].get(part, {})
        if passed_through or "properties" not in node or not rest:
            continue
        assert lines[index - 1].strip().startswith("#"), f"values.yaml line {index + 1}: {key} has no comment"


APP_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop
spec:
  selector:
    matchLabels: {app.kubernetes.io/name: shop}
  template:
    metadata:
      labels: {app.kubernetes.io/name: shop, mailbeacon.io/proxy: sidecar}
    spec:
      containers:
        - name: shop
          image: registry.example.com/shop:1.4.2
          env: [{name: SMTP_HOST, value: "127.0.0.1"}, {name: SMTP_PORT, value: "2525"}]
        {{- include "mailbeacon.proxySidecar" (dict
              "image" "ghcr.io/mailbeacon/mailbeacon:0.1.0"
              "natsUrl" "nats://nats.nats.svc:4222"
              "siteUrl" "https://track.example.com"
              "secretName" "mailbeacon"
              "upstreamProvider" "sendgrid"
              "defaultCampaign" "shop/transactional") | nindent 8 }}
      volumes:
        {{- include "mailbeacon.proxySidecarVolume" (dict) | nindent 8 }}
"""


def test_app_charts_include_the_proxy_sidecar_template(tmp_path: Path) -> None:
    """An app's own chart depends on mailbeacon only for the named template."""
    app = tmp_path / "shop"
    (app / "templates").mkdir(parents=True)
    (app / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "shop",
                "version": "1.0.0",
                "dependencies": [{"name": "mailbeacon", "version": "0.1.0", "repository": f"file://{CHART}"}],
            }
        )
    )
    (app / "values.yaml").write_text(
        yaml.safe_dump(
            {
                "mailbeacon": {
                    "tracker": {"enabled": False},
                    "aggregator": {"enabled": False},
                    "operator": {"enabled": False},
                    "grafana": {"dashboard": {"enabled": False}},
                }
            }
        )
    )
    (app / "templates" / "deployment.yaml").write_text(APP_DEPLOYMENT)
    helm_python.dependency_build(str(app))
    rendered = dict(helm_python.Chart.load(str(app)).render({}, name="shop", namespace="shop"))
    docs = manifests(rendered)
    assert [doc["kind"] for doc in docs] == ["Deployment"]  # nothing of mailbeacon itself
    deployment = docs[0]
    validate(deployment)
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["shop", "mailbeacon-proxy"]
    # The documented snippet is exactly what the template renders: they cannot drift apart.
    example = list(yaml.safe_load_all((EXAMPLES / "app-with-proxy-sidecar.yaml").read_text()))[1]
    documented = example["spec"]["template"]["spec"]
    assert containers[1] == documented["containers"][1]
    assert deployment["spec"]["template"]["spec"]["volumes"] == documented["volumes"]
    env = {e["name"]: e.get("value") for e in containers[1]["env"]}
    assert env["MAILBEACON_SMTP_LISTEN"] == "127.0.0.1:2525"  # only the app's pod can relay
    shutil.rmtree(app / "charts")


def test_examples_are_valid_kubernetes_manifests() -> None:
    for doc in yaml.safe_load_all((EXAMPLES / "app-with-proxy-sidecar.yaml").read_text()):
        validate(doc)
