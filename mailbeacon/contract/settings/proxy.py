"""SMTP proxy settings: who may relay, TLS, limits, the upstream, DKIM (docs/configuration.md "SMTP proxy")."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from mailbeacon.contract.settings.values import Listen, Networks, SettingsGroup, UpstreamProvider


class ProxySettings(SettingsGroup):
    """The SMTP proxy: its listeners, the upstream it relays to, who may relay, its limits,
    and how it rewrites and signs messages."""

    smtp_listen: Listen = Field(default="127.0.0.1:2525", description="host:port the SMTP proxy listens on")
    http_listen: Listen = Field(
        default="127.0.0.1:8025",
        validation_alias="MAILBEACON_PROXY_HTTP_LISTEN",
        description="host:port of the proxy's /healthz, /readyz and /metrics (in `mailbeacon up` too: each component's port serves only its own metrics)",
    )
    upstream_smtp: SecretStr | None = Field(
        default=None,
        description="The relay or ESP the proxy relays to: smtp://[user:password@]host:port[?starttls=true], or smtps://... for implicit TLS (?verify=false for tests only); unset in `mailbeacon up`: the development outbox",
    )
    upstream_provider: UpstreamProvider = Field(
        default="generic",
        description="The ESP behind UPSTREAM_SMTP: each copy carries its tracking id in that provider's metadata, with the provider's own open and click tracking switched off",
    )
    upstream_timeout: float = Field(
        default=30.0, gt=0, description="Seconds the upstream may take per SMTP command"
    )
    default_campaign: str | None = Field(
        default=None,
        description="Campaign (namespace/name, or a name in namespace default) for mail that matches no other; unset: such mail is relayed untracked",
    )
    auto_create_campaigns: bool = Field(
        default=False, description="An unknown X-Campaign name creates the campaign in namespace default"
    )
    max_message_bytes: int = Field(
        default=50 * 1024 * 1024,
        gt=0,
        description="Largest message the proxy takes, advertised as SMTP SIZE; bigger ones get 552",
    )

    # Who may relay, TLS, limits.
    smtp_relay_networks: Networks = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="CIDRs that may relay without AUTH; everyone else must authenticate",
    )
    smtp_auth_networks: Networks = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="CIDRs that may AUTH without STARTTLS",
    )
    smtp_auth_file: Path | None = Field(
        default=None,
        description="File of SMTP AUTH credentials, one username:password per line (# comments); mount it from a Kubernetes Secret",
    )
    smtp_auth_users: SecretStr | None = Field(
        default=None,
        description="SMTP AUTH credentials as user:password,user2:password2, with or instead of SMTP_AUTH_FILE",
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
        description="How long copies the upstream refused temporarily are retried once another copy of the message was accepted (waits 1, 2, 4 ... s); copies still refused then are failed",
    )
    upstream_ca_file: Path | None = Field(
        default=None,
        description="CA bundle the upstream's certificate is verified against; unset: the system's",
    )
    ses_configuration_set: str | None = Field(
        default=None,
        description="SES configuration set named on every copy (X-SES-CONFIGURATION-SET) unless the app names one: one without engagement tracking",
    )
    dkim_private_key_file: Path | None = Field(
        default=None,
        description="Private key to re-sign DKIM-signed mail after rewriting (with DKIM_SELECTOR and DKIM_DOMAIN); unset: DKIM-signed mail is relayed with its body untouched, untracked",
    )
    dkim_selector: str | None = Field(default=None, description="DKIM selector of DKIM_PRIVATE_KEY_FILE")
    dkim_domain: str | None = Field(
        default=None, description="DKIM signing domain (d=) of DKIM_PRIVATE_KEY_FILE"
    )
    tracking_optout_file: Path | None = Field(
        default=None,
        description="Recipients (ann@example.com) or domains (@example.com) never tracked, one per line, re-read when it changes; their copies are still relayed and recorded as sent or failed",
    )
    honeypot_links: bool = Field(
        default=True,
        description="Hide one honeypot link per tracked HTML copy: a click on it marks a scanner",
    )
    honour_unsubscribes: bool = Field(
        default=True,
        description="the proxy does not relay a campaign's mail to recipients who unsubscribed or complained",
    )

    @field_validator("default_campaign")
    @classmethod
    def _default_campaign(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        from mailbeacon.contract.campaigns import CampaignKey

        return str(CampaignKey.parse(value))

    def smtp_auth_users_value(self) -> str | None:
        return self.smtp_auth_users.get_secret_value() if self.smtp_auth_users else None

    def upstream_smtp_value(self) -> str | None:
        return self.upstream_smtp.get_secret_value() if self.upstream_smtp else None
