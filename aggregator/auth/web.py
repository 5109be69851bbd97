"""The guard in front of every route of the aggregator, and the headers of every answer.

``/healthz``, ``/readyz``, ``/metrics`` (no personal data), the stylesheet and the login
form are open. Everything else needs credentials unless the policy is open: the API answers
401 JSON without them and 403 when they may only read, pages answer with the login form.
State-changing requests from other sites are refused in every mode, and page forms must
carry their CSRF token.
"""

from __future__ import annotations

import time
from html import escape

from aiohttp import web

from aggregator.auth import sessions
from aggregator.auth.context import (
    CSRF_COOKIE,
    POLICY_KEY,
    Identity,
    PageAuth,
    csrf_matches,
    form_csrf,
    reset_page_auth,
    set_cookie,
    set_page_auth,
    submitted_csrf,
)
from aggregator.auth.login import (
    LOGIN_PATH,
    LOGOUT_PATH,
    STYLESHEET_PATH,
    add_login_routes,
    login_page,
    shell,
)
from aggregator.auth.policy import (
    SAFE_METHODS,
    Access,
    AuthPolicy,
    bearer_token,
    cross_origin,
    local_path,
    needed_access,
)
from mailbeacon.web.server import Handler, json_error

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", STYLESHEET_PATH, LOGIN_PATH})
# Pages load only their own stylesheet: no inline style or script anywhere, so nothing
# injected into a page could run or restyle it, and no other site may frame it.
CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Recipients, addresses and statistics stay out of shared caches and the back button
    # after a logout; a route that may be cached (the stylesheet) says so itself.
    "Cache-Control": "no-store",
}


def identify(request: web.Request, policy: AuthPolicy) -> tuple[Identity | None, bool]:
    """Who sent the request (None: nobody known), and whether it carried a bearer token.

    A trusted auth proxy's header comes first: such a proxy may pass its own
    ``Authorization`` header on, which is no token of ours.
    """
    if policy.open:
        return Identity(Access.FULL, "open"), False
    if policy.proxy_header and policy.trusts(request.remote):
        user = request.headers.get(policy.proxy_header, "").strip()
        if user:
            return Identity(Access.FULL, "proxy", user=user), False
    token = bearer_token(request.headers.get("Authorization"))
    if token is not None:
        credential = policy.credential_for(token) if token else None
        return (Identity(credential.access, "bearer") if credential else None), True
    session = sessions.verify(request.cookies.get(sessions.SESSION_COOKIE), policy, time.time())
    if session is not None:
        return Identity(session.access, "session", session), False
    return None, False


def _refusal(api: bool, status: int, reason: str) -> web.Response:
    if api:
        return json_error(status, reason)
    return shell("Refused", f'<h1>Refused</h1><p class="error">{escape(reason)}</p>', status)


def _unauthorized(bad_token: bool) -> web.Response:
    response = json_error(
        401,
        "that token is not valid"
        if bad_token
        else "authentication required: send Authorization: Bearer <token>",
    )
    challenge = 'Bearer realm="mailbeacon"' + (', error="invalid_token"' if bad_token else "")
    response.headers["WWW-Authenticate"] = challenge
    return response


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    policy = request.app[POLICY_KEY]
    api = request.path.startswith("/api/")
    headers = request.headers
    if cross_origin(request.method, headers.get("Origin"), headers.get("Sec-Fetch-Site"), request.host):
        return _refusal(api, 403, "cross-origin request refused")
    if request.path in OPEN_PATHS:
        return await handler(request)
    identity, bearer_sent = identify(request, policy)
    if identity is None:
        if api:
            return _unauthorized(bearer_sent)
        wanted = request.path_qs if request.method in SAFE_METHODS else "/campaigns/"
        return login_page(request, local_path(wanted), 401, "That token is not valid." if bearer_sent else "")
    needed = Access.READ if request.path == LOGOUT_PATH else needed_access(request.method)
    if identity.access < needed:
        return _refusal(api, 403, "read-only access: this needs one of the aggregator's full-access tokens")
    # A bearer token is sent by programs, never by a browser on its own; everything else is.
    if request.method not in SAFE_METHODS and identity.via != "bearer":
        if api and identity.via == "session":
            return _refusal(api, 403, "the API takes changes with Authorization: Bearer only")
        if not api and not csrf_matches(request, await submitted_csrf(request), identity.session):
            return _refusal(api, 403, "the form has expired: reload the page and try again")
    csrf, new_cookie = form_csrf(request, identity.session)
    token = set_page_auth(PageAuth(identity, csrf, new_cookie))
    try:
        response = await handler(request)
    finally:
        reset_page_auth(token)
    if new_cookie and not response.prepared and response.content_type == "text/html":
        set_cookie(response, request, CSRF_COOKIE, csrf)  # for the page's forms, not the API's JSON
    return response


async def security_headers(_: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def install(app: web.Application, policy: AuthPolicy) -> None:
    """Put ``policy`` in front of ``app``'s routes (the app lists :func:`guard` among its
    middlewares) and the login routes and security headers on it."""
    app[POLICY_KEY] = policy
    app.on_response_prepare.append(security_headers)
    add_login_routes(app)
