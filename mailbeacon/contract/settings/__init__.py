"""The one settings object per process.

Built once at start-up (``Settings()``) and passed down; no other module reads the
environment. Every variable carries the ``MAILBEACON_`` prefix; ``SITE_URL`` alone is
accepted as a fallback because the original tracking guide used it, and the standard
``XDG_RUNTIME_DIR`` is read for RUNTIME_DIR.

``Settings`` holds the fields every component reads (SITE_URL, SECRET_KEYS, DATA_DIR, ...)
and one group per component: ``settings.nats``, ``.proxy``, ``.tracker``, ``.aggregator``,
``.operator``. The variables stay flat (``MAILBEACON_TRACKER_LISTEN`` sets
``settings.tracker.listen``), and so do keyword arguments (``Settings(tracker_listen=...)``)
and ``model_copy(update=...)``: mailbeacon.contract.settings.environment routes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mailbeacon.contract.settings.aggregator import AggregatorSettings
from mailbeacon.contract.settings.environment import (
    PREFIX,
    FlatEnvironment,
    Variable,
    route,
    settings_variables,
)
from mailbeacon.contract.settings.nats import NatsSettings
from mailbeacon.contract.settings.operator import OperatorSettings
from mailbeacon.contract.settings.proxy import ProxySettings
from mailbeacon.contract.settings.tracker import TrackerSettings
from mailbeacon.contract.settings.values import (
    MAX_JSON_DEPTH_CEILING,
    MIN_SECRET_KEY_LENGTH,
    Networks,
    SecretList,
    UpstreamProvider,
    parse_listen,
)

__all__ = [
    "MAX_JSON_DEPTH_CEILING",
    "MIN_SECRET_KEY_LENGTH",
    "AggregatorSettings",
    "NatsSettings",
    "OperatorSettings",
    "ProxySettings",
    "Settings",
    "TrackerSettings",
    "UpstreamProvider",
    "Variable",
    "invalid_settings",
    "parse_listen",
]

Listener = Literal["smtp", "proxy_http", "tracker", "aggregator", "operator"]


class Settings(BaseSettings):
    """The settings of one process: the fields several components read, then one group per
    component (``settings.tracker``...). Built once at start and passed down."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        case_sensitive=False,
        extra="ignore",
        populate_by_name=True,
    )

    site_url: str = Field(
        default="http://127.0.0.1:8080",
        validation_alias=AliasChoices("MAILBEACON_SITE_URL", "SITE_URL"),
        description="Public base URL of the tracker, used in pixel, click and unsubscribe links",
    )
    secret_keys: SecretList = Field(
        default_factory=list,
        description="Click-signing keys, comma-separated, newest first: links are signed with the first and every key verifies (rotation). Each at least 32 characters, or the component refuses to start (`python -c 'import secrets; print(secrets.token_urlsafe(32))'`). Unset in `mailbeacon up`: a key generated and kept under DATA_DIR; `up` refuses a shorter key file there rather than replace it (links already sent would stop working)",
    )
    data_dir: Path = Field(
        default=Path(".mailbeacon"),
        description="Local state: the embedded NATS store, SQLite, the outbox, the generated key, and spool/ (events a stop could not publish)",
    )
    runtime_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("MAILBEACON_RUNTIME_DIR", "XDG_RUNTIME_DIR"),
        description="Per-user directory whose mailbeacon/up.json tells the command line where a "
        "running `mailbeacon up` is; unset means XDG_RUNTIME_DIR, else /tmp/mailbeacon-<uid>",
    )
    trusted_proxies: Networks = Field(
        default_factory=list,
        description="CIDRs of proxies whose X-Forwarded-For (and, to the aggregator, X-Forwarded-Proto and AUTH_PROXY_HEADER) is believed",
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
    log_level: str = Field(
        default="INFO",
        description="Log level of every component (the proxy's SMTP session log stays at WARNING below DEBUG)",
    )

    nats: NatsSettings = Field(default_factory=NatsSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    tracker: TrackerSettings = Field(default_factory=TrackerSettings)
    aggregator: AggregatorSettings = Field(default_factory=AggregatorSettings)
    operator: OperatorSettings = Field(default_factory=OperatorSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments, then the environment, read flat. No .env file or secrets
        # directory is configured, so their sources would add nothing.
        return init_settings, FlatEnvironment(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _flat_keywords(cls, data: Any) -> Any:
        return route(cls, data) if isinstance(data, Mapping) else data

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

    @field_validator("site_url")
    @classmethod
    def _site_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("SITE_URL must be an absolute http(s) URL")
        return value.rstrip("/")

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with ``update`` applied, given flat (``{"nats_url": ...}``, as the runner
        does) or nested (``{"nats": {"url": ...}}``); like pydantic's, without validation."""
        if not update:
            return super().model_copy(deep=deep)
        routed = route(type(self), update)
        for name, value in routed.items():
            if name in type(self).model_fields and isinstance(value, Mapping):
                routed[name] = getattr(self, name).model_copy(update=value, deep=deep)
        return super().model_copy(update=routed, deep=deep)

    @classmethod
    def variables(cls) -> tuple[Variable, ...]:
        """Every setting with its environment variables and description, shared ones first,
        then each group's: what the configuration docs and the chart's checks walk."""
        return settings_variables(cls)

    def up_state_dir(self) -> Path:
        """The directory of `mailbeacon up`'s address file (mailbeacon.app.devstate)."""
        if self.runtime_dir is not None:
            return self.runtime_dir / "mailbeacon"
        return Path("/tmp") / f"mailbeacon-{os.getuid()}"

    def signing_keys(self) -> list[bytes]:
        return [key.get_secret_value().encode() for key in self.secret_keys]

    def _listen_address(self, which: Listener) -> str:
        return {
            "smtp": self.proxy.smtp_listen,
            "proxy_http": self.proxy.http_listen,
            "tracker": self.tracker.listen,
            "aggregator": self.aggregator.listen,
            "operator": self.operator.listen,
        }[which]

    def listen(self, which: Listener) -> tuple[str, int]:
        return parse_listen(self._listen_address(which))

    def listens_on_loopback(self, which: Listener) -> bool:
        """Whether a component's listen address is reachable from this machine only."""
        from mailbeacon.contract.netaddr import is_loopback_host

        return is_loopback_host(self.listen(which)[0])


def invalid_settings(exc: ValidationError) -> str:
    """A refused configuration, one line per setting, naming its variable and never its value
    (the value may be a secret)."""
    groups = {variable.group for variable in Settings.variables() if variable.group}
    names = {
        (variable.group, key): variable.names[0]
        for variable in Settings.variables()
        for key in (variable.field, *variable.names)
    }
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = (loc[0], loc[1]) if len(loc) > 1 and loc[0] in groups else (None, loc[0]) if loc else None
        # A check across fields (the NATS login) has no one variable to name.
        name = names.get(key, "configuration") if key else "configuration"
        lines.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)
