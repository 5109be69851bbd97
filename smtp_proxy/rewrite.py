"""Turn one incoming message into one tracked copy for one recipient.

Pure: bytes in, bytes out. HTML parts get signed click links and the open pixel; a
message without HTML gets an HTML alternative made from its text; every other part,
attachments above all, is copied byte-for-byte. The caller relays the original
unchanged when this raises.
"""

from __future__ import annotations

import codecs
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailbeacon import signing
from smtp_proxy import mime
from smtp_proxy.html_links import LinkPolicy, insert_pixel, rewrite_links, text_to_html
from smtp_proxy.mime import Part

TRACKING_HEADER = "X-Mailbeacon-Tracking-ID"
# Headers apps use to talk to the proxy; they never leave it.
CONTROL_HEADERS = {"x-campaign"}
CONTROL_PREFIXES = ("x-mailbeacon-",)
_CONTENT_FIELDS = {"content-type", "content-transfer-encoding", "content-disposition", "content-id"}
_MAX_LINE = 998  # RFC 5322 line limit for 7bit/8bit bodies
_ANGLE_URL = re.compile(r"<\s*(https?://[^>\s]+)\s*>", re.IGNORECASE)


class RewriteError(ValueError):
    """The message cannot be rewritten safely; relay it unchanged."""


@dataclass(frozen=True)
class CopyTracking:
    site_url: str
    keys: Sequence[bytes]
    tracking_id: str
    track_opens: bool = True
    track_clicks: bool = True
    skip_links: Sequence[str] = ()
    unsubscribe_header: bool = False


@dataclass
class RewriteResult:
    content: bytes
    links_tracked: list[str] = field(default_factory=list)
    pixel_inserted: bool = False


@dataclass
class _Walk:
    tracking: CopyTracking
    policy: LinkPolicy
    convert_text: bool
    pixel_inserted: bool = False

    @property
    def pixel_url(self) -> str | None:
        if not self.tracking.track_opens or self.pixel_inserted:
            return None
        return signing.pixel_url(self.tracking.site_url, self.tracking.tracking_id)


def _decode_text(part: Part) -> tuple[str, str]:
    charset = part.charset
    if charset in ("us-ascii", "ascii"):
        charset = "utf-8"  # mislabelled 8-bit text is common; utf-8 with escapes round-trips it
    try:
        codecs.lookup(charset)
    except LookupError as exc:
        raise RewriteError(f"unknown charset {charset!r}") from exc
    return mime.decode_body(part).decode(charset, "surrogateescape"), charset


def _encode_text(part: Part, text: str, charset: str) -> Part:
    data = text.encode(charset, "surrogateescape")
    encoding = part.transfer_encoding
    headers = part.headers
    if encoding not in ("base64", "quoted-printable") and mime.longest_line(data) > _MAX_LINE:
        # Longer links can push a line past the SMTP limit; quoted-printable keeps it legal.
        encoding = "quoted-printable"
        headers = mime.set_header(headers, "Content-Transfer-Encoding", encoding, part.eol)
    body = mime.encode_body(data, encoding, part.eol)
    return Part(headers, part.separator or part.eol, body, part.parsed)


def _rewrite_html(part: Part, walk: _Walk) -> Part:
    markup, charset = _decode_text(part)
    if walk.tracking.track_clicks:
        markup = rewrite_links(markup, walk.policy)
    pixel = walk.pixel_url
    if pixel:
        markup = insert_pixel(markup, pixel)
        walk.pixel_inserted = True
    return _encode_text(part, markup, charset)


def _html_alternative(text_part: Part, walk: _Walk) -> tuple[str, bytes]:
    """A multipart/alternative holding the text part as it was and an HTML rendering of it."""
    text, _ = _decode_text(text_part)
    policy = walk.policy if walk.tracking.track_clicks else None
    markup = text_to_html(text, policy)
    pixel = walk.pixel_url
    if pixel:
        markup = insert_pixel(markup, pixel)
        walk.pixel_inserted = True
    eol = text_part.eol
    boundary = f"=_mailbeacon_{uuid.uuid4().hex}"
    html_part = (
        b"Content-Type: text/html; charset=utf-8"
        + eol
        + b"Content-Transfer-Encoding: quoted-printable"
        + eol
        + eol
        + mime.encode_body(markup.encode(), "quoted-printable", eol)
    )
    delimiter = f"--{boundary}".encode()
    body = (
        delimiter + eol + text_part.to_bytes().rstrip(b"\r\n") + eol
        + delimiter + eol + html_part.rstrip(b"\r\n") + eol
        + delimiter + b"--" + eol
    )  # fmt: skip
    return f'multipart/alternative; boundary="{boundary}"', body


