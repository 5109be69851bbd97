"""The pages' login over real HTTP: a token once through the form, then a signed session
cookie; CSRF tokens on every state-changing form; cross-origin posts refused in every mode
(issue 14, finding 5: "a cross-origin POST .../refresh works")."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from http.cookies import Morsel, SimpleCookie
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict
from nats.aio.client import Client as NATS

from aggregator.auth import sessions
from aggregator.auth.policy import Access, AuthPolicy, Credential, local_path
from tests.auth_support import CAMPAIGN, FULL, READ, RECIPIENT, Running, Start, aggregators

PAGE = f"/campaigns/{CAMPAIGN}/statistics/"
REFRESH_FORM = f"/campaigns/{CAMPAIGN}/refresh/"


@pytest.fixture
async def start(tmp_path: Path, nc: NATS, nats_url: str) -> AsyncIterator[Start]:
    async with aggregators(tmp_path, nc, nats_url) as starting:
        yield starting


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps no cookies itself: each test says which cookies it sends."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield http


def set_cookies(headers: CIMultiDict[str]) -> dict[str, Morsel[str]]:
    found: dict[str, Morsel[str]] = {}
    for header in headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        found.update(jar)
    return found


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, f"no {name} in the page"
    return match.group(1)


def cookie_header(**cookies: str) -> dict[str, str]:
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}


async def send(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: object
) -> tuple[int, CIMultiDict[str], str]:
    async with http.request(method, url, allow_redirects=False, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, CIMultiDict(response.headers), await response.text()


async def log_in(
    running: Running, http: aiohttp.ClientSession, token: str, next_path: str = PAGE
) -> tuple[str, CIMultiDict[str]]:
    """The login a person does: the form from the page asked for, then the token."""
    _, headers, page = await send(http, "GET", running.base + next_path)
    csrf = set_cookies(headers)["mailbeacon_csrf"].value
    status, headers, _ = await send(
        http,
        "POST",
        running.base + "/login",
        data={"token": token, "next": hidden(page, "next"), "csrf_token": hidden(page, "csrf_token")},
        headers=cookie_header(mailbeacon_csrf=csrf),
    )
    assert status == 303, status
    return set_cookies(headers)["mailbeacon_session"].value, headers


@pytest.mark.slow
async def test_login_logout_and_the_session_cookie(start: Start, browser: aiohttp.ClientSession) -> None:
    running = await start()
    status, headers, page = await send(browser, "GET", running.base + PAGE)
    assert status == 401 and 'name="token"' in page and RECIPIENT not in page
    csrf_cookie = set_cookies(headers)["mailbeacon_csrf"]
    assert csrf_cookie["httponly"] and csrf_cookie["samesite"] == "Strict" and csrf_cookie["path"] == "/"
    assert hidden(page, "csrf_token") == csrf_cookie.value and hidden(page, "next") == PAGE

    form = {"next": PAGE, "csrf_token": csrf_cookie.value}
    began = time.monotonic()
    status, headers, page = await send(
        browser,
        "POST",
        running.base + "/login",
        data={**form, "token": FULL + "x"},
        headers=cookie_header(mailbeacon_csrf=csrf_cookie.value),
    )
    assert status == 401 and "not valid" in page and "mailbeacon_session" not in set_cookies(headers)
    assert time.monotonic() - began >= 0.9  # a wrong token costs a second

    session, headers = await log_in(running, browser, FULL)
    assert headers["Location"] == PAGE
    cookie = set_cookies(headers)["mailbeacon_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert cookie["max-age"] == str(12 * 3600) and not cookie["secure"]  # plain http here
    assert FULL not in session

    status, _, page = await send(
        browser, "GET", running.base + PAGE, headers=cookie_header(mailbeacon_session=session)
    )
    assert status == 200 and "Log out" in page and "Refresh statistics" in page
    token = hidden(page, "csrf_token")
    with_session = cookie_header(mailbeacon_session=session, mailbeacon_csrf=csrf_cookie.value)
    # The refresh form posts with the session's CSRF token, and only with it.
    for refused in (
        {},
        {"csrf_token": csrf_cookie.value},
        {"csrf_token": token[:-1] + ("1" if token.endswith("0") else "0")},
    ):
        status, _, page = await send(
            browser, "POST", running.base + REFRESH_FORM, data=refused, headers=with_session
        )
        assert status == 403 and "expired" in page, refused
    status, headers, _ = await send(
        browser, "POST", running.base + REFRESH_FORM, data={"csrf_token": token}, headers=with_session
    )
    assert status == 303 and headers["Location"].endswith("/statistics/?refreshed=1")

    # The session reads the API (the page's CSV link); changes there need a bearer token.
    status, _, csv = await send(
        browser, "GET", f"{running.base}/api/campaigns/{CAMPAIGN}/export.csv", headers=with_session
    )
    assert status == 200 and RECIPIENT in csv
    status, _, body = await send(
        browser,
        "POST",
        f"{running.base}/api/campaigns/{CAMPAIGN}/refresh",
        headers={**with_session, "X-CSRF-Token": token},
    )
    assert status == 403 and "Bearer" in body

    status, headers, _ = await send(
        browser, "POST", running.base + "/logout", data={"csrf_token": token}, headers=with_session
    )
    assert status == 303 and headers["Location"] == "/login"
    gone = set_cookies(headers)["mailbeacon_session"]
    assert gone.value == "" and gone["max-age"] == "0"


async def test_the_login_form_resists_login_csrf(start: Start, browser: aiohttp.ClientSession) -> None:
    """Another site cannot log a browser in (with the attacker's token) through the form."""
    running = await start()
    for cookies, field in (({}, ""), ({}, "0" * 32), ({"mailbeacon_csrf": "1" * 32}, "0" * 32)):
        status, headers, page = await send(
            browser,
            "POST",
            running.base + "/login",
            data={"token": FULL, "next": PAGE, "csrf_token": field},
            headers=cookie_header(**cookies) if cookies else {},
        )
        assert status == 403 and "mailbeacon_session" not in set_cookies(headers), (cookies, field)
        assert "expired" in page


async def test_a_session_is_signed_bound_to_its_token_and_expires(
    start: Start, browser: aiohttp.ClientSession
) -> None:
    running = await start()
    session, _ = await log_in(running, browser, READ)

    async def shows_page(cookie: str, on: Running = running) -> bool:
        status, _, page = await send(
            browser, "GET", on.base + PAGE, headers=cookie_header(mailbeacon_session=cookie)
        )
        assert status in (200, 401) and (status == 200) == (RECIPIENT in page or "Log out" in page)
        return status == 200

    assert await shows_page(session)
    version, level, expires, nonce, fingerprint, mac = session.split(".")
    assert level == "read"
    tampered = [
        ".".join([version, "full", expires, nonce, fingerprint, mac]),  # a read session claiming full access
        ".".join([version, level, str(int(expires) + 3600), nonce, fingerprint, mac]),  # longer
        ".".join([version, level, expires, nonce, fingerprint, mac[:-1] + ("0" if mac[-1] != "0" else "1")]),
        session + "x",
        "",
        "v1.read.1.2.3.4",
    ]
    for cookie in tampered:
        assert not await shows_page(cookie), cookie

    # Expired: a session issued 12 h and a minute ago by the same token.
    policy = AuthPolicy((Credential(FULL.encode(), Access.FULL), Credential(READ.encode(), Access.READ)))
    read = policy.credential_for(READ)
    assert read is not None
    assert not await shows_page(sessions.issue(read, time.time() - 12 * 3600 - 60))
    assert await shows_page(sessions.issue(read, time.time() - 11 * 3600))

    # Another replica with the same tokens takes the session; one without that token does not.
    replica = await start()
    assert await shows_page(session, replica)
    revoked = await start(api_read_tokens="another-read-token-0123456789")
    assert not await shows_page(session, revoked)


async def test_a_read_only_session_cannot_change_anything(
    start: Start, browser: aiohttp.ClientSession
) -> None:
    running = await start()
    session, _ = await log_in(running, browser, READ)
    jar = cookie_header(mailbeacon_session=session)
    status, _, page = await send(browser, "GET", running.base + PAGE, headers=jar)
    assert status == 200 and "read-only" in page and "Refresh statistics" not in page
    token = hidden(page, "csrf_token")
    status, _, page = await send(
        browser, "POST", running.base + REFRESH_FORM, data={"csrf_token": token}, headers=jar
    )
    assert status == 403 and "read-only" in page
    status, headers, _ = await send(
        browser, "POST", running.base + "/logout", data={"csrf_token": token}, headers=jar
    )
    assert status == 303 and set_cookies(headers)["mailbeacon_session"].value == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/campaigns/",
        "/\\evil.example",
        "/\\/evil.example",
        "https://evil.example/",
        "/\t/evil.example",
        "/%0a/evil.example".replace("%0a", "\n"),
        "javascript:alert(1)",
        "evil.example",
        "",
    ],
)
async def test_login_returns_only_to_paths_of_this_site(
    start: Start, browser: aiohttp.ClientSession, target: str
) -> None:
    running = await start()
    csrf = "a" * 32
    status, headers, _ = await send(
        browser,
        "POST",
        running.base + "/login",
        data={"token": FULL, "next": target, "csrf_token": csrf},
        headers=cookie_header(mailbeacon_csrf=csrf),
    )
    assert status == 303 and headers["Location"] == "/campaigns/"


