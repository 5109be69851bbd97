"""Real parts for tests: an SMTP sink, settings, waiting helpers. Network only on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailbeacon.contract.settings import Settings

SECRET = "test-signing-key-0123456789abcdefghij"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for one test; the tracker gets a free port that SITE_URL points at."""
    tracker_port = free_port()
    values: dict[str, Any] = {
        "site_url": f"http://127.0.0.1:{tracker_port}",
        "secret_keys": SECRET,
        "data_dir": str(tmp_path / "data"),
        "runtime_dir": str(tmp_path / "run"),  # `up`'s address file stays with the test
        "smtp_listen": "127.0.0.1:0",
        "tracker_listen": f"127.0.0.1:{tracker_port}",
        "aggregator_listen": "127.0.0.1:0",
        "proxy_http_listen": "127.0.0.1:0",
        "ingest_batch_size": 200,
    }
    values.update(overrides)
    # Settings come from the environment in production; tests pass them by name.
    return Settings(**values)


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes


@dataclass
class SinkHandler:
    """An upstream that keeps what it accepts; ``refuse`` maps a recipient to an SMTP reply."""

    messages: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)
    refuse_data: str | None = None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.refuse_data:
            return self.refuse_data
        self.messages.append(
            Received(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b"")
        )
        return "250 2.0.0 queued"


class SmtpSink:
    def __init__(self) -> None:
        self.handler = SinkHandler()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> SmtpSink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self.handler, hostname="sink", enable_SMTPUTF8=True), "127.0.0.1", 0
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


async def eventually(
    check: Callable[[], Awaitable[Any]], within: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy (or raise its last AssertionError)."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = await check()
            if result:
                return result
        except AssertionError as exc:
            last = exc
        await asyncio.sleep(interval)
    if last is not None:
        raise last
    raise AssertionError("condition not met in time")


async def raw_http(port: int, request: bytes) -> bytes:
    """Send ``request`` as written (bytes no HTTP client would send) and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read(65536)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def wait_http_ok(url: str, within: float = 20.0) -> None:
    """Poll ``url`` until it answers 200 (a process's readiness endpoint coming up)."""
    import aiohttp

    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            try:
                async with http.get(url) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, within=within)


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """One sample from a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
