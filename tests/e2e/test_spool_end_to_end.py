"""Nothing lost on a graceful stop while NATS is down: the spool, end to end.

The components run as their containers run them (``mailbeacon proxy``, ``tracker``,
``aggregator`` processes, stopped with SIGTERM); nats-server is stopped and started again by
its PID on the same port and store. ``mailbeacon up`` (AllInOne) is exercised in process.
"""

from __future__ import annotations

import asyncio
import email
import os
import re
import signal
import smtplib
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from mailbeacon.app.embedded_nats import EmbeddedNats
from mailbeacon.app.runner import AllInOne
from tests.support import SECRET, SmtpSink, eventually, free_port, make_settings, wait_http_ok

pytestmark = pytest.mark.slow  # whole systems stopped and started

CAMPAIGN = "default/spool"
DRAIN = 2.0  # SHUTDOWN_DRAIN_SECONDS of the processes under test
BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"}


def message(recipient: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "news@shop.example.com"
    mail["To"] = recipient
    mail["Subject"] = "Spring sale"
    mail.set_content("Spring sale https://shop.example.com/spring")
    mail.add_alternative(
        '<html><body><a href="https://shop.example.com/spring">Shop</a></body></html>', "html"
    )
    return mail


def send_all(port: int, recipients: list[str]) -> int:
    """One message per recipient; how many the proxy accepted (smtplib raises on a refusal)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        for recipient in recipients:
            assert smtp.send_message(message(recipient)) == {}
    return len(recipients)


def copy_urls(content: bytes) -> tuple[str, str]:
    """The pixel and the (real, not honeypot) click URL of one relayed copy."""
    html = email.message_from_bytes(content, policy=default_policy).get_body(("html",)).get_content()  # type: ignore[union-attr]
    pixel = re.findall(r'<img src="([^"]+/track/pixel/[^"]+)"', html)[0]
    clicks = [
        url.replace("&amp;", "&")
        for url in re.findall(r'href="([^"]+/track/click/[^"]+)"', html)
        if "honeypot" not in url
    ]
    return pixel, clicks[0]


class Process:
    """One ``mailbeacon`` command as a child process, its output kept in a file."""

    def __init__(self, command: str, env: dict[str, str], log: Path) -> None:
        self.command, self.env, self.log = command, env, log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mailbeacon.app.cli",
                self.command,
                env=self.env,
                stdout=output,
                stderr=output,
            )

    async def stop(self) -> tuple[int, float]:
        """SIGTERM to its PID; its exit code and how long it took to exit."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 60)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


@asynccontextmanager
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            if process.process is not None:
                await process.process.wait()


async def test_a_stop_while_nats_is_down_loses_no_event(
    tmp_path: Path, nats_server: EmbeddedNats, sink: SmtpSink
) -> None:
    """The issue's scenario: NATS down, 10 copies through the proxy, their pixels and clicks on
    the tracker, a graceful stop, a restart with NATS up: the statistics have all of them."""
    tracker_port, smtp_port, proxy_http = free_port(), free_port(), free_port()
    base = {
        **os.environ,
        "MAILBEACON_NATS_URL": nats_server.url,
        "MAILBEACON_SECRET_KEYS": SECRET,
        "MAILBEACON_SITE_URL": f"http://127.0.0.1:{tracker_port}",
        "MAILBEACON_SHUTDOWN_DRAIN_SECONDS": str(DRAIN),
    }
    proxy_env = {
        **base,
        "MAILBEACON_DATA_DIR": str(tmp_path / "proxy"),
        "MAILBEACON_SMTP_LISTEN": f"127.0.0.1:{smtp_port}",
        "MAILBEACON_PROXY_HTTP_LISTEN": f"127.0.0.1:{proxy_http}",
        "MAILBEACON_UPSTREAM_SMTP": sink.url,
        "MAILBEACON_DEFAULT_CAMPAIGN": CAMPAIGN,
    }
    tracker_env = {
        **base,
        "MAILBEACON_DATA_DIR": str(tmp_path / "tracker"),
        "MAILBEACON_TRACKER_LISTEN": f"127.0.0.1:{tracker_port}",
    }
    aggregator_port = free_port()
    aggregator_env = {
        **base,
        "MAILBEACON_DATA_DIR": str(tmp_path / "aggregator"),
        "MAILBEACON_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
        "MAILBEACON_MIGRATE_ON_START": "true",
        "MAILBEACON_AGGREGATOR_LISTEN": f"127.0.0.1:{aggregator_port}",
    }
    recipients = [f"reader{n}@example.com" for n in range(10)]
    async with processes() as running, aiohttp.ClientSession(headers=BROWSER) as http:
        proxy = Process("proxy", proxy_env, tmp_path / "proxy.log")
        tracker = Process("tracker", tracker_env, tmp_path / "tracker.log")
        running += [proxy, tracker]
        await asyncio.gather(proxy.start(), tracker.start())
        await wait_http_ok(f"http://127.0.0.1:{tracker_port}/healthz")
        await wait_http_ok(f"http://127.0.0.1:{proxy_http}/readyz")

        await asyncio.to_thread(nats_server.stop)  # SIGTERM to the nats-server PID
        assert await asyncio.to_thread(send_all, smtp_port, recipients) == 10
        assert len(sink.messages) == 10  # relayed: the upstream holds all ten
        for received in sink.messages:
            pixel, click = copy_urls(received.content)
            async with http.get(pixel) as response:
                assert response.status == 200
            async with http.get(click, allow_redirects=False) as response:
                assert response.status == 302

        (proxy_code, proxy_took), (tracker_code, tracker_took) = await asyncio.gather(
            proxy.stop(), tracker.stop()
        )
        print(
            f"\nstop with NATS down: proxy {proxy_took:.2f} s, tracker {tracker_took:.2f} s (drain {DRAIN} s)"
        )
        assert (proxy_code, tracker_code) == (0, 0)
        for log in (proxy.log, tracker.log):
            text = log.read_text()
            assert "Traceback" not in text, text
            assert "for the next start" in text, text
        # About the drain deadline: retried until then, then spooled, not a moment longer.
        assert DRAIN <= proxy_took < DRAIN + 5 and DRAIN <= tracker_took < DRAIN + 5
        assert len(list((tmp_path / "proxy" / "spool").glob("*.jsonl"))) == 1
        assert len(list((tmp_path / "tracker" / "spool").glob("*.jsonl"))) == 1

        await asyncio.to_thread(nats_server.start)  # same port, same store
        proxy, tracker = Process("proxy", proxy_env, proxy.log), Process("tracker", tracker_env, tracker.log)
        aggregator = Process("aggregator", aggregator_env, tmp_path / "aggregator.log")
        running += [proxy, tracker, aggregator]
        await asyncio.gather(proxy.start(), tracker.start(), aggregator.start())
        await wait_http_ok(f"http://127.0.0.1:{aggregator_port}/healthz", within=60)
        statistics_url = f"http://127.0.0.1:{aggregator_port}/api/campaigns/{CAMPAIGN}/statistics"

        async def all_counted() -> dict[str, Any]:
            async with http.get(statistics_url) as response:
                assert response.status == 200
                stats: dict[str, Any] = await response.json()
            counts = (stats["sent_count"], stats["total_opens"], stats["total_clicks"], stats["unique_opens"])
            assert counts == (10, 10, 10, 10), counts
            return stats

        stats = await eventually(all_counted, within=60, interval=0.5)
        assert stats["unique_clicks"] == 10
        # A spool file goes once all its events are stored.
        for directory in (tmp_path / "proxy" / "spool", tmp_path / "tracker" / "spool"):
            assert list(directory.iterdir()) == []
        for process in (proxy, tracker, aggregator):
            assert (await process.stop())[0] == 0


async def test_mailbeacon_up_spools_at_stop_and_publishes_before_serving(
    tmp_path: Path, nats_server: EmbeddedNats, sink: SmtpSink
) -> None:
    """`mailbeacon up` on NATS_URL: the same, in one process, with its one publisher."""
    settings = make_settings(
        tmp_path,
        nats_url=nats_server.url,
        upstream_smtp=SecretStr(sink.url),
        upstream_timeout=5,
        shutdown_drain_seconds=DRAIN,
        default_campaign=CAMPAIGN,
        database_url=SecretStr(f"sqlite:///{tmp_path / 'events.db'}"),
    )
    recipients = [f"reader{n}@example.com" for n in range(3)]
    system = AllInOne(settings)
    addresses = await system.start()
    async with aiohttp.ClientSession(headers=BROWSER) as http:
        try:
            await asyncio.to_thread(nats_server.stop)
            smtp_port = int(addresses.smtp.rsplit(":", 1)[1])
            assert await asyncio.to_thread(send_all, smtp_port, recipients) == 3
            for received in sink.messages:
                async with http.get(copy_urls(received.content)[0]) as response:
                    assert response.status == 200
        finally:
            started = time.monotonic()
            await system.stop()
            took = time.monotonic() - started
        assert DRAIN <= took < DRAIN + 5
        spooled = list((settings.data_dir / "spool").glob("*.jsonl"))
        assert len(spooled) == 1 and len(spooled[0].read_bytes().splitlines()) == 6  # 3 sent, 3 opened

        await asyncio.to_thread(nats_server.start)
        system = AllInOne(settings)
        addresses = await system.start()  # returns once the spool is published
        try:
            assert list((settings.data_dir / "spool").iterdir()) == []
            url = f"{addresses.aggregator}/api/campaigns/{CAMPAIGN}/statistics"

            async def all_counted() -> bool:
                async with http.get(url) as response:
                    stats = await response.json() if response.status == 200 else {}
                return (stats.get("sent_count"), stats.get("total_opens")) == (3, 3)

            await eventually(all_counted, within=30)
        finally:
            await system.stop()
