"""Wiring: the SMTP listener on our own event loop, plus health and metrics over HTTP."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiosmtpd.smtp import SMTP

from mailbeacon.campaign_store import CampaignStore
from mailbeacon.jetstream import EventPublisher
from mailbeacon.settings import Settings, parse_listen
from mailbeacon.web import add_health_routes, serve
from smtp_proxy.handler import ProxyHandler
from smtp_proxy.upstream import Upstream, UpstreamConfig

log = logging.getLogger(__name__)


class ProxyService:
    def __init__(
        self,
        settings: Settings,
        publisher: EventPublisher,
        campaigns: CampaignStore | None,
        *,
        serve_http: bool = True,
    ) -> None:
        upstream_url = settings.upstream_smtp_value()
        if not upstream_url:
            raise ValueError("MAILBEACON_UPSTREAM_SMTP is not set: the proxy needs somewhere to relay to")
        self.settings = settings
        self.upstream = Upstream(UpstreamConfig.from_url(upstream_url, settings.upstream_timeout))
        self.handler = ProxyHandler(settings, self.upstream, publisher, campaigns)
        self._serve_http = serve_http
        self._server: asyncio.Server | None = None
        self._http: web.AppRunner | None = None
        self.port: int | None = None

    def _smtp(self) -> SMTP:
        return SMTP(
            self.handler,
            hostname="mailbeacon",
            ident="mailbeacon proxy",
            data_size_limit=self.settings.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=300,
        )

    async def start(self) -> None:
        host, port = parse_listen(self.settings.smtp_listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._smtp, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        if self._serve_http:
            app = web.Application()
            add_health_routes(app, ready=lambda: self._server is not None and self._server.is_serving())
            self._http = await serve(app, self.settings.proxy_http_listen)
        log.info("SMTP proxy listening on %s:%s, relaying to %r", host, self.port, self.upstream.config)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
