"""SMTP proxy settings: who may relay, TLS, limits, the upstream, DKIM (README "SMTP proxy settings")."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from mailbeacon.settings.values import Listen, Networks, SettingsGroup, UpstreamProvider


class ProxySettings(SettingsGroup):
    """The SMTP proxy: its listeners, the upstream it relays to, who may relay, its limits,
    and how it rewrites and signs messages."""

    smtp_listen: Listen = "127.0.0.1:2525"
    http_listen: Listen = Field(default="127.0.0.1:8025", validation_alias="MAILBEACON_PROXY_HTTP_LISTEN")
    upstream_smtp: SecretStr | None = Field(
        default=None, description="smtp://[user:password@]host:port[?starttls=true] or smtps://..."
    )
    upstream_provider: UpstreamProvider = "generic"
    upstream_timeout: float = Field(default=30.0, gt=0)
    default_campaign: str | None = None
    auto_create_campaigns: bool = Field(
        default=False, description="An unknown X-Campaign name creates the campaign in namespace default"
    )
    max_message_bytes: int = Field(default=50 * 1024 * 1024, gt=0)

    # Who may relay, TLS, limits.
    smtp_relay_networks: Networks = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="CIDRs that may relay without AUTH; everyone else must authenticate",
    )
    smtp_auth_networks: Networks = Field(
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

    @field_validator("default_campaign")
    @classmethod
    def _default_campaign(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        from mailbeacon.campaigns import CampaignKey

        return str(CampaignKey.parse(value))

    def smtp_auth_users_value(self) -> str | None:
        return self.smtp_auth_users.get_secret_value() if self.smtp_auth_users else None

    def upstream_smtp_value(self) -> str | None:
        return self.upstream_smtp.get_secret_value() if self.upstream_smtp else None
