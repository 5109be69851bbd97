"""The one settings object per process.

Built once at start-up (``Settings()``) and passed down; no other module reads the
environment. Every variable carries the ``MAILBEACON_`` prefix; ``SITE_URL`` alone is
accepted as a fallback because the original tracking guide used it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

UpstreamProvider = Literal["generic", "sendgrid", "mailgun", "ses", "postmark"]
# Click-signing keys shorter than this are refused at start (README "Configuration").
MIN_SECRET_KEY_LENGTH = 32
# The highest MAX_JSON_DEPTH may be set: events this deep (plus their envelope) stay well
# inside what every JSON reader on the way accepts (pydantic's stops at 200 levels).
MAX_JSON_DEPTH_CEILING = 128


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


def invalid_settings(exc: ValidationError) -> str:
    """A refused configuration, one line per setting, naming its variable and never its value
    (the value may be a secret)."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]).upper() if error["loc"] else "configuration"
        name = field if field.startswith("MAILBEACON_") or not error["loc"] else f"MAILBEACON_{field}"
        lines.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


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
    runtime_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("MAILBEACON_RUNTIME_DIR", "XDG_RUNTIME_DIR", "runtime_dir"),
        description="Per-user directory whose mailbeacon/up.json tells the command line where a "
        "running `mailbeacon up` is; unset means XDG_RUNTIME_DIR, else /tmp/mailbeacon-<uid>",
    )
    anonymize_ip: bool = False
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="CIDRs of proxies whose X-Forwarded-For is believed"
    )
    max_webhook_bytes: int = Field(
        default=5 * 1024 * 1024,
        gt=0,
        description="Largest webhook body accepted (413 above); the tracker lowers it to what one "
        "NATS message can carry (the server's max_payload less room for the event around the record)",
    )
    max_json_depth: int = Field(
        default=64,
        ge=8,
        le=MAX_JSON_DEPTH_CEILING,
        description="Deepest nesting of objects and arrays a webhook body (and an SNS notification's "
        "Message) may have; deeper gets 400. The aggregator stores events this deep whatever its own value",
    )

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
    # Aggregator API and pages: who may read and change (README "Aggregator: authentication").
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens with full access to the aggregator's API and pages, comma-separated "
        "(at least 24 characters each); enforced also on loopback once set",
    )
    api_read_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens that may only read (GET) the aggregator's API and pages, comma-separated",
    )
    auth_proxy_header: str | None = Field(
        default=None,
        description="Header naming the user an authenticating proxy (oauth2-proxy: X-Forwarded-Email) "
        "vouches for; believed only from TRUSTED_PROXIES, and gives full access",
    )
    api_auth: Literal["auto", "none"] = Field(
        default="auto",
        description="none serves the aggregator's API and pages to anyone, also off loopback (logged "
        "as a warning); auto requires the tokens or the proxy header off loopback",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="Token the CLI and the operator send to the aggregator; unset means the first of "
        "API_TOKENS (the operator: of API_READ_TOKENS first)",
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
    parked_event_ttl_hours: float = Field(
        default=72.0,
        ge=1,
        description="Events waiting for a copy mailbeacon has not seen (parked) are deleted after this "
        "many hours; they never counted",
    )
    parked_event_limit: int = Field(
        default=1_000_000,
        ge=1,
        description="At most this many parked events are kept; beyond it the oldest are deleted",
    )
    max_message_bytes: int = Field(default=50 * 1024 * 1024, gt=0)

    sendgrid_public_key: SecretStr | None = None
    mailgun_signing_key: SecretStr | None = None
    ses_topic_arns: Annotated[list[str], NoDecode] = Field(default_factory=list)
    sns_cert_dir: Path | None = None
    postmark_basic_auth: SecretStr | None = None
    webhook_token: SecretStr | None = None
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
        validation_alias=AliasChoices("MAILBEACON_HTTPS_PROXY", "HTTPS_PROXY", "https_proxy"),
        description="Proxy for the tracker's outbound HTTPS (SNS certificates, subscription "
        "confirmation), http://host:port; plain HTTPS_PROXY is read too",
    )
    no_proxy: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("MAILBEACON_NO_PROXY", "NO_PROXY", "no_proxy"),
        description="Hosts reached without HTTPS_PROXY: names (a leading dot or none: the domain and "
        "its subdomains), IP addresses or CIDRs, or *; plain NO_PROXY is read too",
    )

    event_buffer_limit: int = Field(
        default=100_000,
        ge=1,
        description="Pixel/click events kept in memory, waiting for NATS or held for the click burst window",
    )
    tracker_header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A connection to the tracker that has not sent a request's complete headers this "
        "long after connecting, or after the first bytes of its next request, is closed",
    )
    tracker_max_connections: int = Field(
        default=10_000,
        ge=1,
        description="Open connections per tracker process (lowered to fit the open-file limit); "
        "above it a new connection is answered 503 and closed",
    )
    shutdown_drain_seconds: float = Field(
        default=20.0,
        ge=0,
        description="How long a stopping tracker keeps publishing its buffered events, "
        "and a stopping proxy lets its relays in flight finish; what is unpublished then "
        "goes to DATA_DIR/spool for the next start",
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
    smtp_max_connections: int = Field(
        default=200,
        ge=1,
        description="SMTP sessions the proxy serves at once; a client above it gets 421 4.7.0 and is disconnected",
    )
    smtp_auth_failure_delay: float = Field(
        default=1.0,
        ge=0,
        le=30,
        description="Seconds before a failed SMTP AUTH attempt is answered; doubled for each further "
        "failure in the same session (a tarpit). Successful AUTH is answered at once",
    )
    smtp_auth_max_failures: int = Field(
        default=3, ge=1, description="Failed SMTP AUTH attempts that end the session with 421 4.7.0"
    )
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
        "no_proxy",
        "api_tokens",
        "api_read_tokens",
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

    @field_validator("secret_keys")
    @classmethod
    def _secret_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        # A short key can be guessed offline from one signed link, and then signs any redirect.
        if any(len(key.get_secret_value()) < MIN_SECRET_KEY_LENGTH for key in value):
            raise ValueError(
                f"every key must be at least {MIN_SECRET_KEY_LENGTH} characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return value

    @field_validator("https_proxy")
    @classmethod
    def _https_proxy(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("HTTPS_PROXY must be a proxy URL such as http://proxy.example:3128")
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

    @field_validator("auth_proxy_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        if not value:
            return None
        if not re.fullmatch(r"[A-Za-z0-9-]+", value):
            raise ValueError("AUTH_PROXY_HEADER must be a header name such as X-Forwarded-Email")
        return value

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

    def up_state_dir(self) -> Path:
        """The directory of `mailbeacon up`'s address file (mailbeacon.devstate)."""
        if self.runtime_dir is not None:
            return self.runtime_dir / "mailbeacon"
        return Path("/tmp") / f"mailbeacon-{os.getuid()}"

    def signing_keys(self) -> list[bytes]:
        return [key.get_secret_value().encode() for key in self.secret_keys]

    def database_url_value(self) -> str | None:
        return self.database_url.get_secret_value() if self.database_url else None

    def smtp_auth_users_value(self) -> str | None:
        return self.smtp_auth_users.get_secret_value() if self.smtp_auth_users else None

    def upstream_smtp_value(self) -> str | None:
        return self.upstream_smtp.get_secret_value() if self.upstream_smtp else None

    def aggregator_token(self, *, read_only: bool = False) -> str | None:
        """The token a client of the aggregator sends: API_TOKEN, else the first configured
        token, a read-only one first when ``read_only`` (the operator only reads)."""
        if self.api_token is not None and self.api_token.get_secret_value():
            return self.api_token.get_secret_value()
        lists = (
            (self.api_read_tokens, self.api_tokens) if read_only else (self.api_tokens, self.api_read_tokens)
        )
        for tokens in lists:
            if tokens:
                return tokens[0].get_secret_value()
        return None

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