def _walk(part: Part, walk: _Walk) -> Part | None:
    """The part rewritten, or None when it stays exactly as it was."""
    if part.is_attachment:
        return None
    content_type = part.content_type
    if content_type == "text/html":
        return _rewrite_html(part, walk)
    if content_type == "text/plain" and walk.convert_text:
        walk.convert_text = False
        content_type_value, body = _html_alternative(part, walk)
        headers = f"Content-Type: {content_type_value}".encode() + part.eol
        return Part(headers, part.eol, body, part.parsed)
    if not content_type.startswith("multipart/") or part.boundary is None:
        return None
    changed = False
    segments = []
    for is_part, data in mime.split_multipart(part.body, part.boundary):
        if is_part:
            new = _walk(Part.parse(data), walk)
            if new is not None:
                data, changed = new.to_bytes(), True
        segments.append(data)
    if not changed:
        return None
    return Part(part.headers, part.separator, b"".join(segments), part.parsed)


def _has_html(part: Part) -> bool:
    if part.is_attachment:
        return False
    if part.content_type == "text/html":
        return True
    if part.content_type.startswith("multipart/") and part.boundary is not None:
        return any(
            _has_html(Part.parse(data))
            for is_part, data in mime.split_multipart(part.body, part.boundary)
            if is_part
        )
    return False


def existing_unsubscribe_urls(message: Part) -> frozenset[str]:
    values = message.parsed.get_all("List-Unsubscribe") or []
    return frozenset(url for value in values for url in _ANGLE_URL.findall(str(value)))


def rewrite_copy(raw: bytes, tracking: CopyTracking) -> RewriteResult:
    message = Part.parse(raw)
    if not message.separator:
        raise RewriteError("message has no body")
    policy = LinkPolicy(
        wrap=lambda url: signing.click_url(tracking.site_url, tracking.keys, tracking.tracking_id, url),
        is_ours=lambda url: signing.is_tracking_url(tracking.site_url, url),
        skip_globs=tracking.skip_links,
        unsubscribe_urls=existing_unsubscribe_urls(message),
    )
    walk = _Walk(tracking, policy, convert_text=not _has_html(message))
    eol = message.eol
    if message.content_type == "text/plain" and walk.convert_text and not message.is_attachment:
        # The top level itself becomes multipart/alternative; its content fields move inside.
        content_fields = b"".join(
            f for f in mime.header_lines(message.headers) if mime.field_name(f) in _CONTENT_FIELDS
        )
        inner = Part.parse(content_fields + message.separator + message.body)
        walk.convert_text = False
        content_type_value, body = _html_alternative(inner, walk)
        headers = mime.remove_headers(message.headers, _CONTENT_FIELDS)
        if message.parsed.get("MIME-Version") is None:
            headers += b"MIME-Version: 1.0" + eol
        headers += f"Content-Type: {content_type_value}".encode() + eol
    else:
        rewritten = _walk(message, walk) or message
        headers, body = rewritten.headers, rewritten.body
    headers = mime.remove_headers(headers, CONTROL_HEADERS, CONTROL_PREFIXES)
    headers += f"{TRACKING_HEADER}: {tracking.tracking_id}".encode() + eol
    if tracking.unsubscribe_header:
        url = signing.unsubscribe_url(tracking.site_url, tracking.tracking_id)
        headers = mime.remove_headers(headers, {"list-unsubscribe", "list-unsubscribe-post"})
        headers += f"List-Unsubscribe: <{url}>".encode() + eol
        headers += b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" + eol
    return RewriteResult(headers + message.separator + body, list(policy.wrapped), walk.pixel_inserted)
