"""The SMTP listener: aiosmtpd with the proxy's relay policy, TLS and timeouts.

aiosmtpd gives one idle timer per connection, restarted by each command, which would
also cut off a long DATA transfer or the wait for the upstream. Here DATA gets its own
budget and the relay (bounded by its own upstream timeouts and retry window) none.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from smtp_proxy.auth import Networks


@dataclass(frozen=True)
class ListenerPolicy:
    auth_networks: Networks  # may AUTH without TLS
    command_timeout: float
    data_timeout: float


class ProxySMTP(SMTP):
    def __init__(self, handler: Any, *, policy: ListenerPolicy, **kwargs: Any) -> None:
        super().__init__(handler, timeout=policy.command_timeout, **kwargs)
        self.policy = policy
        self._auth_tls_default = kwargs.get("auth_require_tls", True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.session is not None and self.session.peer in self.policy.auth_networks:
            # A trusted network (loopback, the pod) may send credentials without STARTTLS.
            self._auth_require_tls = False
        else:
            self._auth_require_tls = self._auth_tls_default

    async def smtp_DATA(self, arg: str) -> None:
        self._reset_timeout(self.policy.data_timeout)
        await super().smtp_DATA(arg)

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
