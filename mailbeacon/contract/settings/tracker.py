"""Tracker settings: pixels and clicks, ESP webhooks and their secrets, limits (docs/configuration.md "Tracker")."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator

from mailbeacon.contract.settings.values import (
    MAX_JSON_DEPTH_CEILING,
    CommaList,
    Listen,
    Networks,
    SettingsGroup,
)


class TrackerSettings(SettingsGroup):
    """The tracker: where it listens, the ESP webhooks' credentials and limits, its event
    buffer, and how opens and clicks are classified."""

    listen: Listen = Field(
        default="127.0.0.1:8080",
        validation_alias="MAILBEACON_TRACKER_LISTEN",
        description="host:port of the tracker (pixel, clicks, unsubscribes, webhooks)",
    )
    anonymize_ip: bool = Field(
        default=False,
        description="The tracker keeps IPv4 /24 and IPv6 /48 only, in events and providers' raw payloads, before anything leaves it",
    )
    max_webhook_bytes: int = Field(
        default=5 * 1024 * 1024,
        gt=0,
        description="Largest webhook body accepted (413 above); the tracker lowers it to what one NATS message can carry (the server's max_payload less 16.5 KiB for the event around the record: 1,031,680 bytes on NATS's default 1 MiB)",
    )
    max_json_depth: int = Field(
        default=64,
        ge=8,
        le=MAX_JSON_DEPTH_CEILING,
        description="Deepest nesting of objects and arrays a webhook body (and an SNS notification's "
        "Message) may have; deeper gets 400. The aggregator stores events this deep whatever its own value",
    )

    sendgrid_public_key: SecretStr | None = Field(
        default=None,
        description="SendGrid's signed Event Webhook verification key (base64 DER, as the console shows it; PEM too); SendGrid webhooks are refused (503) without it",
    )
    mailgun_signing_key: SecretStr | None = Field(
        default=None,
        description="Mailgun's webhook signing key; Mailgun webhooks are refused (503) without it",
    )
    ses_topic_arns: CommaList = Field(
        default_factory=list,
        description="SNS topic ARNs allowed to post SES events, comma-separated; SES webhooks are refused (503) without them",
    )
    sns_cert_dir: Path | None = Field(
        default=None,
        description="SNS signing certificates provided ahead of time, named like the last path segment of SigningCertURL; a certificate not there is fetched once over https from sns.<region>.amazonaws.com",
    )
    postmark_basic_auth: SecretStr | None = Field(
        default=None,
        description="user:password Postmark must send (HTTP basic auth); required when the tracker listens beyond loopback",
    )
    webhook_token: SecretStr | None = Field(
        default=None,
        description="Token of the generic webhooks (Authorization: Bearer, or X-Webhook-Token); required when the tracker listens beyond loopback",
    )
    allow_unauthenticated_webhooks: bool = Field(
        default=False,
        description="Accept the generic and Postmark webhooks without WEBHOOK_TOKEN / POSTMARK_BASIC_AUTH "
        "although the tracker listens beyond loopback (logged as a warning at start)",
    )
    webhook_max_age_seconds: float = Field(
        default=600.0, gt=0, description="Oldest signed SendGrid/Mailgun webhook accepted (replay window)"
    )
    sns_max_age_seconds: float = Field(
        default=3600.0, gt=0, description="Oldest SNS message accepted (SNS retries keep the original time)"
    )
    sns_confirm_subscriptions: bool = Field(
        default=True, description="Confirm SNS subscriptions to the topics in SES_TOPIC_ARNS automatically"
    )
    https_proxy: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MAILBEACON_HTTPS_PROXY", "HTTPS_PROXY"),
        description="Proxy for the tracker's outbound HTTPS (SNS certificates, subscription "
        "confirmation), http://host:port; plain HTTPS_PROXY is read too",
    )
    no_proxy: CommaList = Field(
        default_factory=list,
        validation_alias=AliasChoices("MAILBEACON_NO_PROXY", "NO_PROXY"),
        description="Hosts reached without HTTPS_PROXY: names (a leading dot or none: the domain and "
        "its subdomains), IP addresses or CIDRs, or *; plain NO_PROXY is read too",
    )

    event_buffer_limit: int = Field(
        default=100_000,
        ge=1,
        description="Pixel/click events kept in memory, waiting for NATS or held for the click burst window (about 2 KiB each); beyond it they are dropped and counted",
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        validation_alias="MAILBEACON_TRACKER_HEADER_TIMEOUT_SECONDS",
        description="A connection to the tracker that has not sent a request's complete headers this "
        "long after connecting, or after the first bytes of its next request, is closed",
    )
    max_connections: int = Field(
        default=10_000,
        ge=1,
        validation_alias="MAILBEACON_TRACKER_MAX_CONNECTIONS",
        description="Open connections per tracker process (lowered to the open-file limit less 128); above it a new connection is answered 503 and closed",
    )
    click_burst_seconds: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="Clicks on different links of one message this close are a scanner",
    )
    machine_ip_ranges: Networks = Field(
        default_factory=list,
        description="Extra CIDRs whose opens and clicks are always automated (your mail gateway's egress)",
    )

    @field_validator("https_proxy")
    @classmethod
    def _https_proxy(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("HTTPS_PROXY must be a proxy URL such as http://proxy.example:3128")
        return value
