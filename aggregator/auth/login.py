"""The pages' login form and logout: a token once, then a signed session cookie."""

from __future__ import annotations

import asyncio
import logging
import time
from html import escape

from aiohttp import web

from aggregator.auth import sessions
from aggregator.auth.context import (
    CSRF_COOKIE,
    CSRF_FIELD,
    POLICY_KEY,
    csrf_matches,
    form_csrf,
    set_cookie,
)
from aggregator.auth.policy import local_path

log = logging.getLogger(__name__)

LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
STYLESHEET_PATH = "/static/mailbeacon.css"
# A wrong token costs its sender a second: with tokens of 24+ random characters guessing is
# hopeless anyway; the delay keeps a guessing script from costing the aggregator much.
FAILED_LOGIN_DELAY = 1.0


def shell(title: str, body: str, status: int = 200, header: str = "") -> web.Response:
    """An HTML page around ``body`` with the site's stylesheet (no inline style or script:
    the Content-Security-Policy allows neither)."""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)} · mailbeacon</title><link rel="stylesheet" href="{STYLESHEET_PATH}"></head>
<body><header><a href="/campaigns/"><strong>mailbeacon</strong></a>{header}</header><main>{body}</main></body></html>"""
    return web.Response(text=page, content_type="text/html", status=status)


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def login_page(request: web.Request, next_path: str, status: int = 200, error: str = "") -> web.Response:
    """The login form (the answer to any page asked for without credentials, with 401)."""
    policy = request.app[POLICY_KEY]
    csrf, new_cookie = form_csrf(request, None)
    if policy.credentials:
        notice = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
        body = (
            f'<h1>Log in</h1>{notice}<form class="login" method="post" action="{LOGIN_PATH}">'
            f'<input type="hidden" name="{CSRF_FIELD}" value="{csrf}">'
            f'<input type="hidden" name="next" value="{escape(next_path)}">'
            '<label for="token">Access token</label>'
            '<input id="token" type="password" name="token" autocomplete="current-password" required autofocus>'
            '<button type="submit">Log in</button></form>'
            '<p class="muted">One of the aggregator\'s API tokens (a read-only one shows the pages '
            "but cannot refresh statistics). The session lasts 12 hours.</p>"
        )
    else:
        body = "<h1>Log in</h1><p>This aggregator lets people in through its authenticating proxy only.</p>"
    response = shell("Log in", body, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="mailbeacon"'
    if new_cookie:
        set_cookie(response, request, CSRF_COOKIE, csrf)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    policy = request.app[POLICY_KEY]
    if request.method != "POST":
        target = local_path(request.query.get("next"))
        if policy.open or sessions.verify(request.cookies.get(sessions.SESSION_COOKIE), policy, time.time()):
            return see_other(target)
        return login_page(request, target)
    form = await request.post()
    target = local_path(str(form.get("next", "")))
    if policy.open:
        return see_other(target)
    if not csrf_matches(request, str(form.get(CSRF_FIELD, "")), None):
        # Login CSRF: another site cannot log a browser in with the attacker's token.
        return login_page(request, target, 403, "The form expired. Please log in again.")
    credential = policy.credential_for(str(form.get("token", "")))
    if credential is None:
        log.warning("aggregator login refused: wrong token from %s", request.remote)
        await asyncio.sleep(FAILED_LOGIN_DELAY)
        return login_page(request, target, 401, "That token is not valid.")
    response = see_other(target)
    set_cookie(
        response,
        request,
        sessions.SESSION_COOKIE,
        sessions.issue(credential, time.time()),
        max_age=sessions.SESSION_SECONDS,
    )
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """Ends the browser's session (the guard checked its CSRF token first)."""
    response = see_other(LOGIN_PATH)
    response.del_cookie(sessions.SESSION_COOKIE, path="/", httponly=True, samesite="Strict")
    return response


def add_login_routes(app: web.Application) -> None:
    app.router.add_get(LOGIN_PATH, login)
    app.router.add_post(LOGIN_PATH, login)
    app.router.add_post(LOGOUT_PATH, logout)
