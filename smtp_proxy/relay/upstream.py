"""Relaying copies to the real upstream (a relay or an ESP) over a pool of aiosmtplib sessions.

Each copy gets its own SMTP transaction so the upstream answers for each recipient
separately; all copies of one message share one session, and sessions are kept open
and reused across messages (connecting, STARTTLS and AUTH cost more than a message).
Every outcome is reduced to an SMTP code and text the proxy can pass back to the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiosmtplib

from smtp_proxy import metrics
from smtp_proxy.relay.data_stream import send_data
from smtp_proxy.relay.upstream_config import UpstreamConfig
from smtp_proxy.rewrite.mime import Buffer

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class OutgoingCopy:
    recipient: str
    # Rendered just before sending, again on a retry; awaitable when the rendering runs
    # elsewhere (a large message's rewrite, in a worker thread).
    content: Callable[[], Sequence[Buffer] | Awaitable[Sequence[Buffer]]]


async def _rendered(copy: OutgoingCopy) -> Sequence[Buffer]:
    pieces = copy.content()
    return await pieces if inspect.isawaitable(pieces) else pieces


def _unavailable(recipient: str, why: str) -> CopyResult:
    return CopyResult(recipient, 451, f"4.4.1 upstream unavailable: {why}")


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
    except (aiosmtplib.SMTPException, OSError):
        client.close()


@dataclass
class _Lease:
    """The connection one message uses, taken from the pool and given back after."""

    client: aiosmtplib.SMTP | None = None
    reused: bool = False
    down: CopyResult | None = None  # set when connecting failed during this pass


@dataclass
class Upstream:
    config: UpstreamConfig
    _idle: list[tuple[aiosmtplib.SMTP, float]] = field(default_factory=list)
    _open: int = 0

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.config.pool_size)
        self._stop_retrying = asyncio.Event()

    def stop_retrying(self) -> None:
        """Shutting down: copies still refused temporarily are not tried again (they end as failed)."""
        self._stop_retrying.set()

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
            cert_bundle=cfg.ca_file,
        )

    async def _connect(self, lease: _Lease, recipient: str) -> aiosmtplib.SMTP | CopyResult:
        if lease.client is not None and lease.client.is_connected:
            return lease.client
        self._discard(lease)
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and time.monotonic() - since < self.config.idle_seconds:
                lease.client, lease.reused = client, True
                return client
            await self._close(client)
        if lease.down is not None:
            return CopyResult(recipient, lease.down.code, lease.down.text)
        client = self._client()
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                # Now, not lazily at MAIL: which options go upstream depends on its extensions.
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
        except aiosmtplib.SMTPResponseException as exc:
            # A refused greeting or login says nothing final about the message: let the app retry.
            code = exc.code if 400 <= exc.code < 500 else 451
            lease.down = CopyResult(recipient, code, exc.message)
            client.close()
            return lease.down
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            lease.down = _unavailable(recipient, type(exc).__name__)
            client.close()
            return lease.down
        self._open += 1
        metrics.UPSTREAM_CONNECTIONS.set(self._open)
        lease.client, lease.reused = client, False
        return client

    def _discard(self, lease: _Lease) -> None:
        if lease.client is not None:
            lease.client.close()
            self._open -= 1
            metrics.UPSTREAM_CONNECTIONS.set(self._open)
            lease.client = None

    async def _close(self, client: aiosmtplib.SMTP) -> None:
        try:
            if client.is_connected:
                await asyncio.wait_for(client.quit(), 2)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        client.close()
        self._open -= 1
        metrics.UPSTREAM_CONNECTIONS.set(self._open)

    async def _transaction(
        self, client: aiosmtplib.SMTP, sender: str, copy: OutgoingCopy, mail_options: Sequence[str]
    ) -> tuple[CopyResult, bool]:
        """The copy's result, and whether it failed before any of it was handed over."""
        options = [o for o in mail_options if _supported(client, o)]
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        recipient = copy.recipient
        pieces = await _rendered(copy)  # before MAIL, so nothing can fail half-way through DATA
        started = False
        try:
            await client.mail(sender, options=options, encoding=encoding)
            started = True
            await client.rcpt(recipient, encoding=encoding)
            code, text = await send_data(client, pieces, self.config.timeout)
            return CopyResult(recipient, code, text or "2.0.0 OK"), False
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            client.close()
            return _unavailable(recipient, type(exc).__name__), not started
        except aiosmtplib.SMTPResponseException as exc:
            # Sender or recipient refused, or the message refused after DATA.
            await _reset(client)
            return CopyResult(recipient, exc.code, exc.message), False
        except UnicodeEncodeError:
            # RFC 6531: an internationalised address the upstream cannot take is final.
            await _reset(client)
            return CopyResult(recipient, 553, "5.6.7 upstream does not support SMTPUTF8 addresses"), False
        except aiosmtplib.SMTPException as exc:
            log.warning("upstream error for one copy: %s", exc)
            client.close()
            return _unavailable(recipient, type(exc).__name__), False

    async def _attempt(
        self, lease: _Lease, sender: str, copy: OutgoingCopy, mail_options: Sequence[str]
    ) -> CopyResult:
        for _ in range(2):
            client = await self._connect(lease, copy.recipient)
            if isinstance(client, CopyResult):
                return client
            result, before_start = await self._transaction(client, sender, copy, mail_options)
            if client.is_connected:
                return result
            self._discard(lease)
            if not (lease.reused and before_start):
                return result
            # A pooled session the server had closed meanwhile: once more on a fresh one.
        return result

    async def deliver(
        self,
        sender: str,
        copies: Sequence[OutgoingCopy],
        mail_options: Sequence[str] = (),
        on_result: Callable[[int, CopyResult], None] | None = None,
    ) -> list[CopyResult]:
        """Send every copy; one result per copy, in order.

        When some copies were accepted, transient refusals of the others are retried
        for up to ``retry_seconds``: the app can no longer be told to retry the message.
        ``on_result`` hears each copy's result (again after a retry) as soon as it is
        known, so a relay cut short still knows which copies the upstream took.
        """
        try:
            await asyncio.wait_for(self._slots.acquire(), self.config.timeout)
        except TimeoutError:
            return [CopyResult(c.recipient, 451, "4.4.5 upstream connections busy") for c in copies]
        lease = _Lease()
        report = on_result or (lambda index, result: None)
        try:
            results: list[CopyResult] = []
            for index, copy in enumerate(copies):
                results.append(await self._attempt(lease, sender, copy, mail_options))
                report(index, results[index])
            if any(r.accepted for r in results):
                await self._retry(lease, sender, copies, mail_options, results, report)
        except BaseException:
            # Cancelled (a shutdown past its grace) or worse, possibly half-way through
            # DATA: that session must never carry another message.
            self._discard(lease)
            raise
        finally:
            self._release(lease)
            self._slots.release()
        return results

    async def _retry(
        self,
        lease: _Lease,
        sender: str,
        copies: Sequence[OutgoingCopy],
        mail_options: Sequence[str],
        results: list[CopyResult],
        report: Callable[[int, CopyResult], None],
    ) -> None:
        deadline = time.monotonic() + self.config.retry_seconds
        delay = self.config.retry_first_delay
        while True:
            pending = [i for i, result in enumerate(results) if result.transient]
            if not pending or time.monotonic() + delay > deadline:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_retrying.wait(), delay)
            if self._stop_retrying.is_set():
                return
            delay *= 2
            lease.down = None  # the upstream may be back: connect again
            for index in pending:
                metrics.RETRIES.inc()
                results[index] = await self._attempt(lease, sender, copies[index], mail_options)
                report(index, results[index])

    def _release(self, lease: _Lease) -> None:
        client = lease.client
        if client is None:
            return
        if client.is_connected:
            self._idle.append((client, time.monotonic()))
        else:
            self._discard(lease)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._close(client) for client, _ in idle))
