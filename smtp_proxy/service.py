"""Wiring: the SMTP listener on our own event loop, plus health and metrics over HTTP."""

from __future__ import annotations

import asyncio
import logging
import weakref

from aiohttp import web

from mailbeacon.bus.campaign_store import CampaignStore
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.bus.suppressions import SuppressionList
from mailbeacon.contract.campaigns import CampaignKey
from mailbeacon.contract.settings import Settings, parse_listen
from mailbeacon.web.server import add_health_routes, bound_port, serve
from smtp_proxy import metrics
from smtp_proxy.handler import ProxyHandler, ProxyOptions
from smtp_proxy.relay.upstream import Upstream
from smtp_proxy.relay.upstream_config import UpstreamConfig
from smtp_proxy.rewrite.copies import CopyOptions
from smtp_proxy.rewrite.dkim_sign import DkimSigner
from smtp_proxy.rewrite.optout import RecipientOptOuts
from smtp_proxy.session.auth import Authenticator, Credentials, Networks
from smtp_proxy.session.limits import AuthTarpit, SessionCap
from smtp_proxy.session.server import ListenerPolicy, ProxySMTP, server_tls_context
from smtp_proxy.session.session_log import configure_session_log

log = logging.getLogger(__name__)


def upstream_config(settings: Settings, url: str) -> UpstreamConfig:
    proxy = settings.proxy
    return UpstreamConfig.from_url(
        url,
        proxy.upstream_timeout,
        ca_file=str(proxy.upstream_ca_file) if proxy.upstream_ca_file else None,
        pool_size=proxy.upstream_pool_size,
        idle_seconds=proxy.upstream_idle_seconds,
        retry_seconds=proxy.upstream_retry_seconds,
    )


def proxy_options(settings: Settings) -> ProxyOptions:
    proxy = settings.proxy
    return ProxyOptions(
        copies=CopyOptions(
            site_url=settings.site_url,
            keys=settings.signing_keys(),
            provider=proxy.upstream_provider,
            ses_configuration_set=proxy.ses_configuration_set,
            honeypot=proxy.honeypot_links,
            dkim_signer=dkim_signer(settings),
        ),
        relay_networks=Networks(proxy.smtp_relay_networks),
        max_recipients=proxy.smtp_max_recipients,
        default_campaign=CampaignKey.parse(proxy.default_campaign) if proxy.default_campaign else None,
        auto_create_campaigns=proxy.auto_create_campaigns,
    )


def dkim_signer(settings: Settings) -> DkimSigner | None:
    proxy = settings.proxy
    if proxy.dkim_private_key_file is None:
        return None
    return DkimSigner.from_file(
        proxy.dkim_private_key_file, proxy.dkim_selector or "", proxy.dkim_domain or ""
    )


class ProxyService:
    def __init__(
        self,
        settings: Settings,
        publisher: EventPublisher,
        campaigns: CampaignStore | None,
        *,
        serve_http: bool = True,
        suppressions: SuppressionList | None = None,
    ) -> None:
        """``suppressions``: the mirror of the suppression bucket, started and stopped with the
        service; ignored (and never watched) when HONOUR_UNSUBSCRIBES is off."""
        proxy = settings.proxy
        upstream_url = proxy.upstream_smtp_value()
        if not upstream_url:
            raise ValueError("MAILBEACON_UPSTREAM_SMTP is not set: the proxy needs somewhere to relay to")
        self.settings = settings
        configure_session_log(settings.log_level)
        self.suppressions = suppressions if proxy.honour_unsubscribes else None
        self.upstream = Upstream(upstream_config(settings, upstream_url))
        metrics.watch_publisher(publisher)
        self.handler = ProxyHandler(
            proxy_options(settings),
            self.upstream,
            publisher,
            campaigns,
            optouts=RecipientOptOuts(proxy.tracking_optout_file),
            suppressions=self.suppressions,
        )
        self.credentials = Credentials.load(proxy.smtp_auth_file, proxy.smtp_auth_users_value())
        self.tls = None
        if proxy.smtp_tls_cert_file and proxy.smtp_tls_key_file:
            self.tls = server_tls_context(proxy.smtp_tls_cert_file, proxy.smtp_tls_key_file)
        elif proxy.smtp_tls_cert_file or proxy.smtp_tls_key_file:
            raise ValueError("STARTTLS needs both MAILBEACON_SMTP_TLS_CERT_FILE and _KEY_FILE")
        self.policy = ListenerPolicy(
            auth_networks=Networks(proxy.smtp_auth_networks),
            command_timeout=proxy.smtp_command_timeout,
            data_timeout=proxy.smtp_data_timeout,
            auth_tarpit=AuthTarpit(proxy.smtp_auth_failure_delay, proxy.smtp_auth_max_failures),
        )
        self.session_cap = SessionCap(proxy.smtp_max_connections)
        self._serve_http = serve_http
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[ProxySMTP] = weakref.WeakSet()
        self._http: web.AppRunner | None = None
        self.port: int | None = None
        self.stopping = False
        self.http_port: int | None = None  # health and metrics, when served

    def _smtp(self) -> ProxySMTP:
        session = ProxySMTP(
            self.handler,
            policy=self.policy,
            sessions=self.session_cap,
            hostname="mailbeacon",
            ident="mailbeacon proxy",
            data_size_limit=self.settings.proxy.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=self.tls,
            require_starttls=self.settings.proxy.smtp_require_starttls,
            authenticator=Authenticator(self.credentials) if self.credentials else None,
            auth_require_tls=True,
        )
        self._sessions.add(session)
        return session

    async def start(self) -> None:
        if self.suppressions is not None:
            # Loaded before the first message is taken: a restarted proxy never relays to a
            # recipient who unsubscribed while it was down.
            await self.suppressions.start()
            log.info("honouring %d unsubscribes and complaints", len(self.suppressions))
        host, port = parse_listen(self.settings.proxy.smtp_listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._smtp, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        if self._serve_http:
            app = web.Application()
            add_health_routes(app, ready=self._ready, registry=metrics.REGISTRY)
            self._http = await serve(app, self.settings.proxy.http_listen)
            self.http_port = bound_port(self._http)
        log.info(
            "SMTP proxy listening on %s:%s (STARTTLS %s, AUTH %s), relaying to %r",
            host,
            self.port,
            "on" if self.tls else "off",
            "on" if self.credentials else "off",
            self.upstream.config,
        )

    def _ready(self) -> bool:
        return self._server is not None and self._server.is_serving() and not self.stopping

    def begin_stopping(self) -> None:
        """SIGTERM came: /readyz answers 503 while sessions are still accepted (the endpoints
        take a moment to drop the pod); ``stop`` then stops listening."""
        self.stopping = True

    async def stop(self) -> None:
        """Stop listening, let the relays in flight end and hand their events over, then close.

        The caller closes the event publisher only after this returns, so the events of
        every copy relayed meanwhile are flushed with it.
        """
        if self._server is not None:
            self._server.close()  # no new connections
        await self.handler.finish(self.settings.shutdown_drain_seconds)
        await self._close_sessions()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await self.upstream.close()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self.suppressions is not None:
            await self.suppressions.stop()

    async def _close_sessions(self) -> None:
        """Let the apps whose relay just ended read their reply, then hang up on every session.

        Apps still sending a message, or idle between messages, are disconnected; they
        retry what was not answered, elsewhere or after the restart.
        """
        waits = [
            asyncio.create_task(session.not_answering.wait())
            for session in self._sessions
            if not session.not_answering.is_set()
        ]
        if waits:
            _, late = await asyncio.wait(waits, timeout=2.0)
            for wait in late:
                wait.cancel()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