def test_local_paths_are_kept() -> None:
    for target in ("/events/?type=opened&since=2026-06-01", PAGE, "/messages/x/", "/"):
        assert local_path(target) == target


async def test_cookies_are_secure_behind_a_trusted_https_proxy(
    start: Start, browser: aiohttp.ClientSession
) -> None:
    https = {"X-Forwarded-Proto": "https"}
    trusted = await start(trusted_proxies="127.0.0.1/32")
    _, headers, _ = await send(browser, "GET", trusted.base + PAGE, headers=https)
    assert set_cookies(headers)["mailbeacon_csrf"]["secure"]
    _, headers = await log_in_over(trusted, browser, https)
    assert set_cookies(headers)["mailbeacon_session"]["secure"]
    untrusted = await start()  # TRUSTED_PROXIES empty: the header is anyone's claim
    _, headers, _ = await send(browser, "GET", untrusted.base + PAGE, headers=https)
    assert not set_cookies(headers)["mailbeacon_csrf"]["secure"]


async def log_in_over(
    running: Running, http: aiohttp.ClientSession, extra: dict[str, str]
) -> tuple[int, CIMultiDict[str]]:
    csrf = "b" * 32
    status, headers, _ = await send(
        http,
        "POST",
        running.base + "/login",
        data={"token": FULL, "next": PAGE, "csrf_token": csrf},
        headers={**extra, **cookie_header(mailbeacon_csrf=csrf)},
    )
    return status, headers


