"""Slow clients cannot hold the tracker's connections (docs/configuration.md "Tracker").

Headers must be complete within TRACKER_HEADER_TIMEOUT_SECONDS of connecting (or of the
first bytes of a later request on a kept-alive connection); at most
TRACKER_MAX_CONNECTIONS are open per process, and one more is answered 503 and closed.
Short limits here; the defaults are 10 s and 10,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from mailbeacon.contract.signing import pixel_url
from mailbeacon.web.http_guard import RESERVED_DESCRIPTORS, effective_max_connections
from tests.esp_payloads.harness import running_tracker
from tests.support import metric_value
from tracker import metrics as tracker_metrics

TIMEOUT = 0.5
SLOW_CLIENTS = 200
PARTIAL = b"GET /track/pixel/0b9e8a5c-7d4e-4f0a-9a57-3c1f2d8e6b01/ HTTP/1.1\r\nHost: t\r\n"


def pixel_request(site: str) -> bytes:
    path = pixel_url(site, str(uuid.uuid4())).split("/", 3)[3]
    return f"GET /{path} HTTP/1.1\r\nHost: t\r\nUser-Agent: Mozilla/5.0 (X11) Firefox/128.0\r\n\r\n".encode()


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes (EOF or reset) within ``seconds``."""
    try:
        return await asyncio.wait_for(reader.read(65536), seconds) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.slow
async def test_slow_headers_are_cut_off_and_keep_alive_clients_are_not(tmp_path: Path, nats_url: str) -> None:
    async with running_tracker(tmp_path, nats_url, tracker_header_timeout_seconds=TIMEOUT) as tracker:
        port = int(tracker.url.rsplit(":", 1)[1])
        # A well-behaved keep-alive client, idle between its requests for longer than the timeout.
        keep_reader, keep_writer = await asyncio.open_connection("127.0.0.1", port)
        keep_writer.write(pixel_request(tracker.settings.site_url))
        assert (await read_answer(keep_reader)).startswith(b"HTTP/1.1 200")

        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(SLOW_CLIENTS)]
        started = time.monotonic()
        for _, writer in slow:
            writer.write(PARTIAL)

        async def trickle() -> None:
            # A header line now and then, never the blank line that ends them.
            for n in range(40):
                await asyncio.sleep(TIMEOUT / 5)
                for _, writer in slow:
                    if not writer.is_closing():
                        writer.write(b"X-Slow-%d: 1\r\n" % n)

        trickling = asyncio.create_task(trickle())
        try:
            closed = await asyncio.gather(*(closed_within(reader, TIMEOUT * 8) for reader, _ in slow))
        finally:
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickling
        assert all(closed)
        assert time.monotonic() - started < TIMEOUT * 8
        assert tracker.service.limits is not None and tracker.service.limits.timed_out >= SLOW_CLIENTS

        # The keep-alive client, idle all along, is still served on the same connection ...
        keep_writer.write(pixel_request(tracker.settings.site_url))
        assert (await read_answer(keep_reader)).startswith(b"HTTP/1.1 200")
        # ... and a request whose headers take a while but arrive in time is answered.
        request = pixel_request(tracker.settings.site_url)
        for chunk in (request[:20], request[20:-2], request[-2:]):
            keep_writer.write(chunk)
            await asyncio.sleep(TIMEOUT / 4)
        assert (await read_answer(keep_reader)).startswith(b"HTTP/1.1 200")
        # A later request on that connection has the same deadline once it begins.
        keep_writer.write(PARTIAL)
        assert await closed_within(keep_reader, TIMEOUT * 8)
        keep_writer.close()
        for _, writer in slow:
            writer.close()


async def test_a_connection_that_never_speaks_is_closed(tmp_path: Path, nats_url: str) -> None:
    async with running_tracker(tmp_path, nats_url, tracker_header_timeout_seconds=TIMEOUT) as tracker:
        port = int(tracker.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_within(reader, TIMEOUT * 8)
        writer.close()


async def test_connections_above_the_cap_are_answered_503(tmp_path: Path, nats_url: str) -> None:
    cap = 5
    async with running_tracker(
        tmp_path, nats_url, tracker_max_connections=cap, tracker_header_timeout_seconds=30
    ) as tracker:
        port = int(tracker.url.rsplit(":", 1)[1])
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        for _, writer in held:
            writer.write(PARTIAL)  # busy, as slow clients keep them
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            answer = await asyncio.wait_for(reader.read(65536), 5)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer
        if answer:
            assert b"too many connections" in answer
        writer.close()
        assert tracker.service.limits is not None and tracker.service.limits.refused == 1
        assert (
            metric_value(
                generate_latest(tracker_metrics.REGISTRY).decode(), "mailbeacon_tracker_connections_refused"
            )
            == 1
        )
        # One of them leaves: the place is free again.
        held[0][1].close()
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(pixel_request(tracker.settings.site_url))
        assert (await read_answer(reader)).startswith(b"HTTP/1.1 200")
        writer.close()
        for _, other in held[1:]:
            other.close()


@pytest.mark.parametrize(
    ("configured", "descriptors", "cap"),
    [
        (10_000, 1024, 1024 - RESERVED_DESCRIPTORS),
        (10_000, 1_048_576, 10_000),
        (500, 1024, 500),
        (10_000, None, 10_000),
        (10_000, 100, 1),
    ],
)
def test_the_cap_fits_the_open_file_limit(configured: int, descriptors: int | None, cap: int) -> None:
    assert effective_max_connections(configured, descriptors) == cap
