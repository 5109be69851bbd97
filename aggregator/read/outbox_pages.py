"""Pages for the development outbox: what the proxy relayed, as recipients would see it."""

from __future__ import annotations

import asyncio
import email
import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import Message
from email.policy import default as default_policy
from email.utils import parsedate_to_datetime
from html import escape
from pathlib import Path

from aiohttp import web
from sqlalchemy import select

from aggregator.read.api import DB_KEY
from aggregator.read.pages import layout
from aggregator.store.models import MESSAGES

OUTBOX_KEY = web.AppKey("outbox_dir", Path)
TRACKING_HEADER = "X-Mailbeacon-Tracking-ID"
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
        return f"<pre style='white-space:pre-wrap'>{escape(content)}</pre>"  # its own CSP allows inline style
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


def sent_date(message: Message, path: Path) -> str:
    """The message's Date header as ``2026-12-07 15:02 UTC``; the file's time when it has none
    (or one no parser reads)."""
    try:
        moment = parsedate_to_datetime(header_text(message, "Date"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    except (TypeError, ValueError, IndexError):
        moment = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def attachments(message: Message) -> list[Message]:
    """The parts a mail client lists as attachments: marked so, or named, and not a body."""
    found = []
    for part in message.walk():
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        if disposition == "attachment" or (disposition != "inline" and part.get_filename()):
            found.append(part)
    return found


def _size(part: Message) -> int:
    payload = part.get_payload(decode=True)
    return len(payload) if isinstance(payload, bytes) else 0


async def campaigns_of(request: web.Request, tracking_ids: list[str]) -> dict[str, str]:
    """Each copy's campaign, from the aggregator's own records (the proxy strips X-Campaign)."""
    db = request.app.get(DB_KEY)
    wanted = sorted({t for t in tracking_ids if t})
    if db is None or not wanted:
        return {}
    async with db.read_engine.connect() as conn:
        rows = await conn.execute(
            select(MESSAGES.c.tracking_id, MESSAGES.c.campaign).where(MESSAGES.c.tracking_id.in_(wanted))
        )
        return {tracking_id: campaign for tracking_id, campaign in rows.all()}


def _campaign_link(campaign: str | None) -> str:
    if not campaign:
        return '<span class="muted">none</span>'
    return f'<a href="/campaigns/{escape(campaign)}/statistics/">{escape(campaign)}</a>'


async def outbox_list(request: web.Request) -> web.Response:
    directory = request.app[OUTBOX_KEY]
    files = sorted(directory.glob("*.eml"), key=lambda p: p.stat().st_mtime, reverse=True)[:MAX_LISTED]
    headers = await asyncio.to_thread(lambda: [(p, _load(p)) for p in files])
    tracked = {p: header_text(m, TRACKING_HEADER).strip() for p, m in headers}
    campaigns = await campaigns_of(request, list(tracked.values()))

    def row(p: Path, m: Message) -> str:
        date, campaign, attached = sent_date(m, p), campaigns.get(tracked[p]), len(attachments(m))
        files = f" <span class=muted>· {attached} attached</span>" if attached else ""
        return (
            f'<tr><td class="num hide-narrow">{escape(date)}</td>'
            f'<td><a href="/outbox/{escape(p.name)}">{escape(header_text(m, "Subject") or "(no subject)")}</a>{files}'
            f'<div class="show-narrow muted small">{escape(date)} · {escape(campaign or "no campaign")}</div></td>'
            f'<td class="hide-narrow">{_campaign_link(campaign)}</td>'
            f'<td class="addresses">{escape(header_text(m, "Delivered-To"))}</td>'
            f'<td class="addresses hide-narrow">{escape(header_text(m, "From"))}</td></tr>'
        )

    rows = "".join(row(p, m) for p, m in headers) or (
        '<tr><td colspan="5" class="muted">Nothing relayed yet.</td></tr>'
    )
    body = (
        f"<h1>Outbox</h1><p class=muted>Messages the proxy relayed, one copy per recipient, newest first, "
        f"kept in {escape(str(directory))}.</p>"
        "<div class=wrap tabindex=0><table id=outbox><thead><tr><th class='num hide-narrow' scope=col>Date</th>"
        "<th scope=col>Subject</th><th class=hide-narrow scope=col>Campaign</th><th scope=col>Recipient</th><th class=hide-narrow scope=col>From</th>"
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
    tracking_id = header_text(message, TRACKING_HEADER).strip()
    campaign = (await campaigns_of(request, [tracking_id])).get(tracking_id)
    # The body is a document of its own (/body): inside this page (srcdoc) it would fall
    # under this page's Content-Security-Policy, which refuses its styles and images.
    frame = (
        '<iframe class="message-frame" title="the message as its recipient sees it" '
        'sandbox="allow-popups allow-popups-to-escape-sandbox" '
        f'src="/outbox/{escape(path.name)}/body"></iframe>'
    )
    fields = [
        ("Subject", escape(header_text(message, "Subject"))),
        ("From", escape(header_text(message, "From"))),
        ("To", escape(header_text(message, "To"))),
        ("Cc", escape(header_text(message, "Cc"))),
        ("Delivered to", escape(header_text(message, "Delivered-To"))),
        ("Date", escape(sent_date(message, path))),
        ("Campaign", _campaign_link(campaign) if campaign else ""),
        ("Tracking id", _tracking_link(tracking_id) if tracking_id else ""),
    ]
    rows = "".join(
        f'<tr><th scope=row>{name}</th><td class="addresses">{value}</td></tr>'
        for name, value in fields
        if value
    )
    attached = attachments(message)
    files = "".join(
        f'<li><a href="/outbox/{escape(path.name)}/attachments/{number}">'
        f"{escape(part.get_filename() or f'attachment {number + 1}')}</a> "
        f'<span class="muted">{escape(part.get_content_type())}, {_size(part):,} bytes</span></li>'
        for number, part in enumerate(attached)
    )
    listing = f'<h2>Attachments</h2><ul id="attachments">{files}</ul>' if files else ""
    body = (
        f"<h1>{escape(header_text(message, 'Subject') or '(no subject)')}</h1><div class=wrap tabindex=0><table id=headers>"
        f'{rows}</table></div>{listing}<p><a href="/outbox/{escape(path.name)}/raw">Download .eml</a></p>{frame}'
    )
    return layout(request, "Outbox message", body)


async def outbox_attachment(request: web.Request) -> web.StreamResponse:
    """One attachment, always as a download (never shown inline under this site's origin)."""
    path = _file(request)
    message = await asyncio.to_thread(_load, path)
    number = request.match_info["number"]
    found = attachments(message)
    if not number.isascii() or not number.isdigit() or int(number) >= len(found):
        raise web.HTTPNotFound(text="no such attachment")
    part = found[int(number)]
    payload = part.get_payload(decode=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", part.get_filename() or f"attachment-{number}")[:100]
    return web.Response(
        body=payload if isinstance(payload, bytes) else b"",
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )


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
    app.router.add_get("/outbox/{name}/attachments/{number}", outbox_attachment)