@pytest.mark.slow
@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({"Origin": "http://evil.example"}, True),
        ({"Sec-Fetch-Site": "cross-site"}, True),
        ({"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"}, True),
        ({"Origin": "null"}, True),
        ({"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}, True),
        # What browsers send for this site's own pages (Origin is "null" under no-referrer).
        ({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, False),
        ({"Origin": "SELF"}, False),
        ({}, False),  # no browser: the CLI, curl, the operator
    ],
)
async def test_cross_origin_posts_are_refused_even_on_loopback_without_tokens(
    start: Start, browser: aiohttp.ClientSession, headers: dict[str, str], refused: bool
) -> None:
    running = await start(aggregator_listen="127.0.0.1:0", api_tokens="", api_read_tokens="")
    headers = {k: v.replace("SELF", running.base) for k, v in headers.items()}
    status, _, body = await send(
        browser, "POST", f"{running.base}/api/campaigns/{CAMPAIGN}/refresh", headers=headers
    )
    assert status == (403 if refused else 200), body
    if refused:
        assert "cross-origin" in body
    # The page's form too, however good its CSRF token.
    csrf = "c" * 32
    status, _, _ = await send(
        browser,
        "POST",
        running.base + REFRESH_FORM,
        data={"csrf_token": csrf},
        headers={**headers, **cookie_header(mailbeacon_csrf=csrf)},
    )
    assert status == (403 if refused else 303)


async def test_pages_behind_an_auth_proxy_post_with_their_csrf_token(
    start: Start, browser: aiohttp.ClientSession
) -> None:
    running = await start(
        api_tokens="",
        api_read_tokens="",
        auth_proxy_header="X-Forwarded-Email",
        trusted_proxies="127.0.0.1/32",
    )
    user = {"X-Forwarded-Email": "ops@example.com"}
    status, headers, page = await send(browser, "GET", running.base + PAGE, headers=user)
    assert status == 200 and "Log out" not in page  # the proxy owns the login
    csrf = set_cookies(headers)["mailbeacon_csrf"].value
    assert hidden(page, "csrf_token") == csrf
    jar = {**user, **cookie_header(mailbeacon_csrf=csrf)}
    status, _, _ = await send(browser, "POST", running.base + REFRESH_FORM, data={}, headers=jar)
    assert status == 403
    status, _, _ = await send(
        browser, "POST", running.base + REFRESH_FORM, data={"csrf_token": csrf}, headers=jar
    )
    assert status == 303
    # Without the proxy's header: no token form to fill, the proxy is the way in.
    status, _, page = await send(browser, "GET", running.base + PAGE)
    assert status == 401 and 'name="token"' not in page and "authenticating proxy" in page
