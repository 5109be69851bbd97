"""The tracker's one outbound call (SNS certificates, subscription confirmation): only for
allowed topics, and through HTTPS_PROXY unless NO_PROXY names the host.

The egress proxy is a tiny CONNECT proxy on 127.0.0.1 written here: it records the target
it is asked for and refuses to connect anywhere (nothing leaves this machine).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from mailbeacon.bus.jetstream import connect, provision
from mailbeacon.bus.publisher import EventPublisher
from tests.esp_payloads.harness import (
    CERT_URL,
    FakeSns,
    ses_event,
    sns_headers,
    sns_notification,
    sns_subscription_confirmation,
    verify_context,
    webhook_request,
    webhook_settings,
)
from tests.support import make_settings
from tracker.service import TrackerService
from tracker.webhooks.esp import ses
from tracker.webhooks.esp.base import WebhookError
from tracker.webhooks.esp.sns import bypasses_proxy, https_getter, proxy_for

FOREIGN_TOPIC = "arn:aws:sns:us-east-1:999999999999:someone-elses"


class ConnectProxy:
    """Records each CONNECT target and answers 403 (an egress policy that says no)."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        self.targets.append(f"{method} {target}")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def test_a_foreign_topic_is_refused_before_any_certificate_is_fetched(tmp_path: Path) -> None:
    fetcher = FakeSns()
    context = verify_context(tmp_path, fetcher, sns_cert_dir=None)  # nothing provided ahead of time
    foreign = sns_notification(ses_event("Delivery"), topic=FOREIGN_TOPIC)
    with pytest.raises(WebhookError) as refused:
        await ses.verify(webhook_request(json.dumps(foreign).encode(), sns_headers(foreign)), context)
    assert refused.value.status == 403 and "SES_TOPIC_ARNS" in refused.value.reason
    assert fetcher.requests == []
    # An allowed topic does fetch (here the fake refuses: 503, the provider retries).
    allowed = sns_notification(ses_event("Delivery"))
    with pytest.raises(WebhookError) as unavailable:
        await ses.verify(webhook_request(json.dumps(allowed).encode(), sns_headers(allowed)), context)
    assert unavailable.value.status == 503 and fetcher.requests == [CERT_URL]


@asynccontextmanager
async def tracker_behind(tmp_path: Path, nats_url: str, **overrides: object) -> AsyncIterator[str]:
    """A tracker whose outbound calls are the real ones, configured by its settings only."""
    settings = make_settings(tmp_path, nats_url=nats_url, **webhook_settings(tmp_path, **overrides))
    nc = await connect(nats_url, "tracker-test")
    await provision(nc.jetstream(), settings)
    publisher = EventPublisher(nc.jetstream())
    service = TrackerService(settings, publisher)  # no test double for the outbound call
    await service.start()
    try:
        yield f"http://127.0.0.1:{service.port}/webhooks/ses"
    finally:
        await service.stop()
        await publisher.close(drain_timeout=5)
        await nc.close()


async def test_certificates_and_confirmations_go_through_the_egress_proxy(
    tmp_path: Path, nats_url: str
) -> None:
    notification = sns_notification(ses_event("Delivery"))
    confirmation = sns_subscription_confirmation()
    async with ConnectProxy() as proxy, aiohttp.ClientSession() as http:
        # The certificate is not provided ahead of time: it is fetched, through the proxy.
        async with tracker_behind(tmp_path, nats_url, sns_cert_dir=None, https_proxy=proxy.url) as url:
            body = json.dumps(notification).encode()
            async with http.post(url, data=body, headers=sns_headers(notification)) as response:
                assert response.status == 503  # the proxy said no: the provider retries
        assert proxy.targets == ["CONNECT sns.us-east-1.amazonaws.com:443"]
        # The certificate is provided; confirming the subscription is the outbound call.
        async with tracker_behind(tmp_path, nats_url, https_proxy=proxy.url) as url:
            body = json.dumps(confirmation).encode()
            async with http.post(url, data=body, headers=sns_headers(confirmation)) as response:
                assert response.status == 503
                assert "confirming the subscription failed" in (await response.json())["error"]
        assert proxy.targets[1:] == ["CONNECT sns.us-east-1.amazonaws.com:443"]


async def test_no_proxy_hosts_are_reached_directly(tmp_path: Path) -> None:
    """A listener on 127.0.0.1 stands in for the host: NO_PROXY sends the request to it (its TLS
    handshake then fails, which is not the point), otherwise the proxy is asked for it."""
    direct: list[bool] = []

    async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        direct.append(True)
        writer.close()

    server = await asyncio.start_server(listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ConnectProxy() as proxy:
            target = f"https://127.0.0.1:{port}/cert.pem"
            with pytest.raises((aiohttp.ClientError, OSError)):
                await https_getter(proxy.url, ["localhost", "127.0.0.0/8"])(target)
            assert direct == [True] and proxy.targets == []
            with pytest.raises((aiohttp.ClientError, OSError)):
                await https_getter(proxy.url, [".amazonaws.com"])(target)
            assert proxy.targets == [f"CONNECT 127.0.0.1:{port}"]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypass"),
    [
        ("sns.us-east-1.amazonaws.com", ["amazonaws.com"], True),
        ("sns.us-east-1.amazonaws.com", [".amazonaws.com"], True),
        ("sns.us-east-1.amazonaws.com", ["*.amazonaws.com"], True),
        ("sns.us-east-1.amazonaws.com", ["*"], True),
        ("sns.us-east-1.amazonaws.com", ["SNS.US-EAST-1.AMAZONAWS.COM"], True),
        ("sns.us-east-1.amazonaws.com", ["notamazonaws.com", "aws.com"], False),
        ("sns.us-east-1.amazonaws.com", ["zonaws.com"], False),
        ("sns.us-east-1.amazonaws.com", [], False),
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("10.1.2.3", ["10.1.2.3"], True),
        ("192.0.2.1", ["10.0.0.0/8", "localhost"], False),
        ("::1", ["::1/128"], True),
    ],
)
def test_no_proxy_matching(host: str, no_proxy: list[str], bypass: bool) -> None:
    assert bypasses_proxy(host, no_proxy) is bypass
    url = f"https://[{host}]/x" if ":" in host else f"https://{host}/x"
    assert proxy_for(url, "http://proxy:3128", no_proxy) == (None if bypass else "http://proxy:3128")
    assert proxy_for(url, None, no_proxy) is None
