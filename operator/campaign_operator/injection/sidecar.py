"""Sidecar injection by annotation: what the webhook does to one pod (docs/kubernetes.md "Injection by annotation").

The sidecar is not defined here. The Helm chart renders it from the library chart
mailbeacon-sidecar, with the very templates an app chart includes, into
MAILBEACON_INJECTION_TEMPLATE; this module only fits it to a pod: the pod's annotations
(default campaign, upstream Secret, provider), the sidecar's volumes, SMTP_HOST/SMTP_PORT in
the app's containers, and nothing twice. Plain functions on plain dicts; the kopf handler in
:mod:`campaign_operator.injection.webhook` wires them to admission requests.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args
from urllib.parse import urlsplit

from mailbeacon.contract.campaigns import DEFAULT_NAMESPACE, CampaignKey, InvalidCampaign
from mailbeacon.contract.settings import UpstreamProvider

INJECT = "mailbeacon.io/inject"
DEFAULT_CAMPAIGN = "mailbeacon.io/default-campaign"
UPSTREAM_SECRET = "mailbeacon.io/upstream-secret"
UPSTREAM_PROVIDER = "mailbeacon.io/upstream-provider"
# The chart's PodMonitor scrapes pods with this label (metrics.podMonitor.enabled).
PROXY_LABEL = "mailbeacon.io/proxy"

# The sidecar's settings a pod's annotations replace.
_CAMPAIGN_ENV = "MAILBEACON_DEFAULT_CAMPAIGN"
_PROVIDER_ENV = "MAILBEACON_UPSTREAM_PROVIDER"
_UPSTREAM_ENV = "MAILBEACON_UPSTREAM_SMTP"
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

JSON = dict[str, Any]


class InvalidTemplate(ValueError):
    """MAILBEACON_INJECTION_TEMPLATE is not a sidecar the webhook can add."""


class InvalidAnnotation(ValueError):
    """A pod's annotation names something that cannot be (the pod is then left alone)."""


@dataclass(frozen=True)
class SidecarTemplate:
    container: JSON  # the native sidecar: an init container with restartPolicy Always
    volumes: list[JSON]
    app_env: list[JSON]  # SMTP_HOST, SMTP_PORT for the app's containers

    @property
    def name(self) -> str:
        return str(self.container["name"])

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> SidecarTemplate:
        if not raw:
            raise InvalidTemplate(
                "MAILBEACON_INJECTION_TEMPLATE is not set: the webhook has no sidecar to add"
            )
        container, volumes, app_env = raw.get("initContainer"), raw.get("volumes"), raw.get("appEnv")
        if not isinstance(container, dict) or not container.get("name") or not container.get("image"):
            raise InvalidTemplate("initContainer must be a container with a name and an image")
        if container.get("restartPolicy") != "Always":
            raise InvalidTemplate("initContainer must be a native sidecar (restartPolicy: Always)")
        env = {entry.get("name") for entry in container.get("env") or [] if isinstance(entry, dict)}
        missing = {_CAMPAIGN_ENV, _PROVIDER_ENV, _UPSTREAM_ENV} - env
        if missing:
            raise InvalidTemplate(
                f"initContainer has no {', '.join(sorted(missing))} for the pods' annotations"
            )
        for kind, items in (("volumes", volumes), ("appEnv", app_env)):
            if not isinstance(items, list) or not all(isinstance(i, dict) and i.get("name") for i in items):
                raise InvalidTemplate(f"{kind} must be a list of named entries")
        exposed = literal_credentials(container)
        if exposed:
            # The webhook answers whoever reaches it: it must hand out nothing secret.
            raise InvalidTemplate(
                f"{', '.join(exposed)} carry a password in the sidecar's environment: the webhook would "
                "give it to anyone who asks; take it from a Secret (valueFrom) instead"
            )
        return cls(copy.deepcopy(container), copy.deepcopy(volumes), copy.deepcopy(app_env))  # type: ignore[arg-type]


def literal_credentials(container: Mapping[str, Any]) -> list[str]:
    """Env entries whose literal value is a URL with a password (a NATS URL with user:password@)."""
    found = []
    for entry in container.get("env") or []:
        value = entry.get("value") if isinstance(entry, dict) else None
        if isinstance(value, str) and any(urlsplit(url.strip()).password for url in value.split(",")):
            found.append(str(entry.get("name")))
    return found


