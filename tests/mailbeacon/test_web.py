"""The HTTP plumbing every component serves with."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web

from mailbeacon.web.server import add_health_routes, bound_port, serve
from tests.support import raw_http


async def test_malformed_requests_get_400_without_filling_the_error_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = web.Application()
    add_health_routes(app)
    runner = await serve(app, "127.0.0.1:0")
    port = bound_port(runner)
    try:
        with caplog.at_level(logging.DEBUG):
            huge_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 20000 + b"\r\n\r\n"
            assert (await raw_http(port, huge_header))[9:12] == b"400"
            huge_url = b"GET /healthz?" + b"q" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            assert (await raw_http(port, huge_url))[9:10] == b"4"
            good = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            assert (await raw_http(port, good))[9:12] == b"200"
    finally:
        await runner.cleanup()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("malformed HTTP request" in r.getMessage() for r in caplog.records)  # still at DEBUG
