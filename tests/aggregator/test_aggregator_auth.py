"""The aggregator's API and pages need credentials beyond loopback (issue 14, finding 5).

A real aggregator (``AggregatorService``: real NATS, SQLite) listening on 0.0.0.0 and asked
over 127.0.0.1: every route but health, readiness, metrics, the stylesheet and the login
form refuses strangers (401 JSON for the API, the login form for pages); a read-only token
reads and cannot refresh; the settings that would leave it open refuse to start; an auth
proxy's header counts only from TRUSTED_PROXIES; every answer carries the security
headers; the SQLite file is the aggregator's user's alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict
from nats.aio.client import Client as NATS

from mailbeacon.contract.settings import Settings
from tests.auth_support import CAMPAIGN, FULL, READ, RECIPIENT, TRACKING_ID, Start, aggregators
from tests.support import free_port

OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/static/mailbeacon.css", "/login"}


@pytest.fixture
async def start(tmp_path: Path, nc: NATS, nats_url: str) -> AsyncIterator[Start]:
    async with aggregators(tmp_path, nc, nats_url) as starting:
        yield starting


def concrete_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, placeholders filled with real values."""
    fill = {"ns": "default", "name": "auth", "tracking_id": TRACKING_ID}
    found = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        template = info.get("formatter") or info.get("path")
        if not template or route.method == "HEAD":
            continue
        if template.startswith("/outbox/{name}"):
            path = template.replace("{name}", "one.eml")
        else:
            path = re.sub(r"\{(\w+)\}", lambda m: fill[m.group(1)], template)
        found.append((route.method, path))
    return sorted(set(found))


@pytest.mark.slow
async def test_every_route_refuses_strangers_beyond_loopback(start: Start) -> None:
    running = await start()
    assert running.service.app is not None
    routes = concrete_routes(running.service.app)
    assert len(routes) >= 18, routes  # the API, the pages, the outbox, login/logout, health
    for method, path in routes:
        status, headers, body = await running.call(method, path)
        assert RECIPIENT not in body and "203.0.113" not in body and "secret agent" not in body, path
        if (method, path) == ("POST", "/login"):
            assert status == 403 and "form expired" in body  # no CSRF token: see test_aggregator_login
            continue
        if path in OPEN_PATHS:
            assert status in (200, 503), (method, path, status)  # /readyz: 503 while catching up
            continue
        if path.startswith("/api/"):
            assert status == 401, (method, path, status, body)
            assert headers["Content-Type"].startswith("application/json") and '"error"' in body
            assert headers["WWW-Authenticate"].startswith("Bearer")
        else:
            assert status == 401, (method, path, status)
            assert headers["Content-Type"].startswith("text/html")
            assert 'action="/login"' in body and 'name="token"' in body, path
    # With the full token every one of them answers, the recipient included.
    status, _, body = await running.call("GET", f"/api/messages/{TRACKING_ID}", FULL)
    assert status == 200 and RECIPIENT in body