def wants_injection(annotations: Mapping[str, str]) -> bool:
    return str(annotations.get(INJECT, "")).strip().lower() == "true"


def personalise(template: SidecarTemplate, annotations: Mapping[str, str], namespace: str) -> JSON:
    """The template's sidecar with the pod's own default campaign (a bare name is in the pod's
    namespace), upstream Secret and provider."""
    container = copy.deepcopy(template.container)
    env = {entry["name"]: entry for entry in container["env"]}
    campaign = annotations.get(DEFAULT_CAMPAIGN)
    if campaign is not None:
        try:
            env[_CAMPAIGN_ENV]["value"] = (
                str(CampaignKey.parse(campaign, namespace)) if campaign.strip() else ""
            )
        except InvalidCampaign as exc:
            raise InvalidAnnotation(f"{DEFAULT_CAMPAIGN}: {exc}") from None
    provider = annotations.get(UPSTREAM_PROVIDER)
    if provider is not None:
        if provider not in get_args(UpstreamProvider):
            choices = ", ".join(get_args(UpstreamProvider))
            raise InvalidAnnotation(f"{UPSTREAM_PROVIDER}: {provider!r} is not one of {choices}")
        env[_PROVIDER_ENV]["value"] = provider
    secret = annotations.get(UPSTREAM_SECRET)
    if secret is not None:
        if len(secret) > 253 or not _SECRET_NAME.match(secret):
            raise InvalidAnnotation(f"{UPSTREAM_SECRET}: {secret!r} is not a Secret name")
        reference = env[_UPSTREAM_ENV].get("valueFrom", {}).get("secretKeyRef")
        if not isinstance(reference, dict):
            raise InvalidAnnotation(f"{UPSTREAM_SECRET}: the sidecar does not read its relay from a Secret")
        reference["name"] = secret
    return container


@dataclass(frozen=True)
class Injection:
    """``pod`` is the pod as it must be admitted, None when it stays as it is; ``outcome`` says why
    (injected, completed, already_injected, not_requested, invalid_annotation)."""

    outcome: str
    pod: JSON | None = None
    warnings: list[str] = field(default_factory=list)


def inject(pod: Mapping[str, Any], template: SidecarTemplate) -> Injection:
    """Converges: a pod that has the sidecar only gets SMTP_HOST/SMTP_PORT into containers that
    lack them (another webhook may have added one since: reinvocation); one that has everything
    is left alone."""
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    if not wants_injection(annotations):
        return Injection("not_requested")
    try:
        sidecar = personalise(template, annotations, metadata.get("namespace") or DEFAULT_NAMESPACE)
    except InvalidAnnotation as exc:
        return Injection("invalid_annotation", warnings=[f"mailbeacon: pod not injected: {exc}"])
    new: JSON = copy.deepcopy(dict(pod))
    spec = new.setdefault("spec", {})
    present = {c.get("name") for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])}
    outcome = "completed"
    if template.name not in present:
        outcome = "injected"
        # First: the app's own init containers (a migration that mails) can use it too.
        spec["initContainers"] = [sidecar, *(spec.get("initContainers") or [])]
        volumes = spec.get("volumes") or []
        names = {volume.get("name") for volume in volumes}
        spec["volumes"] = volumes + [copy.deepcopy(v) for v in template.volumes if v["name"] not in names]
        meta = new.setdefault("metadata", {})
        meta["labels"] = {**(meta.get("labels") or {})}
        meta["labels"].setdefault(PROXY_LABEL, "sidecar")
    for container in spec.get("containers") or []:
        if container.get("name") != template.name:  # a proxy added by hand is no app
            container["env"] = with_env(container.get("env") or [], template.app_env)
    if new == pod:
        return Injection("already_injected")
    return Injection(outcome, pod=new)


def with_env(env: list[JSON], wanted: list[JSON]) -> list[JSON]:
    """``env`` with each wanted entry in place of the one of the same name, or appended."""
    result = [copy.deepcopy(entry) for entry in env]
    for entry in wanted:
        index = next((i for i, e in enumerate(result) if e.get("name") == entry["name"]), None)
        if index is None:
            result.append(copy.deepcopy(entry))
        else:
            result[index] = copy.deepcopy(entry)
    return result
