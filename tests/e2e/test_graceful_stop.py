"""Zero-drop rollouts: a component told to stop keeps serving while the endpoints drop it.

The tracker, the SMTP proxy and the aggregator run as their containers run them (``mailbeacon
tracker [--workers 2]``, ``proxy``, ``aggregator`` processes on a real nats-server). After
SIGTERM, /readyz answers 503 at once while pixels, SMTP sessions and API requests are still
served for SHUTDOWN_DELAY_SECONDS; then the process stops as before and exits 0 within the
delay plus the drain. Every request made meanwhile is answered, and each answered pixel and
relayed message is an event in the stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from mailbeacon.app.embedded_nats import EmbeddedNats
from tests.proxy.test_proxy_smtp import count_events, html_message
from tests.support import SECRET, SmtpSink, eventually, free_port, wait_http_ok

pytestmark = pytest.mark.slow  # processes stopped under load through their shutdown delays

DELAY = 2.0  # SHUTDOWN_DELAY_SECONDS of the processes under test
DRAIN = 2.0  # SHUTDOWN_DRAIN_SECONDS
# Signal delivery (and its forwarding to the workers) takes a moment; the listener closes a
# moment after the delay. Requests in these margins are not judged.
SETTLE = 0.5


def environment(nats_url: str, data_dir: Path, **settings: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAILBEACON_")},
        "MAILBEACON_NATS_URL": nats_url,
        "MAILBEACON_SECRET_KEYS": SECRET,
        "MAILBEACON_DATA_DIR": str(data_dir),
        "MAILBEACON_SHUTDOWN_DELAY_SECONDS": str(DELAY),
        "MAILBEACON_SHUTDOWN_DRAIN_SECONDS": str(DRAIN),
        **{f"MAILBEACON_{name.upper()}": value for name, value in settings.items()},
    }


@asynccontextmanager
async def component(
    args: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "mailbeacon"), *args, env=env, stdout=output, stderr=output
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass
class Timeline:
    """Requests made around a SIGTERM: when each was sent (seconds after the signal) and its answer."""

    answers: dict[str, list[tuple[float, int | str]]] = field(default_factory=dict)
    signalled: float = 0.0

    def note(self, kind: str, sent: float, answer: int | str) -> None:
        self.answers.setdefault(kind, []).append((sent - self.signalled, answer))

    def during_delay(self, kind: str, *, after: float = 0.0) -> list[int | str]:
        """Answers to the requests sent while the process had to serve (``after`` the signal)."""
        return [answer for sent, answer in self.answers.get(kind, []) if after <= sent <= DELAY - SETTLE]


async def stop_under_load(
    process: asyncio.subprocess.Process, probes: dict[str, Callable[[], Awaitable[int | str]]]
) -> tuple[Timeline, float]:
    """SIGTERM, then each probe over and over until the process exits; the timeline and how long
    the process took to exit."""
    timeline = Timeline(signalled=time.monotonic())
    process.send_signal(signal.SIGTERM)

    async def keep_probing(kind: str, probe: Callable[[], Awaitable[int | str]]) -> None:
        while process.returncode is None:
            sent = time.monotonic()
            timeline.note(kind, sent, await probe())
            await asyncio.sleep(0.03)

    probing = [asyncio.create_task(keep_probing(kind, probe)) for kind, probe in probes.items()]
    try:
        code = await asyncio.wait_for(process.wait(), DELAY + DRAIN + 10)
    finally:
        for task in probing:
            task.cancel()
        await asyncio.gather(*probing, return_exceptions=True)
    took = time.monotonic() - timeline.signalled
    assert code == 0
    return timeline, took


def http_probe(url: str) -> Callable[[], Awaitable[int | str]]:
    """GET on a new connection each time (a load balancer's health check, a mail client), so
    a closed listener shows as a refusal; the status, or the error's name."""

    async def probe() -> int | str:
        try:
            async with aiohttp.ClientSession() as http, http.get(url) as response:
                await response.read()
                return response.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    return probe


def assert_served_while_unready(timeline: Timeline, served: str, ok: int | str) -> str:
    """Every request of the delay served, /readyz 503 from SETTLE on; a line saying how it went."""
    answers = timeline.during_delay(served)
    assert len(answers) >= 5 and set(answers) == {ok}, timeline.answers[served]
    readiness = timeline.during_delay("readyz", after=SETTLE)
    assert len(readiness) >= 3 and set(readiness) == {503}, timeline.answers["readyz"]
    unready = min(sent for sent, answer in timeline.answers["readyz"] if answer == 503)
    return f"/readyz 503 from {unready * 1000:.0f} ms after SIGTERM; {len(answers)} {served} requests served meanwhile"


@pytest.mark.parametrize("workers", [1, 2])
async def test_tracker_serves_pixels_through_the_delay_with_readyz_503(
    tmp_path: Path, nats_server: EmbeddedNats, workers: int
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = environment(
        nats_server.url, tmp_path / "tracker", tracker_listen=f"127.0.0.1:{port}", site_url=base
    )
    log = tmp_path / "tracker.log"
    async with component(["tracker", "--workers", str(workers)], env, log) as process:
        await wait_http_ok(f"{base}/readyz", within=30)
        # Every worker listens (each logs it) before the signal: the kernel spreads connections.
        await eventually(lambda: asyncio.to_thread(_logged, log, "tracker listening", workers), within=30)

        async def new_pixel() -> int | str:
            return await http_probe(f"{base}/track/pixel/{uuid.uuid4()}/")()

        assert await new_pixel() == 200
        timeline, took = await stop_under_load(
            process, {"pixel": new_pixel, "readyz": http_probe(f"{base}/readyz")}
        )
    served = assert_served_while_unready(timeline, "pixel", 200)
    print(f"\ntracker --workers {workers}: exited {took:.2f} s after SIGTERM (delay {DELAY} s); {served}")
    assert DELAY <= took < DELAY + DRAIN + 3
    assert "Traceback" not in log.read_text()
    # Nothing answered was lost: each answered pixel is an opened event in the stream.
    answered = 1 + sum(1 for _, answer in timeline.answers["pixel"] if answer == 200)
    assert await count_events(nats_server.url, "opened") == answered


def _logged(log: Path, text: str, times: int) -> bool:
    return log.read_text().count(text) >= times


def send_one(port: int, recipient: str) -> int | str:
    """One SMTP session with one message; 250, or the error's name."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.send_message(html_message([recipient]))
        return 250
    except (OSError, smtplib.SMTPException) as exc:
        return type(exc).__name__


async def test_proxy_accepts_sessions_through_the_delay_with_readyz_503(
    tmp_path: Path, nats_server: EmbeddedNats, sink: SmtpSink
) -> None:
    smtp_port, http_port = free_port(), free_port()
    env = environment(
        nats_server.url,
        tmp_path / "proxy",
        smtp_listen=f"127.0.0.1:{smtp_port}",
        proxy_http_listen=f"127.0.0.1:{http_port}",
        upstream_smtp=sink.url,
        auto_create_campaigns="true",
    )
    log = tmp_path / "proxy.log"
    sent = 0

    async def new_session() -> int | str:
        nonlocal sent
        sent += 1
        return await asyncio.to_thread(send_one, smtp_port, f"reader{sent}@example.com")

    async with component(["proxy"], env, log) as process:
        await wait_http_ok(f"http://127.0.0.1:{http_port}/readyz", within=30)
        assert await new_session() == 250
        timeline, took = await stop_under_load(
            process, {"session": new_session, "readyz": http_probe(f"http://127.0.0.1:{http_port}/readyz")}
        )
    served = assert_served_while_unready(timeline, "session", 250)
    print(f"\nproxy: exited {took:.2f} s after SIGTERM (delay {DELAY} s, drain {DRAIN} s); {served}")
    assert DELAY <= took < DELAY + DRAIN + 3
    assert "Traceback" not in log.read_text()
    relayed = 1 + sum(1 for _, answer in timeline.answers["session"] if answer == 250)
    assert len(sink.messages) == relayed
    assert await count_events(nats_server.url, "sent") == relayed


async def test_aggregator_serves_its_api_through_the_delay_with_readyz_503(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = environment(
        nats_server.url,
        tmp_path / "aggregator",
        aggregator_listen=f"127.0.0.1:{port}",
        database_url=f"sqlite:///{tmp_path / 'events.db'}",
        migrate_on_start="true",
    )
    log = tmp_path / "aggregator.log"
    async with component(["aggregator"], env, log) as process:
        await wait_http_ok(f"{base}/readyz", within=60)
        timeline, took = await stop_under_load(
            process, {"api": http_probe(f"{base}/api/campaigns"), "readyz": http_probe(f"{base}/readyz")}
        )
    served = assert_served_while_unready(timeline, "api", 200)
    print(f"\naggregator: exited {took:.2f} s after SIGTERM (delay {DELAY} s); {served}")
    assert DELAY <= took < DELAY + 10
    assert "Traceback" not in log.read_text()
