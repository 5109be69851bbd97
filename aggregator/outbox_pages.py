"""Pages for the development outbox: what the proxy relayed, as recipients would see it."""

from __future__ import annotations

import asyncio
import email
import re
from email.header import decode_header, make_header
from email.message import Message
from email.policy import default as default_policy
from html import escape
from pathlib import Path

from aiohttp import web

from aggregator.pages import layout

OUTBOX_KEY = web.AppKey("outbox_dir", Path)
_NAME = re.compile(r"^[A-Za-z0-9._-]+\.eml$")
MAX_LISTED = 200


def _file(request: web.Request) -> Path:
    name = request.match_info["name"]
    directory = request.app[OUTBOX_KEY]
    path = directory / name
    if not _NAME.match(name) or not path.is_file():
        raise web.HTTPNotFound(text="no such message in the outbox")
    return path


def _load(path: Path) -> Message:
    return email.message_from_bytes(path.read_bytes(), policy=default_policy)


def _html_of(message: Message) -> str | None:
    body = message.get_body(preferencelist=("html", "plain"))  # type: ignore[attr-defined]
    if body is None:
        return None
    try:
        content = _printable(body.get_content())
    except (LookupError, ValueError):  # an unknown charset or a broken transfer encoding
        payload = body.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if body.get_content_type() == "text/plain":
        return f"<pre style='white-space:pre-wrap'>{escape(content)}</pre>"
    return str(content)


def _printable(text: str) -> str:
    """Text that can be sent as UTF-8: undecodable bytes kept by the parser become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def header_text(message: Message, name: str) -> str:
    """A header for display, however malformed: the outbox shows what apps really sent.

    The modern parser raises on some addresses (``a@``, ``<``, a broken encoded word);
    then the encoded words are decoded the old way, and failing that the header is shown
    as it was received.
    """
    raw = next((value for key, value in message.raw_items() if key.lower() == name.lower()), None)
    if raw is None:
        return ""
    try:
        return _printable(str(message.get(name, "")))
    except Exception:  # any parser failure: fall back, never a 503
        pass
    try:
        return _printable(str(make_header(decode_header(str(raw)))))
    except Exception:  # even the old parser gave up: show it as received
        return _printable(str(raw))


def _tracking_link(tracking_id: str) -> str:
    if not tracking_id:
        return "untracked"
    return f'<a href="/messages/{escape(tracking_id)}/">{escape(tracking_id)}</a>'


async def outbox_list(request: web.Request) -> web.Response:
    directory = request.app[OUTBOX_KEY]
    files = sorted(directory.glob("*.eml"), key=lambda p: p.stat().st_mtime, reverse=True)[:MAX_LISTED]
    headers = await asyncio.to_thread(lambda: [(p, _load(p)) for p in files])
    rows = (
        "".join(
            f'<tr><td><a href="/outbox/{escape(p.name)}">{escape(header_text(m, "Subject") or "(no subject)")}</a></td>'
            f"<td>{escape(header_text(m, 'Delivered-To'))}</td><td>{escape(header_text(m, 'From'))}</td>"
            f"<td class=muted>{_tracking_link(header_text(m, 'X-Mailbeacon-Tracking-ID'))}</td></tr>"
            for p, m in headers
        )
        or '<tr><td colspan="4" class="muted">Nothing relayed yet.</td></tr>'
    )
    body = (
        f"<h1>Outbox</h1><p class=muted>Messages the proxy relayed, kept in {escape(str(directory))}.</p>"
        "<div class=wrap><table><thead><tr><th>Subject</th><th>To</th><th>From</th><th>Tracking id</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></div>"
    )
    return layout(request, "Outbox", body)


# A relayed message as its recipients' mail clients would show it: its own styles and remote
# images (the tracking pixel) load; no script runs (sandbox, an opaque origin), and only this
# site's outbox page may frame it.
MESSAGE_CSP = (
    "default-src 'none'; img-src * data:; style-src * 'unsafe-inline'; font-src * data:; "
    "sandbox allow-popups allow-popups-to-escape-sandbox; frame-ancestors 'self'"
)


async def outbox_message(request: web.Request) -> web.Response:
    path = _file(request)
    message = await asyncio.to_thread(_load, path)
    # The body is a document of its own (/body): inside this page (srcdoc) it would fall
    # under this page's Content-Security-Policy, which refuses its styles and images.
    frame = (
        '<iframe class="message-frame" title="message" '
        'sandbox="allow-popups allow-popups-to-escape-sandbox" '
        f'src="/outbox/{escape(path.name)}/body"></iframe>'
    )
    fields = "".join(
        f"<tr><th>{name}</th><td>{escape(header_text(message, name))}</td></tr>"
        for name in ("Subject", "From", "Delivered-To", "Date", "X-Mailbeacon-Tracking-ID")
    )
    body = (
        f"<h1>{escape(header_text(message, 'Subject') or '(no subject)')}</h1><table>{fields}</table><p>"
        f'<a href="/outbox/{escape(path.name)}/raw">Download .eml</a></p>{frame}'
    )
    return layout(request, "Outbox message", body)


async def outbox_body(request: web.Request) -> web.Response:
    path = _file(request)
    message = await asyncio.to_thread(_load, path)
    html = _html_of(message) or "<p>(no text body)</p>"
    headers = {"Content-Security-Policy": MESSAGE_CSP, "X-Frame-Options": "SAMEORIGIN"}
    return web.Response(text=html, content_type="text/html", headers=headers)


async def outbox_raw(request: web.Request) -> web.StreamResponse:
    path = _file(request)
    return web.FileResponse(path, headers={"Content-Type": "message/rfc822"})


def add_outbox_routes(app: web.Application, directory: Path) -> None:
    app[OUTBOX_KEY] = directory
    app.router.add_get("/outbox/", outbox_list)
    app.router.add_get("/outbox/{name}", outbox_message)
    app.router.add_get("/outbox/{name}/raw", outbox_raw)
    app.router.add_get("/outbox/{name}/body", outbox_body)
