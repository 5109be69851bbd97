"""The one settings object per process.

Built once at start-up (``Settings()``) and passed down; no other module reads the
environment. Every variable carries the ``MAILBEACON_`` prefix; ``SITE_URL`` alone is
accepted as a fallback because the original tracking guide used it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

UpstreamProvider = Literal["generic", "sendgrid", "mailgun", "ses", "postmark"]


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:25``); a bare port binds the default host."""
    value = value.strip()
    if value.isdigit():
        return default_host, int(value)
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address must look like host:port, got {value!r}")
    return host, int(port)


def _split_list(value: object) -> object:
    # Lists arrive from the environment as comma-separated strings.
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MAILBEACON_",
        case_sensitive=False,
        extra="ignore",
        populate_by_name=True,
    )

    site_url: str = Field(
        default="http://127.0.0.1:8080",
        validation_alias=AliasChoices("MAILBEACON_SITE_URL", "SITE_URL", "site_url"),
        description="Public base URL of the tracker, used in pixel, click and unsubscribe links",
    )
    nats_url: str | None = Field(
        default=None,
        description="NATS server URL, or a cluster's URLs separated by commas; unset means embedded nats-server",
    )
    database_url: SecretStr | None = Field(default=None, description="SQL database; unset means SQLite")
    secret_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Click-signing keys, newest first; all are accepted when verifying",
    )
    upstream_smtp: SecretStr | None = Field(
        default=None, description="smtp://[user:password@]host:port[?starttls=true] or smtps://..."
    )
    upstream_provider: UpstreamProvider = "generic"
    upstream_timeout: float = Field(default=30.0, gt=0)
    default_campaign: str | None = None
    auto_create_campaigns: bool = Field(
        default=False, description="An unknown X-Campaign name creates the campaign in namespace default"
    )
    data_dir: Path = Path(".mailbeacon")
    anonymize_ip: bool = False
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="CIDRs of proxies whose X-Forwarded-For is believed"
    )
    max_webhook_bytes: int = Field(default=5 * 1024 * 1024, gt=0)

    smtp_listen: str = "127.0.0.1:2525"
    proxy_http_listen: str = "127.0.0.1:8025"
    tracker_listen: str = "127.0.0.1:8080"
    aggregator_listen: str = "127.0.0.1:8090"
    outbox_dir: Path | None = Field(default=None, description="Development outbox shown in the web UI")
    operator_listen: str = Field(
        default="127.0.0.1:8070", description="Health, readiness and metrics of the Campaign operator"
    )
    aggregator_url: str | None = Field(
        default=None,
        description="Base URL the operator reads campaign statistics from; unset means AGGREGATOR_LISTEN",
    )
    operator_status_interval: float = Field(
        default=30.0, gt=0, description="Seconds between copies of a campaign's statistics into its status"
    )
    operator_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Namespaces whose Campaigns the operator serves; empty means all"
    )

    stream_max_age_days: float = Field(default=30.0, gt=0)
    stream_duplicate_window_seconds: float = Field(default=600.0, gt=0)
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # Allow JetStream fast-ingest batches on the stream (nats-server 2.14+); once on, every
    # server running the stream must be 2.14 or newer.
    stream_fast_batches: bool = True

    ingest_batch_size: int = Field(default=5000, ge=1, le=10000)
    migrate_on_start: bool = Field(
        default=False, description="The aggregator brings the SQL schema up to date when it starts"
    )
    event_retention_days: float | None = Field(
        default=None, gt=0, description="Stored events older than this are pruned; statistics stay"
    )
    max_message_bytes: int = Field(default=50 * 1024 * 1024, gt=0)

    sendgrid_public_key: SecretStr | None = None
    mailgun_signing_key: SecretStr | None = None
    ses_topic_arns: Annotated[list[str], NoDecode] = Field(default_factory=list)
    sns_cert_dir: Path | None = None
    postmark_basic_auth: SecretStr | None = None
    webhook_token: SecretStr | None = None
    webhook_max_age_seconds: float = Field(
        default=600.0, gt=0, description="Oldest signed SendGrid/Mailgun webhook accepted (replay window)"
    )
    sns_max_age_seconds: float = Field(
        default=3600.0, gt=0, description="Oldest SNS message accepted (SNS retries keep the original time)"
    )
    sns_confirm_subscriptions: bool = Field(
        default=True, description="Confirm SNS subscriptions to the topics in SES_TOPIC_ARNS automatically"
    )

    event_buffer_limit: int = Field(
        default=100_000,
        ge=1,
        description="Pixel/click events kept in memory, waiting for NATS or held for the click burst window",
    )
    shutdown_drain_seconds: float = Field(
        default=20.0,
        ge=0,
        description="How long a stopping tracker keeps publishing its buffered events, "
        "and a stopping proxy lets its relays in flight finish",
    )
    click_burst_seconds: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="Clicks on different links of one message this close are a scanner",
    )
    machine_ip_ranges: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra CIDRs whose opens and clicks are automated (mail gateways)"
    )

    log_level: str = "INFO"

    # SMTP proxy: who may relay, TLS, limits (README "SMTP proxy settings").
    smtp_relay_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="CIDRs that may relay without AUTH; everyone else must authenticate",
    )
    smtp_auth_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="CIDRs that may AUTH without STARTTLS",
    )
    smtp_auth_file: Path | None = Field(default=None, description="username:password lines")
    smtp_auth_users: SecretStr | None = Field(default=None, description="username:password,...")
    smtp_tls_cert_file: Path | None = None
    smtp_tls_key_file: Path | None = None
    smtp_require_starttls: bool = False
    smtp_max_recipients: int = Field(default=100, ge=1)
    smtp_command_timeout: float = Field(default=300.0, gt=0)
    smtp_data_timeout: float = Field(default=600.0, gt=0)
    upstream_pool_size: int = Field(default=8, ge=1)
    upstream_idle_seconds: float = Field(default=30.0, gt=0)
    upstream_retry_seconds: float = Field(default=30.0, ge=0)
    upstream_ca_file: Path | None = None
    ses_configuration_set: str | None = None
    dkim_private_key_file: Path | None = None
    dkim_selector: str | None = None
    dkim_domain: str | None = None
    tracking_optout_file: Path | None = None
    honeypot_links: bool = True
    honour_unsubscribes: bool = Field(
        default=True,
        description="the proxy does not relay a campaign's mail to recipients who unsubscribed or complained",
    )

    @field_validator(
        "secret_keys",
        "ses_topic_arns",
        "trusted_proxies",
        "smtp_relay_networks",
        "smtp_auth_networks",
        "operator_namespaces",
        "machine_ip_ranges",
        mode="before",
    )
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("trusted_proxies", "smtp_relay_networks", "smtp_auth_networks", "machine_ip_ranges")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # fail at start-up on a typo
        return value

    @field_validator("site_url")
    @classmethod
    def _site_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("SITE_URL must be an absolute http(s) URL")
        return value.rstrip("/")

    @field_validator("aggregator_url")
    @classmethod
    def _aggregator_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("AGGREGATOR_URL must be an absolute http(s) URL")
        return value.rstrip("/")

    @field_validator(
        "smtp_listen", "proxy_http_listen", "tracker_listen", "aggregator_listen", "operator_listen"
    )
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)  # fail at start-up, not at bind time
        return value

    @field_validator("default_campaign")
    @classmethod
    def _default_campaign(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        from mailbeacon.campaigns import CampaignKey

        return str(CampaignKey.parse(value))

    def signing_keys(self) -> list[bytes]:
        return [key.get_secret_value().encode() for key in self.secret_keys]

    def database_url_value(self) -> str | None:
        return self.database_url.get_secret_value() if self.database_url else None

    def smtp_auth_users_value(self) -> str | None:
        return self.smtp_auth_users.get_secret_value() if self.smtp_auth_users else None

    def upstream_smtp_value(self) -> str | None:
        return self.upstream_smtp.get_secret_value() if self.upstream_smtp else None

    def listen(self, which: Literal["smtp", "proxy_http", "tracker", "aggregator"]) -> tuple[str, int]:
        return parse_listen(getattr(self, f"{which}_listen"))

    def listens_on_loopback(
        self, which: Literal["smtp", "proxy_http", "tracker", "aggregator", "operator"]
    ) -> bool:
        """Whether a component's listen address is reachable from this machine only."""
        from mailbeacon.netaddr import is_loopback_host

        return is_loopback_host(parse_listen(getattr(self, f"{which}_listen"))[0])

    def aggregator_base_url(self) -> str:
        """Where the aggregator's API answers: AGGREGATOR_URL, else its listen address."""
        if self.aggregator_url:
            return self.aggregator_url.rstrip("/")
        host, port = parse_listen(self.aggregator_listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
