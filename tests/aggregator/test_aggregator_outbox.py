"""The development outbox pages over real HTTP render whatever apps sent: malformed or
empty From headers, encoded words in unknown charsets, raw 8-bit bytes, unknown body
charsets. Every message is listed and opens, never a 503."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from aggregator.service import create_app
from aggregator.store.db import open_database
from mailbeacon.web.server import bound_port

ODD_FROMS = {
    "half-address": b"a@",
    "empty": b"",
    "unknown-charset": b"=?x-unknown?q?abc?=",
    "broken-encoded-word": b"=?utf-8?b?!!!?=",
    "lone-bracket": b"<",
    "raw-8bit": b"\xff\xfe@example.com",
    "unknown-charset-with-address": b"=?x-unknown?q?Shop?= <shop@example.com>",
}


def message(subject: bytes, sender: bytes, body_charset: bytes = b"utf-8") -> bytes:
    return (
        b"From: " + sender + b"\r\nDelivered-To: ann@example.com\r\nSubject: " + subject + b"\r\n"
        b"X-Mailbeacon-Tracking-ID: \r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=" + body_charset + b"\r\n\r\nHello <b>there</b>\r\n"
    )


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    directory = tmp_path / "outbox"
    directory.mkdir()
    for name, sender in ODD_FROMS.items():
        (directory / f"{name}.eml").write_bytes(message(f"subject {name}".encode(), sender))
    (directory / "odd-subject.eml").write_bytes(
        message(b"=?x-unknown?q?sale?= =?utf-8?b?!!!?=", b"shop@example.com", b"x-unknown")
    )
    db = open_database(f"sqlite:///{tmp_path / 'outbox.db'}")
    runner = web.AppRunner(create_app(db, directory))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    async with aiohttp.ClientSession() as http:
        yield f"http://127.0.0.1:{bound_port(runner)}", http
    await runner.cleanup()
    await db.dispose()


async def test_outbox_lists_and_shows_messages_with_odd_headers(
    outbox: tuple[str, aiohttp.ClientSession],
) -> None:
    base, http = outbox
    async with http.get(f"{base}/outbox/") as response:
        assert response.status == 200
        page = await response.text()
    for name in ODD_FROMS:
        assert f"subject {name}" in page and f'href="/outbox/{name}.eml"' in page
    assert "shop@example.com" in page and "abc" in page
    assert "odd-subject.eml" in page
    for name in [*ODD_FROMS, "odd-subject"]:
        async with http.get(f"{base}/outbox/{name}.eml") as response:
            assert response.status == 200, name
            shown = await response.text()
        assert f'src="/outbox/{name}.eml/body"' in shown and "<b>there" not in shown, name
        # The body is a sandboxed document of its own, framed by the outbox page only.
        async with http.get(f"{base}/outbox/{name}.eml/body") as response:
            assert response.status == 200, name
            body = await response.text()
            policy = response.headers["Content-Security-Policy"]
        assert "Hello" in body and "<b>there" not in body, name  # plain text stays text
        assert "sandbox" in policy and "frame-ancestors 'self'" in policy and "script-src" not in policy
