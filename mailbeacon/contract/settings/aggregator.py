"""Aggregator settings: its database, ingest, retention, and who may read its API
(docs/aggregator.md "Authentication"), with where its clients find it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from mailbeacon.contract.settings.values import Listen, SecretList, SettingsGroup, parse_listen


class AggregatorSettings(SettingsGroup):
    """The aggregator: where it listens, its SQL database, how it ingests and prunes events,
    and its API's credentials; also how the CLI and the operator reach it (AGGREGATOR_URL,
    API_TOKEN)."""

    listen: Listen = Field(
        default="127.0.0.1:8090",
        validation_alias="MAILBEACON_AGGREGATOR_LISTEN",
        description="host:port of the aggregator's API, pages and /metrics",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="SQL database: sqlite:///path or postgresql://user:password@host/db; unset means SQLite under DATA_DIR",
    )
    outbox_dir: Path | None = Field(
        default=None,
        description="Where the development outbox keeps relayed mail as .eml files, shown at /outbox/; `mailbeacon up` without UPSTREAM_SMTP uses DATA_DIR/outbox",
    )
    max_streams: int = Field(
        default=100,
        ge=1,
        le=10000,
        validation_alias="MAILBEACON_AGGREGATOR_MAX_STREAMS",
        description="Live statistics streams (Server-Sent Events) one aggregator process serves at "
        "once; more get 503 with Retry-After",
    )
    url: str | None = Field(
        default=None,
        validation_alias="MAILBEACON_AGGREGATOR_URL",
        description="Base URL the operator reads campaign statistics from; unset means AGGREGATOR_LISTEN",
    )
    # Aggregator API and pages: who may read and change (docs/aggregator.md "Authentication").
    api_tokens: SecretList = Field(
        default_factory=list,
        description="Bearer tokens with full access to the aggregator's API and pages, comma-separated "
        "(at least 24 characters each); enforced also on loopback once set",
    )
    api_read_tokens: SecretList = Field(
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

    ingest_batch_size: int = Field(
        default=5000,
        ge=1,
        le=10000,
        description="The most events one aggregator transaction stores; batches are smaller when traffic is light, so it costs no latency",
    )
    migrate_on_start: bool = Field(
        default=False, description="The aggregator brings the SQL schema up to date when it starts"
    )
    event_retention_days: float | None = Field(
        default=None,
        gt=0,
        description="Stored events older than this many days are pruned hourly; statistics stay the same. Keep it longer than STREAM_MAX_AGE_DAYS",
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

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
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

    def database_url_value(self) -> str | None:
        return self.database_url.get_secret_value() if self.database_url else None

    def base_url(self) -> str:
        """Where the aggregator's API answers: AGGREGATOR_URL, else its listen address."""
        if self.url:
            return self.url.rstrip("/")
        host, port = parse_listen(self.listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def client_token(self, *, read_only: bool = False) -> str | None:
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
