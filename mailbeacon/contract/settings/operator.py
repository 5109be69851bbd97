"""Campaign operator settings: its namespaces, status copies, and the sidecar-injection
webhook (docs/kubernetes.md "Injection by annotation")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from mailbeacon.contract.settings.values import CommaList, Listen, OptionalListen, SettingsGroup


class OperatorSettings(SettingsGroup):
    """The Campaign operator: its health endpoint, which namespaces it serves, how often it
    copies statistics into a Campaign's status, and its sidecar-injection webhook."""

    listen: Listen = Field(
        default="127.0.0.1:8070",
        validation_alias="MAILBEACON_OPERATOR_LISTEN",
        description="host:port of the Campaign operator's /healthz, /readyz and /metrics",
    )
    status_interval: float = Field(
        default=30.0,
        gt=0,
        validation_alias="MAILBEACON_OPERATOR_STATUS_INTERVAL",
        description="Seconds between copies of a campaign's statistics into its status",
    )
    namespaces: CommaList = Field(
        default_factory=list,
        validation_alias="MAILBEACON_OPERATOR_NAMESPACES",
        description="Namespaces whose Campaigns the operator serves; empty means all",
    )
    # Sidecar injection by annotation, served by the operator (docs/kubernetes.md "Injection by annotation").
    injection_listen: OptionalListen = Field(
        default=None,
        description="host:port of the operator's sidecar-injection webhook (HTTPS), e.g. 0.0.0.0:9443; "
        "unset: no webhook",
    )
    injection_template: dict[str, Any] | None = Field(
        default=None,
        description="The sidecar the webhook adds, as JSON {initContainer, volumes, appEnv}: the Helm chart renders it from the mailbeacon-sidecar library chart, so it equals what app charts include. Refused at start when a literal value in it carries a password",
    )
    injection_cert_file: Path | None = Field(
        default=None,
        description="The webhook's certificate (PEM, e.g. cert-manager's tls.crt), re-read when it "
        "changes; unset: the operator makes one at each start",
    )
    injection_key_file: Path | None = Field(
        default=None, description="The private key of INJECTION_CERT_FILE"
    )
    injection_dns_names: CommaList = Field(
        default_factory=list,
        description="Names the operator's own webhook certificate is made for: the webhook Service's "
        "DNS names, comma-separated",
    )
    injection_webhook_configuration: str | None = Field(
        default=None,
        description="MutatingWebhookConfiguration whose caBundle the operator sets to the CA of the "
        "certificate it made (without INJECTION_CERT_FILE)",
    )
