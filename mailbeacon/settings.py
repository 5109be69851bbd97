"""The one settings object per process.

Built once at start-up (``Settings()``) and passed down; no other module reads the
environment. Every variable carries the ``MAILBEACON_`` prefix; ``SITE_URL`` alone is
accepted as a fallback because the original tracking guide used it.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
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
        description="NATS server URL (with JetStream), or a cluster's URLs separated by commas; unset means "
        "the embedded nats-server of `mailbeacon up`",
    )
    # NATS login and TLS as connect options (README "Kubernetes", NATS credentials): unlike
    # credentials in NATS_URL they apply to every server of a cluster, learned ones included.
    nats_user: str | None = Field(
        default=None,
        description="NATS user name, with NATS_PASSWORD (the two go together); like every NATS login "
        "setting it applies to every server of a cluster. One NATS login at a time (user and password, "
        "token, nkey seed or creds): a component given two refuses to start",
    )
    nats_password: SecretStr | None = Field(default=None, description="NATS password of NATS_USER")
    nats_token: SecretStr | None = Field(default=None, description="NATS authentication token")
    nats_nkey_seed_file: Path | None = Field(
        default=None,
        description="File holding the NATS user's nkey seed (SU...): nkey authentication, the server's "
        "nonce signed with it",
    )
    nats_creds_file: Path | None = Field(
        default=None, description="NATS .creds file (user JWT and nkey seed), for NATS in operator/JWT mode"
    )
    nats_ca_file: Path | None = Field(
        default=None,
        description="CA bundle (PEM) the NATS servers' certificates are verified against; unset: the "
        "system's CAs when the server requires TLS",
    )
    nats_tls_cert_file: Path | None = Field(
        default=None,
        description="Client certificate (PEM) presented to NATS servers that verify clients, with "
        "NATS_TLS_KEY_FILE",
    )
    nats_tls_key_file: Path | None = Field(
        default=None, description="Private key (PEM) of NATS_TLS_CERT_FILE"
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="SQL database: sqlite:///path or postgresql://user:password@host/db; unset means SQLite "
        "under DATA_DIR",
    )
    secret_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Click-signing keys, comma-separated, newest first: links are signed with the first and "
        "every key verifies (rotation). Each at least 32 characters, or the component refuses to start "
        "(`python -c 'import secrets; print(secrets.token_urlsafe(32))'`). Unset in `mailbeacon up`: a key "
        "generated and kept under DATA_DIR; `up` refuses a shorter key file there rather than replace it "
        "(links already sent would stop working)",
    )
    upstream_smtp: SecretStr | None = Field(
        default=None,
        description="The relay or ESP the proxy relays to: smtp://[user:password@]host:port[?starttls=true], "
        "or smtps://... for implicit TLS (?verify=false for tests only); unset in `mailbeacon up`: the "
        "development outbox",
    )
    upstream_provider: UpstreamProvider = Field(
        default="generic",
        description="The ESP behind UPSTREAM_SMTP: each copy carries its tracking id in that provider's "
        "metadata, with the provider's own open and click tracking switched off",
    )
    upstream_timeout: float = Field(
        default=30.0, gt=0, description="Seconds the upstream may take per SMTP command"
    )
    default_campaign: str | None = Field(
        default=None,
        description="Campaign (namespace/name, or a name in namespace default) for mail that matches no "
        "other; unset: such mail is relayed untracked",
    )
    auto_create_campaigns: bool = Field(
        default=False, description="An unknown X-Campaign name creates the campaign in namespace default"
    )
    data_dir: Path = Field(
        default=Path(".mailbeacon"),
        description="Local state: the embedded NATS store, SQLite, the outbox, the generated key, and spool/ "
        "(events a stop could not publish)",
    )
    anonymize_ip: bool = Field(
        default=False,
        description="The tracker keeps IPv4 /24 and IPv6 /48 only, in events and providers' raw payloads, "
        "before anything leaves it",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs of proxies whose X-Forwarded-For (and, to the aggregator, X-Forwarded-Proto and "
        "AUTH_PROXY_HEADER) is believed",
    )
    max_webhook_bytes: int = Field(
        default=5 * 1024 * 1024,
        gt=0,
        description="Largest webhook body accepted (413 above); the tracker lowers it to what one "
        "NATS message can carry (the server's max_payload less 16.5 KiB for the event around the record: "
        "1,031,680 bytes on NATS's default 1 MiB)",
    )
    max_json_depth: int = Field(
        default=64,
        ge=8,
        le=MAX_JSON_DEPTH_CEILING,
        description="Deepest nesting of objects and arrays a webhook body (and an SNS notification's "
        "Message) may have; deeper gets 400. The aggregator stores events this deep whatever its own value",
    )

    smtp_listen: str = Field(default="127.0.0.1:2525", description="host:port the SMTP proxy listens on")
    proxy_http_listen: str = Field(
        default="127.0.0.1:8025",
        description="host:port of the proxy's /healthz, /readyz and /metrics (in `mailbeacon up` too: each "
        "component's port serves only its own metrics)",
    )
    tracker_listen: str = Field(
        default="127.0.0.1:8080",
        description="host:port of the tracker (pixel, clicks, unsubscribes, webhooks)",
    )
    aggregator_listen: str = Field(
        default="127.0.0.1:8090", description="host:port of the aggregator's API, pages and /metrics"
    )
    outbox_dir: Path | None = Field(
        default=None,
        description="Where the development outbox keeps relayed mail as .eml files, shown at /outbox/; "
        "`mailbeacon up` without UPSTREAM_SMTP uses DATA_DIR/outbox",
    )
    operator_listen: str = Field(
        default="127.0.0.1:8070",
        description="host:port of the Campaign operator's /healthz, /readyz and /metrics",
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
    # Sidecar injection by annotation, served by the operator (README "Injection by annotation").
    injection_listen: str | None = Field(
        default=None,
        description="host:port of the operator's sidecar-injection webhook (HTTPS), e.g. 0.0.0.0:9443; "
        "unset: no webhook",
    )
    injection_template: dict[str, Any] | None = Field(
        default=None,
        description="The sidecar the webhook adds, as JSON {initContainer, volumes, appEnv}: the Helm "
        "chart renders it from the mailbeacon-sidecar library chart, so it equals what app charts include. "
        "Refused at start when a literal value in it carries a password",
    )
    injection_cert_file: Path | None = Field(
        default=None,
        description="The webhook's certificate (PEM, e.g. cert-manager's tls.crt), re-read when it "
        "changes; unset: the operator makes one at each start",
    )
    injection_key_file: Path | None = Field(
        default=None, description="The private key of INJECTION_CERT_FILE"
    )
    injection_dns_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Names the operator's own webhook certificate is made for: the webhook Service's "
        "DNS names, comma-separated",
    )
    injection_webhook_configuration: str | None = Field(
        default=None,
        description="MutatingWebhookConfiguration whose caBundle the operator sets to the CA of the "
        "certificate it made (without INJECTION_CERT_FILE)",
    )

    stream_max_age_days: float = Field(
        default=30.0, gt=0, description="Days the event stream MAILBEACON_EVENTS keeps events"
    )
    stream_duplicate_window_seconds: float = Field(
        default=600.0,
        gt=0,
        description="JetStream's duplicate window: a repeated Nats-Msg-Id inside it is dropped",
    )
    stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Replicas of the stream, the consumer and the KV buckets: 3 on a NATS cluster; set at "
        "creation, while that many servers are up, and not changeable in place later",
    )
    # Allow JetStream fast-ingest batches on the stream (nats-server 2.14+); once on, every
    # server running the stream must be 2.14 or newer.
    stream_fast_batches: bool = Field(
        default=True,
        description="Allow JetStream fast-ingest batches on the event stream when the server is 2.14+ (the "
        "tracker's pixel and click events then need one acknowledgement per batch). Once allowed, every "
        "NATS server running the stream must be 2.14+: set false (chart: nats.fastBatches) while a "
        "cluster still has older servers",
    )

    ingest_batch_size: int = Field(
        default=5000,
        ge=1,
        le=10000,
        description="The most events one aggregator transaction stores; batches are smaller when traffic is "
        "light, so it costs no latency",
    )
    migrate_on_start: bool = Field(
        default=False, description="The aggregator brings the SQL schema up to date when it starts"
    )
    event_retention_days: float | None = Field(
        default=None,
        gt=0,
        description="Stored events older than this many days are pruned hourly; statistics stay the same. "
        "Keep it longer than STREAM_MAX_AGE_DAYS",
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
    max_message_bytes: int = Field(
        default=50 * 1024 * 1024,
        gt=0,
        description="Largest message the proxy takes, advertised as SMTP SIZE; bigger ones get 552",
    )

    sendgrid_public_key: SecretStr | None = Field(
        default=None,
        description="SendGrid's signed Event Webhook verification key (base64 DER, as the console shows it; "
        "PEM too); SendGrid webhooks are refused (503) without it",
    )
    mailgun_signing_key: SecretStr | None = Field(
        default=None,
        description="Mailgun's webhook signing key; Mailgun webhooks are refused (503) without it",
    )
    ses_topic_arns: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="SNS topic ARNs allowed to post SES events, comma-separated; SES webhooks are refused "
        "(503) without them",
    )
    sns_cert_dir: Path | None = Field(
        default=None,
        description="SNS signing certificates provided ahead of time, named like the last path segment of "
        "SigningCertURL; a certificate not there is fetched once over https from sns.<region>.amazonaws.com",
    )
    postmark_basic_auth: SecretStr | None = Field(
        default=None,
        description="user:password Postmark must send (HTTP basic auth); required when the tracker listens "
        "beyond loopback",
    )
    webhook_token: SecretStr | None = Field(
        default=None,
        description="Token of the generic webhooks (Authorization: Bearer, or X-Webhook-Token); required when "
        "the tracker listens beyond loopback",
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
        description="Pixel/click events kept in memory, waiting for NATS or held for the click burst window "
        "(about 2 KiB each); beyond it they are dropped and counted",
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
        description="Open connections per tracker process (lowered to the open-file limit less 128); "
        "above it a new connection is answered 503 and closed",
    )
    shutdown_drain_seconds: float = Field(
        default=20.0,
        ge=0,
        description="How long a stopping tracker keeps publishing its buffered events, "
        "and a stopping proxy lets its relays in flight finish; what is unpublished then "
        "goes to DATA_DIR/spool for the next start",
    )
    shutdown_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        le=300,
        description="Seconds the tracker, the aggregator and a proxy keep serving after SIGTERM while "
        "their /readyz answers 503, so Service endpoints and load balancers stop sending them work "
        "before they stop listening (the Helm chart sets it); a second signal ends the wait. 0 (the "
        "default, for `mailbeacon up` and Ctrl-C) stops at once",
    )
    click_burst_seconds: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="Clicks on different links of one message this close are a scanner",
    )
    machine_ip_ranges: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra CIDRs whose opens and clicks are always automated (your mail gateway's egress)",
    )

    log_level: str = Field(
        default="INFO",
        description="Log level of every component (the proxy's SMTP session log stays at WARNING below DEBUG)",
    )

    # SMTP proxy: who may relay, TLS, limits (README "SMTP proxy settings").
    smtp_relay_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="CIDRs that may relay without AUTH; everyone else must authenticate",
    )
    smtp_auth_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="CIDRs that may AUTH without STARTTLS",
    )
    smtp_auth_file: Path | None = Field(
        default=None,
        description="File of SMTP AUTH credentials, one username:password per line (# comments); mount it "
        "from a Kubernetes Secret",
    )
    smtp_auth_users: SecretStr | None = Field(
        default=None,
        description="SMTP AUTH credentials as user:password,user2:password2, with or instead of "
        "SMTP_AUTH_FILE",
    )
    smtp_tls_cert_file: Path | None = Field(
        default=None, description="Certificate (PEM) the proxy offers STARTTLS with (TLS 1.2+)"
    )
    smtp_tls_key_file: Path | None = Field(
        default=None, description="Private key (PEM) of SMTP_TLS_CERT_FILE"
    )
    smtp_require_starttls: bool = Field(
        default=False, description="Refuse everything but EHLO, STARTTLS and QUIT before STARTTLS"
    )
    smtp_max_recipients: int = Field(
        default=100, ge=1, description="Recipients per message; more get 452 4.5.3"
    )
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
    smtp_command_timeout: float = Field(
        default=300.0, gt=0, description="Seconds an SMTP client may stay idle before it is disconnected"
    )
    smtp_data_timeout: float = Field(
        default=600.0, gt=0, description="Seconds an SMTP client may take to send its message"
    )
    upstream_pool_size: int = Field(
        default=8, ge=1, description="Upstream SMTP sessions kept open and reused across messages"
    )
    upstream_idle_seconds: float = Field(
        default=30.0, gt=0, description="How long an idle pooled upstream session is kept"
    )
    upstream_retry_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long copies the upstream refused temporarily are retried once another copy of the "
        "message was accepted (waits 1, 2, 4 ... s); copies still refused then are failed",
    )
    upstream_ca_file: Path | None = Field(
        default=None,
        description="CA bundle the upstream's certificate is verified against; unset: the system's",
    )
    ses_configuration_set: str | None = Field(
        default=None,
        description="SES configuration set named on every copy (X-SES-CONFIGURATION-SET) unless the app names "
        "one: one without engagement tracking",
    )
    dkim_private_key_file: Path | None = Field(
        default=None,
        description="Private key to re-sign DKIM-signed mail after rewriting (with DKIM_SELECTOR and "
        "DKIM_DOMAIN); unset: DKIM-signed mail is relayed with its body untouched, untracked",
    )
    dkim_selector: str | None = Field(default=None, description="DKIM selector of DKIM_PRIVATE_KEY_FILE")
    dkim_domain: str | None = Field(
        default=None, description="DKIM signing domain (d=) of DKIM_PRIVATE_KEY_FILE"
    )
    tracking_optout_file: Path | None = Field(
        default=None,
        description="Recipients (ann@example.com) or domains (@example.com) never tracked, one per line, "
        "re-read when it changes; their copies are still relayed and recorded as sent or failed",
    )
    honeypot_links: bool = Field(
        default=True,
        description="Hide one honeypot link per tracked HTML copy: a click on it marks a scanner",
    )
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
        "injection_dns_names",
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

    @field_validator("injection_listen")
    @classmethod
    def _optional_listen(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parse_listen(value)
        return value

    @field_validator("default_campaign")
    @classmethod
    def _default_campaign(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        from mailbeacon.campaigns import CampaignKey

        return str(CampaignKey.parse(value))

    @model_validator(mode="after")
    def _nats_login(self) -> Settings:
        # One way to log in: NATS refuses a CONNECT mixing them, and a half-given pair is a typo.
        methods = [
            name
            for name, given in (
                ("NATS_USER/NATS_PASSWORD", self.nats_user or self.nats_password),
                ("NATS_TOKEN", self.nats_token),
                ("NATS_NKEY_SEED_FILE", self.nats_nkey_seed_file),
                ("NATS_CREDS_FILE", self.nats_creds_file),
            )
            if given
        ]
        if len(methods) > 1:
            raise ValueError(f"set one NATS login, not {' and '.join(methods)}")
        if bool(self.nats_user) != bool(self.nats_password):
            raise ValueError("MAILBEACON_NATS_USER and MAILBEACON_NATS_PASSWORD go together")
        if bool(self.nats_tls_cert_file) != bool(self.nats_tls_key_file):
            raise ValueError("MAILBEACON_NATS_TLS_CERT_FILE and MAILBEACON_NATS_TLS_KEY_FILE go together")
        return self

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