async def test_read_tokens_read_and_full_tokens_refresh(start: Start) -> None:
    running = await start()
    reads = [
        "/api/campaigns",
        f"/api/campaigns/{CAMPAIGN}/statistics",
        f"/api/campaigns/{CAMPAIGN}/events",
        f"/api/campaigns/{CAMPAIGN}/export.csv",
        "/api/events",
        f"/api/messages/{TRACKING_ID}",
        "/campaigns/",
        f"/campaigns/{CAMPAIGN}/statistics/",
        "/events/",
        f"/messages/{TRACKING_ID}/",
        "/outbox/",
    ]
    for path in reads:
        for token in (READ, FULL):
            status, _, body = await running.call("GET", path, token)
            assert status == 200, (path, status, body[:200])
    refresh = f"/api/campaigns/{CAMPAIGN}/refresh"
    status, headers, body = await running.call("POST", refresh, READ)
    assert status == 403 and headers["Content-Type"].startswith("application/json")
    assert "read-only" in body
    status, _, body = await running.call("POST", refresh, FULL)
    assert status == 200 and '"sent_count": 1' in body
    # A wrong token, an empty one, or another scheme: 401, saying the token is invalid when one was sent.
    for header in (f"Bearer {FULL}x", "Bearer ", "Bearer", f"Basic {FULL}", FULL):
        status, headers, _ = await running.call("GET", "/api/campaigns", headers={"Authorization": header})
        assert status == 401, header
        assert headers["WWW-Authenticate"].startswith('Bearer realm="mailbeacon"')
    _, headers, _ = await running.call("GET", "/api/campaigns", "w" * 40)
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_tokens_are_enforced_on_loopback_too(start: Start) -> None:
    running = await start(aggregator_listen="127.0.0.1:0")
    status, _, _ = await running.call("GET", "/api/campaigns")
    assert status == 401
    status, _, _ = await running.call("GET", "/api/campaigns", READ)
    assert status == 200


async def test_loopback_without_tokens_stays_open(start: Start) -> None:
    running = await start(aggregator_listen="127.0.0.1:0", api_tokens="", api_read_tokens="")
    status, _, body = await running.call("GET", f"/api/messages/{TRACKING_ID}")
    assert status == 200 and RECIPIENT in body
    status, _, body = await running.call("GET", "/campaigns/")
    assert status == 200 and CAMPAIGN in body and "Log out" not in body


async def test_opt_out_serves_openly_and_warns(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aggregator.service"):
        running = await start(api_tokens="", api_read_tokens="", api_auth="none")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("MAILBEACON_API_AUTH=none" in w and "0.0.0.0:0" in w for w in warnings), warnings
    status, _, _ = await running.call("GET", "/api/campaigns")
    assert status == 200


async def aggregator_command(env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailbeacon.app.cli",
        "aggregator",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode()


def command_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBEACON_")}
    env.update(
        MAILBEACON_DATA_DIR=str(tmp_path / "data"),
        # Nothing listens there: a refusal must come before any connection is tried.
        MAILBEACON_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        MAILBEACON_AGGREGATOR_LISTEN=f"0.0.0.0:{free_port()}",
    )
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({}, "MAILBEACON_API_TOKENS"),
        ({"MAILBEACON_API_TOKENS": "short-secret-token"}, "MAILBEACON_API_TOKENS: token 1 has 18 characters"),
        (
            {"MAILBEACON_API_TOKENS": FULL, "MAILBEACON_API_READ_TOKENS": "tiny-read-secret"},
            "MAILBEACON_API_READ_TOKENS: token 1 has 16",
        ),
        ({"MAILBEACON_AUTH_PROXY_HEADER": "X-Forwarded-Email"}, "MAILBEACON_TRUSTED_PROXIES, which is empty"),
        (
            {"MAILBEACON_API_AUTH": "none", "MAILBEACON_API_TOKENS": FULL},
            "MAILBEACON_API_AUTH=none contradicts",
        ),
    ],
)
async def test_an_aggregator_that_would_be_open_refuses_to_start(
    tmp_path: Path, extra: dict[str, str], named: str
) -> None:
    code, output = await aggregator_command(command_env(tmp_path, **extra))
    assert code != 0
    lines = output.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], output
    assert "Traceback" not in output
    assert "short-secret-token" not in output and "tiny-read-secret" not in output and FULL not in output


