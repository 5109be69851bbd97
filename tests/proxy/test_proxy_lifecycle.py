"""A relay outlives its SMTP session: apps that hang up, and a proxy that is stopped mid-relay.

Once the upstream accepted a copy, the copy is recorded as ``sent`` (or ``failed``)
whatever the app does: otherwise the app, never told, sends it again and the copy
is counted nowhere.
"""

from __future__ import annotations

import asyncio
import email
import smtplib
from collections.abc import AsyncIterator, Callable
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.proxy.test_proxy_relay import FlakyHandler, metrics, start_upstream
from tests.proxy.test_proxy_smtp import count_events, html_message, proxy_running, read_events
from tests.support import eventually, metric_value


class SlowUpstream(FlakyHandler):
    """Takes its time over some recipients' DATA, and says when a DATA began."""

    def __init__(self, slow: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slow = slow or {}
        self.data_started = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_started.set()
        await asyncio.sleep(max((self.slow.get(r, 0.0) for r in envelope.rcpt_tos), default=0.0))
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
async def slow_upstream() -> AsyncIterator[tuple[SlowUpstream, str]]:
    handler = SlowUpstream()
    server, port = await start_upstream(handler)
    try:
        yield handler, f"smtp://127.0.0.1:{port}"
    finally:
        server.close()


async def send_and_hang_up(port: int, recipients: list[str], upstream: SlowUpstream) -> None:
    """The whole message, then gone while the proxy relays it (an app's timeout, a crash, a deploy)."""
    message = html_message(recipients).as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    commands = [b"HELO app", b"MAIL FROM:<news@shop.example.com>"]
    for command in [*commands, *(b"RCPT TO:<%s>" % r.encode() for r in recipients), b"DATA"]:
        writer.write(command + b"\r\n")
        assert (await reader.readline())[:1] in (b"2", b"3")
    writer.write(message + b".\r\n")
    await asyncio.wait_for(upstream.data_started.wait(), 10)
    writer.close()
    await writer.wait_closed()


async def until(check: Callable[[], bool], within: float = 10) -> None:
    async def probe() -> bool:
        return check()

    await eventually(probe, within)


async def events_recorded(nats_url: str, sent: int, failed: int = 0) -> None:
    async def probe() -> bool:
        return (len(await read_events(nats_url, "sent")), len(await read_events(nats_url, "failed"))) == (
            sent,
            failed,
        )

    await eventually(probe, within=15)


def send(port: int, recipients: list[str]) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("news@shop.example.com")
        for rcpt in recipients:
            smtp.rcpt(rcpt)
        return smtp.data(html_message(recipients).as_bytes())


def tracking_ids(messages: list[tuple[list[str], bytes]]) -> dict[str, str]:
    return {
        rcpts[0]: str(email.message_from_bytes(content, policy=default_policy)["X-Mailbeacon-Tracking-ID"])
        for rcpts, content in messages
    }


@pytest.mark.slow
async def test_copies_accepted_after_the_app_hung_up_are_recorded(
    tmp_path: Path, nats_url: str, slow_upstream: tuple[SlowUpstream, str]
) -> None:
    upstream, url = slow_upstream
    upstream.slow["ann@example.com"] = 0.5  # the app is gone before the first answer
    upstream.transient["busy@example.com"] = 1  # accepted on the retry, a second later
    upstream.permanent.add("gone@example.com")
    recipients = ["ann@example.com", "busy@example.com", "gone@example.com"]
    async with proxy_running(tmp_path, nats_url, url, upstream_retry_seconds=10) as proxy:
        await send_and_hang_up(proxy.port, recipients, upstream)
        await events_recorded(nats_url, sent=2, failed=1)
    sent = await read_events(nats_url, "sent")
    failed = await read_events(nats_url, "failed")
    delivered = tracking_ids(upstream.messages)
    assert sorted(delivered) == ["ann@example.com", "busy@example.com"]
    assert {e.recipient: e.tracking_id for e in sent} == delivered  # each accepted copy, as relayed
    assert [(e.recipient, e.metadata["smtp_code"]) for e in failed] == [("gone@example.com", 550)]


@pytest.mark.slow
async def test_an_app_that_hangs_up_mid_relay_does_not_poison_the_pool(
    tmp_path: Path, nats_url: str, slow_upstream: tuple[SlowUpstream, str]
) -> None:
    upstream, url = slow_upstream
    upstream.slow["ann@example.com"] = 0.5
    async with proxy_running(tmp_path, nats_url, url) as proxy:
        await send_and_hang_up(proxy.port, ["ann@example.com"], upstream)
        assert (await asyncio.to_thread(send, proxy.port, ["ben@example.com"]))[0] == 250
        await events_recorded(nats_url, sent=2)
    # Both relays ran to the end, each on a whole session: two intact copies, both recorded.
    delivered = tracking_ids(upstream.messages)
    assert sorted(delivered) == ["ann@example.com", "ben@example.com"]
    for rcpts, content in upstream.messages:
        assert email.message_from_bytes(content, policy=default_policy)["To"] == rcpts[0]
    assert {e.recipient: e.tracking_id for e in await read_events(nats_url, "sent")} == delivered


@pytest.mark.slow
async def test_stopping_waits_for_relays_in_flight(
    tmp_path: Path, nats_url: str, slow_upstream: tuple[SlowUpstream, str]
) -> None:
    upstream, url = slow_upstream
    upstream.slow["ann@example.com"] = 1.5
    async with proxy_running(tmp_path, nats_url, url) as proxy:
        app = asyncio.create_task(asyncio.to_thread(send, proxy.port, ["ann@example.com"]))
        await asyncio.wait_for(upstream.data_started.wait(), 10)
        await proxy.service.stop()  # as on SIGTERM: before the publisher is closed
        assert await count_events(nats_url, "sent") == 1  # recorded before stop() returned
        code, _ = await asyncio.wait_for(app, 2)
        assert code == 250  # the app heard the answer before the proxy went away
        with pytest.raises(OSError):
            await asyncio.to_thread(send, proxy.port, ["ben@example.com"])  # no longer listening
    sent = await read_events(nats_url, "sent")
    assert [(e.recipient, e.tracking_id) for e in sent] == list(tracking_ids(upstream.messages).items())


@pytest.mark.slow
async def test_stopping_ends_the_retry_window(
    tmp_path: Path, nats_url: str, slow_upstream: tuple[SlowUpstream, str]
) -> None:
    upstream, url = slow_upstream
    upstream.transient["busy@example.com"] = 1000
    before = metrics()
    async with proxy_running(
        tmp_path, nats_url, url, upstream_retry_seconds=60, shutdown_drain_seconds=2
    ) as proxy:
        app = asyncio.create_task(
            asyncio.to_thread(send, proxy.port, ["ann@example.com", "busy@example.com"])
        )
        await until(lambda: upstream.transient["busy@example.com"] < 1000)  # refused once
        loop = asyncio.get_running_loop()
        started = loop.time()
        await proxy.service.stop()
        assert loop.time() - started < 1.8  # half the grace, then no more retries: not 60 s
        code, text = await asyncio.wait_for(app, 5)
    assert code == 250 and b"1 of 2 copies accepted" in text
    assert [e.recipient for e in await read_events(nats_url, "sent")] == ["ann@example.com"]
    failed = await read_events(nats_url, "failed")
    assert [(e.recipient, e.metadata["smtp_code"]) for e in failed] == [("busy@example.com", 451)]
    assert (
        metric_value(metrics(), "mailbeacon_proxy_messages_total", result="partial")
        - metric_value(before, "mailbeacon_proxy_messages_total", result="partial")
        == 1
    )


@pytest.mark.slow
async def test_a_relay_cut_short_at_shutdown_keeps_what_the_upstream_answered(
    tmp_path: Path, nats_url: str, slow_upstream: tuple[SlowUpstream, str]
) -> None:
    upstream, url = slow_upstream
    upstream.slow["stuck@example.com"] = 30.0  # never answers within the grace period
    async with proxy_running(tmp_path, nats_url, url, shutdown_drain_seconds=1) as proxy:
        app = asyncio.create_task(
            asyncio.to_thread(send, proxy.port, ["ann@example.com", "stuck@example.com"])
        )
        await until(lambda: len(upstream.messages) == 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await proxy.service.stop()
        assert loop.time() - started < 3  # bounded by the grace period, not by the upstream
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await asyncio.wait_for(app, 5)  # no answer: the app retries the message
    sent = await read_events(nats_url, "sent")
    assert [(e.recipient, e.tracking_id) for e in sent] == list(tracking_ids(upstream.messages).items())
    assert await read_events(nats_url, "failed") == []  # the cut-off copy has no answer to record
