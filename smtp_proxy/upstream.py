"""Relaying copies to the real upstream (a relay or an ESP) with aiosmtplib.

Each copy gets its own SMTP transaction so the upstream answers for each recipient
separately; all copies of one message share one session. Every outcome is reduced to
an SMTP code and text the proxy can pass back to the app.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

log = logging.getLogger(__name__)


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

    @classmethod
    def from_url(cls, url: str, timeout: float = 30.0) -> UpstreamConfig:
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
        )

    def __repr__(self) -> str:  # never print the password
        return f"UpstreamConfig({self.host}:{self.port}, tls={self.implicit_tls}, starttls={self.starttls})"


@dataclass(frozen=True)
class CopyResult:
    recipient: str
    code: int
    text: str

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


def _unavailable(recipient: str, why: str) -> CopyResult:
    return CopyResult(recipient, 451, f"4.4.1 upstream unavailable: {why}")


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config

    def _client(self) -> aiosmtplib.SMTP:
        cfg = self.config
        return aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            use_tls=cfg.implicit_tls,
            start_tls=cfg.starttls,  # never opportunistic: TLS is on when asked for
            username=cfg.username,
            password=cfg.password,
            timeout=cfg.timeout,
            validate_certs=cfg.validate_certs,
        )

    async def _connect(self) -> aiosmtplib.SMTP:
        client = self._client()
        await client.connect()
        return client

    async def deliver(
        self, sender: str, copies: Sequence[tuple[str, bytes]], mail_options: Sequence[str] = ()
    ) -> list[CopyResult]:
        """Send each ``(recipient, content)`` copy; one result per copy, in order."""
        results: list[CopyResult] = []
        client: aiosmtplib.SMTP | None = None
        try:
            for recipient, content in copies:
                if client is None:
                    try:
                        client = await self._connect()
                    except aiosmtplib.SMTPResponseException as exc:
                        results.append(CopyResult(recipient, _as_transient(exc.code), exc.message))
                        continue
                    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                        results.append(_unavailable(recipient, type(exc).__name__))
                        continue
                result, keep = await self._send_one(client, sender, recipient, content, mail_options)
                results.append(result)
                if not keep:
                    await _close(client)
                    client = None
        finally:
            if client is not None:
                await _close(client, polite=True)
        return results

    async def _send_one(
        self,
        client: aiosmtplib.SMTP,
        sender: str,
        recipient: str,
        content: bytes,
        mail_options: Sequence[str],
    ) -> tuple[CopyResult, bool]:
        """The copy's result, and whether the session is still usable."""
        options = [o for o in mail_options if _supported(client, o)]
        try:
            _, text = await client.sendmail(sender, [recipient], content, mail_options=options)
            return CopyResult(recipient, 250, text or "2.0.0 OK"), True
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0]
            await _reset(client)
            return CopyResult(recipient, refused.code, refused.message), True
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            return _unavailable(recipient, type(exc).__name__), False
        except aiosmtplib.SMTPResponseException as exc:
            await _reset(client)
            return CopyResult(recipient, exc.code, exc.message), client.is_connected
        except aiosmtplib.SMTPException as exc:
            log.warning("upstream error for one copy: %s", exc)
            return _unavailable(recipient, type(exc).__name__), False


def _as_transient(code: int) -> int:
    # A greeting refusal says nothing final about the message: let the app retry.
    return code if 400 <= code < 500 else 451


def _supported(client: aiosmtplib.SMTP, option: str) -> bool:
    name = option.split("=", 1)[0].upper()
    if name == "BODY":
        return client.supports_extension("8bitmime")
    if name == "SMTPUTF8":
        return client.supports_extension("smtputf8")
    return False  # SIZE, RET, ENVID...: ours to check, not worth forwarding blindly


async def _reset(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await client.rset()
    except aiosmtplib.SMTPException:
        pass


async def _close(client: aiosmtplib.SMTP, polite: bool = False) -> None:
    try:
        if polite and client.is_connected:
            await client.quit()
            return
    except (aiosmtplib.SMTPException, OSError):
        pass
    client.close()