async def test_an_auth_proxy_is_believed_only_from_trusted_proxies(start: Start) -> None:
    header = {"X-Forwarded-Email": "ops@example.com"}
    trusted = await start(auth_proxy_header="X-Forwarded-Email", trusted_proxies="127.0.0.1/32")
    status, _, body = await trusted.call("GET", f"/api/messages/{TRACKING_ID}", headers=header)
    assert status == 200 and RECIPIENT in body
    status, _, body = await trusted.call("GET", "/campaigns/", headers=header)
    assert status == 200 and CAMPAIGN in body
    status, _, _ = await trusted.call("GET", "/api/campaigns", headers={"X-Forwarded-Email": " "})
    assert status == 401
    # The proxy may pass its own Authorization header on: the user it vouches for still counts.
    status, _, _ = await trusted.call(
        "GET", "/api/campaigns", headers={**header, "Authorization": "Bearer proxy-id-token"}
    )
    assert status == 200
    # A peer outside TRUSTED_PROXIES cannot claim to be anyone; tokens still work.
    untrusted = await start(auth_proxy_header="X-Forwarded-Email", trusted_proxies="10.0.0.0/8")
    status, _, body = await untrusted.call("GET", f"/api/messages/{TRACKING_ID}", headers=header)
    assert status == 401 and RECIPIENT not in body
    status, _, body = await untrusted.call("GET", "/campaigns/", headers=header)
    assert status == 401 and 'name="token"' in body
    status, _, _ = await untrusted.call("GET", "/api/campaigns", READ, headers=header)
    assert status == 200


EXPECTED_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def test_every_answer_carries_the_security_headers(start: Start) -> None:
    running = await start()
    assert running.service.app is not None
    answers = []
    for method, path in concrete_routes(running.service.app):
        if method == "GET" and path.endswith("/stream"):  # endless: its headers only
            for token in (FULL, None):
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with running.http.get(running.base + path, headers=headers) as response:
                    answers.append((path, response.status, CIMultiDict(response.headers), ""))
        elif method == "GET":
            answers.append((path, *(await running.call("GET", path, FULL))))
            answers.append((path, *(await running.call("GET", path))))
    answers.append(("404", *(await running.call("GET", "/nothing/here/", FULL))))
    answers.append(("400", *(await running.call("GET", "/messages/not-a-uuid/", FULL))))
    answers.append(("api 400", *(await running.call("GET", "/api/events?since=yesterday", FULL))))
    html = 0
    for path, status, headers, _ in answers:
        assert headers["X-Content-Type-Options"] == "nosniff", (path, status)
        if not headers.get("Content-Type", "").startswith("text/html"):
            continue
        html += 1
        if path.endswith("/body") and status == 200:  # the outbox's message: framed by the outbox page only
            assert "frame-ancestors 'self'" in headers["Content-Security-Policy"]
            assert "sandbox" in headers["Content-Security-Policy"]
            continue
        assert {k: headers.get(k) for k in EXPECTED_HEADERS} == EXPECTED_HEADERS, (path, status)
        policy = headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert headers["Cache-Control"] == "no-store"
    assert html >= 20


async def test_sqlite_file_is_the_aggregators_alone(start: Start, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # whatever the umask: a directory others may read, as before
    running = await start(aggregator_listen="127.0.0.1:0")
    assert running.service.settings.aggregator.database_url is None  # the default file under DATA_DIR
    database = data / "mailbeacon.db"
    files = [database, data / "mailbeacon.db-wal", data / "mailbeacon.db-shm"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))
    assert stat.S_IMODE(data.stat().st_mode) == 0o755  # not ours to change: the files are closed


def test_a_database_file_made_readable_earlier_is_closed(tmp_path: Path) -> None:
    from aggregator.store.db import open_database

    path = tmp_path / "old" / "mailbeacon.db"
    path.parent.mkdir()
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    os.chmod(path.parent, 0o755)
    open_database(f"sqlite:///{path}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fresh = tmp_path / "new" / "deeper" / "mailbeacon.db"
    open_database(f"sqlite:///{fresh}")
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700  # made for it: this user's alone


def test_settings_never_show_tokens() -> None:
    settings = Settings(api_tokens=f"{FULL},{FULL}2", api_read_tokens=READ, api_token=FULL)
    shown = repr(settings) + str(settings.model_dump())
    assert FULL not in shown and READ not in shown
