"""Where and how the proxy relays: ``UPSTREAM_SMTP`` and the pool, timeout and retry settings."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit


class InvalidUpstream(ValueError):
    pass


@dataclass(frozen=True)
class UpstreamConfig:
    host: str
    port: int
    implicit_tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0
    validate_certs: bool = True
    ca_file: str | None = None
    pool_size: int = 8
    idle_seconds: float = 30.0
    retry_seconds: float = 30.0
    retry_first_delay: float = 1.0

    @classmethod
    def from_url(cls, url: str, timeout: float = 30.0, **options: object) -> UpstreamConfig:
        """``smtp://[user:password@]host:port[?starttls=true]`` or ``smtps://...`` (implicit TLS)."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise InvalidUpstream("UPSTREAM_SMTP must look like smtp://host:port or smtps://host:port")
        query = {key.lower(): values[-1].lower() for key, values in parse_qs(parts.query).items()}
        implicit = parts.scheme == "smtps"
        return cls(
            host=parts.hostname,
            port=parts.port or (465 if implicit else 25),
            implicit_tls=implicit,
            starttls=query.get("starttls") in ("true", "1", "yes"),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            timeout=timeout,
            validate_certs=query.get("verify", "true") not in ("false", "0", "no"),
            **options,  # type: ignore[arg-type]
        )

    def __repr__(self) -> str:  # never print the password
        return f"UpstreamConfig({self.host}:{self.port}, tls={self.implicit_tls}, starttls={self.starttls})"
