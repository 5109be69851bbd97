"""What a request's handlers know about its authentication, and the cookies of the pages.

Forms carry a CSRF token: with a login session, the session's own (``Session.csrf_token``);
without one (loopback without tokens, an auth proxy, the login form itself), the value of a
random ``mailbeacon_csrf`` cookie, which only pages of this site can read back into a form
(double submit).
"""

from __future__ import annotations

import hmac
import re
import secrets
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from aggregator.auth.policy import Access, AuthPolicy
from aggregator.auth.sessions import Session

POLICY_KEY = web.AppKey("auth_policy", AuthPolicy)
CSRF_COOKIE = "mailbeacon_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_WELL_FORMED = re.compile(r"^[0-9a-f]{32}$")

Via = Literal["open", "bearer", "session", "proxy"]


@dataclass(frozen=True)
class Identity:
    access: Access
    via: Via
    session: Session | None = None
    user: str | None = None


@dataclass(frozen=True)
class PageAuth:
    """What a page shows for its visitor: the CSRF token of its forms, a logout button for a
    login session, and no state-changing buttons for read-only access."""

    identity: Identity
    csrf: str
    new_csrf_cookie: bool = False

    @property
    def can_change(self) -> bool:
        return self.identity.access >= Access.FULL

    @property
    def can_log_out(self) -> bool:
        return self.identity.session is not None


# The guard sets it around the handler (same task, so the handler sees it): pages render
# their forms and header from it. Not request storage: aiohttp's typed request keys are
# newer than the aiohttp this project supports.
_CURRENT: ContextVar[PageAuth | None] = ContextVar("mailbeacon_page_auth", default=None)


def page_auth(request: web.Request) -> PageAuth:
    """The request's :class:`PageAuth`; open full access when no guard ran (a bare app)."""
    found = _CURRENT.get()
    if found is not None:
        return found
    return PageAuth(Identity(Access.FULL, "open"), request.cookies.get(CSRF_COOKIE, ""))


def set_page_auth(page: PageAuth | None) -> Token[PageAuth | None]:
    return _CURRENT.set(page)


def reset_page_auth(token: Token[PageAuth | None]) -> None:
    _CURRENT.reset(token)


def is_https(request: web.Request, policy: AuthPolicy) -> bool:
    """Whether the browser talks https: directly, or to a trusted proxy that says so."""
    if request.secure:
        return True
    if not policy.trusts(request.remote):
        return False
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0]
    return forwarded.strip().lower() == "https"


def form_csrf(request: web.Request, session: Session | None) -> tuple[str, bool]:
    """The CSRF token a page's forms carry, and whether its cookie is new (to be set)."""
    if session is not None:
        return session.csrf_token(), False
    existing = request.cookies.get(CSRF_COOKIE, "")
    if _WELL_FORMED.match(existing):
        return existing, False
    return secrets.token_hex(16), True


def csrf_matches(request: web.Request, submitted: str, session: Session | None) -> bool:
    if not submitted:
        return False
    if session is not None:
        expected = session.csrf_token()
    else:
        expected = request.cookies.get(CSRF_COOKIE, "")
        if not _WELL_FORMED.match(expected):
            return False
    return hmac.compare_digest(submitted.encode(), expected.encode())


async def submitted_csrf(request: web.Request) -> str:
    """The CSRF token a POST carries: the X-CSRF-Token header, else the form field."""
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        value = (await request.post()).get(CSRF_FIELD)
        return value if isinstance(value, str) else ""
    return ""


def set_cookie(
    response: web.StreamResponse,
    request: web.Request,
    name: str,
    value: str,
    *,
    max_age: int | None = None,
) -> None:
    """A cookie only this site's pages send back: HttpOnly, SameSite=Strict, Path=/, and
    Secure whenever the browser talks https."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=is_https(request, request.app[POLICY_KEY]),
    )
