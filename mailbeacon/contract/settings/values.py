"""Field types the settings groups share: listen addresses, comma-separated lists, networks.

Each type carries its own parsing and check, so a field declares what it is once
(``listen: Listen``) instead of being listed in a validator of its class.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, SecretStr
from pydantic_settings import NoDecode

UpstreamProvider = Literal["generic", "sendgrid", "mailgun", "ses", "postmark"]
# Click-signing keys shorter than this are refused at start (docs/configuration.md "Configuration").
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


def _listen(value: str) -> str:
    parse_listen(value)  # fail at start-up, not at bind time
    return value


def _optional_listen(value: str | None) -> str | None:
    if value in (None, ""):
        return None
    return _listen(value)


def _split_list(value: object) -> object:
    # Lists arrive from the environment as comma-separated strings.
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _networks(value: list[str]) -> list[str]:
    for cidr in value:
        ipaddress.ip_network(cidr, strict=False)  # fail at start-up on a typo
    return value


Listen = Annotated[str, AfterValidator(_listen)]
OptionalListen = Annotated[str | None, AfterValidator(_optional_listen)]
# NoDecode: the environment gives "a, b", not JSON.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]
SecretList = Annotated[list[SecretStr], NoDecode, BeforeValidator(_split_list)]
Networks = Annotated[list[str], NoDecode, BeforeValidator(_split_list), AfterValidator(_networks)]


class SettingsGroup(BaseModel):
    """One component's part of the settings. A field whose environment variable is not
    MAILBEACON_<field name> names it in ``validation_alias`` (mailbeacon.contract.settings.environment)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
