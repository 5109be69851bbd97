"""The SMTP listener: aiosmtpd with the proxy's relay policy, TLS and timeouts.

aiosmtpd gives one idle timer per connection, restarted by each command, which would
also cut off a long DATA transfer or the wait for the upstream. Here DATA gets its own
budget and the relay (bounded by its own upstream timeouts and retry window) none.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, syntax

from smtp_proxy import metrics
from smtp_proxy.session.auth import Networks
from smtp_proxy.session.data_reader import DataReader
from smtp_proxy.session.limits import TOO_MANY_SESSIONS, AuthTarpit, SessionCap
from smtp_proxy.session.session_log import auth_exchange

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024
# The longest line (without its CRLF) aiosmtpd accepts: RFC 5321's 998 octets plus slack.
_MAX_LINE = 999


@dataclass(frozen=True)
class ListenerPolicy:
    auth_networks: Networks  # may AUTH without TLS
    command_timeout: float
    data_timeout: float
    auth_tarpit: AuthTarpit = field(default_factory=AuthTarpit)


_refusals_logged_at = -60.0


class ProxySMTP(SMTP):
    def __init__(
        self, handler: Any, *, policy: ListenerPolicy, sessions: SessionCap | None = None, **kwargs: Any
    ) -> None:
        super().__init__(handler, timeout=policy.command_timeout, **kwargs)
        self.policy = policy
        self._auth_tls_default = kwargs.get("auth_require_tls", True)
        # aiosmtpd offers AUTH even with nobody to log in as; a client that takes the offer
        # would fail with 535 and never send, so without credentials EHLO does not offer it.
        self.offers_auth = kwargs.get("authenticator") is not None
        # Cleared between a message's last line and our reply to it.
        self.not_answering = asyncio.Event()
        self.not_answering.set()
        self._sessions = sessions
        self._counted: bool | None = None  # None until the connection is made (STARTTLS makes it twice)
        self._auth_failures = 0
        self._credentials_refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._counted is None:
            self._counted = self._sessions is None or self._sessions.enter()
        super().connection_made(transport)
        if self.session is not None and self.session.peer in self.policy.auth_networks:
            # A trusted network (loopback, the pod) may send credentials without STARTTLS.
            self._auth_require_tls = False
        else:
            self._auth_require_tls = self._auth_tls_default

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted and self._sessions is not None:
            self._sessions.leave()
        self._counted = False
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._counted:
            await super()._handle_client()
            return
        # Over SMTP_MAX_CONNECTIONS: told so instead of greeted (RFC 5321 3.1), and let go.
        metrics.REFUSED.labels("too_many_connections").inc()
        global _refusals_logged_at
        if time.monotonic() - _refusals_logged_at >= 60.0:  # one line a minute, not one per client
            _refusals_logged_at = time.monotonic()
            limit = self._sessions.limit if self._sessions is not None else 0
            log.warning("SMTP sessions at their limit (%d): refusing new clients with 421", limit)
        await self.push(TOO_MANY_SESSIONS)
        if self.transport is not None:
            self.transport.close()

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        result = super()._authenticate(mechanism, auth_data)
        if result.success:
            return result
        # Refused credentials are answered by smtp_AUTH below, after the tarpit's delay.
        self._credentials_refused = True
        return AuthResult(success=False, handled=True)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        self._credentials_refused = False
        with auth_exchange():  # nothing aiosmtpd logs meanwhile keeps its text
            await super().smtp_AUTH(arg)
        if not self._credentials_refused:
            return  # accepted at once, or a malformed exchange aiosmtpd answered itself
        self._auth_failures += 1
        tarpit = self.policy.auth_tarpit
        # A guesser waits for every wrong answer and gets few per session.
        await asyncio.sleep(tarpit.delay(self._auth_failures))
        await self.push(tarpit.answer(self._auth_failures))
        if tarpit.ends_session(self._auth_failures):
            metrics.AUTH.labels("too_many_failures").inc()
            if self.transport is not None:
                self.transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, receiving into one buffer.

        aiosmtpd keeps every line as its own bytearray and joins them at the end: close to
        three times the message in memory. Here lines are appended to a single buffer that
        becomes the message itself, and DATA gets its own time budget.
        """
        self._reset_timeout(self.policy.data_timeout)
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # The line limit doubles as the reader's buffer bound, which would stop the socket
        # every 2 KB; DATA is read in large chunks and checks line lengths itself.
        line_limit = self._reader._limit  # type: ignore[attr-defined]
        self._reader._limit = _READ_SIZE  # type: ignore[attr-defined]
        try:
            content, too_long, too_much = await self._receive()
        finally:
            self._reader._limit = line_limit  # type: ignore[attr-defined]
        if content is None:
            return  # the connection went away
        if too_long or too_much:
            # RFC 5321 4.2.5: answer only once the whole message has been read.
            await self.push(
                "500 Line too long (see RFC5321 4.5.3.1.6)" if too_long else "552 Error: Too much mail data"
            )
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = content  # type: ignore[assignment]
        self.not_answering.clear()
        try:
            try:
                status = await self._call_handler_hook("DATA")
            finally:
                # Even when the hook failed (answered 451 by handle_exception), the
                # transaction is over: the client may start the next one with MAIL.
                self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
        finally:
            self.not_answering.set()

    async def _receive(self) -> tuple[bytearray | None, bool, bool]:
        """Read DATA up to the lone dot, in socket-sized chunks rather than line by line."""
        content = bytearray()
        data = DataReader(_MAX_LINE, self.data_size_limit or 0)
        while self.transport is not None:
            chunk = await self._reader.read(_READ_SIZE)
            if not chunk:
                return None, data.too_long, data.too_much
            lines, after = data.feed(chunk)
            if data.refused:
                content = bytearray()  # it will be refused: free the memory now
            else:
                content += lines
            if after is not None:
                if after:
                    # Sent ahead of our reply (pipelining): leave it for the command loop.
                    self._reader._buffer[:0] = after  # type: ignore[attr-defined]
                return content, data.too_long, data.too_much
        return None, data.too_long, data.too_much

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command != "DATA":
            return await super()._call_handler_hook(command, *args)
        # The relay is bounded by the upstream timeouts and retry window, not the idle timer.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            return await super()._call_handler_hook(command, *args)
        finally:
            if self.transport is not None:
                self._reset_timeout()


def server_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context
