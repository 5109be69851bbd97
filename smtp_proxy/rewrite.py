"""Turn one incoming message into tracked copies, one per recipient.

Pure: bytes in, bytes out. :func:`prepare` splits the message and scans its HTML once;
:meth:`PreparedMessage.render` then fills in one recipient's tracking id, signed links,
pixel and honeypot. HTML parts get the tracking; a message without HTML gets an HTML
alternative made from its text; every other part, attachments above all, is passed
through as slices of the received bytes. The caller relays the original unchanged when
this raises.
"""

from __future__ import annotations

import codecs
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from mailbeacon import signing
from smtp_proxy import mime
from smtp_proxy.html_links import HtmlTemplate, LinkPolicy, honeypot_tag, pixel_tag, scan_html, scan_text
from smtp_proxy.mime import Buffer, Part

TRACKING_HEADER = "X-Mailbeacon-Tracking-ID"
# Headers apps use to talk to the proxy; they never leave it.
CONTROL_HEADERS = frozenset({"x-campaign"})
CONTROL_PREFIXES = ("x-mailbeacon-",)
_CONTENT_FIELDS = {"content-type", "content-transfer-encoding", "content-disposition", "content-id"}
_MAX_LINE = 998  # RFC 5322 line limit for 7bit/8bit bodies
_ANGLE_URL = re.compile(r"<\s*(https?://[^>\s]+)\s*>", re.IGNORECASE)
_DKIM_H_TAG = re.compile(r"(?:^|;)\s*h\s*=\s*([^;]*)", re.IGNORECASE)
# Encodings in which ASCII bytes can stand for something else: these are decoded and
# re-encoded; every other charset is scanned byte for byte (as latin-1), so no byte of
# the HTML outside the rewritten values can change.
_STATEFUL_CODECS = ("iso2022", "utf_16", "utf_32", "utf_7", "hz")


class RewriteError(ValueError):
    """The message cannot be rewritten safely; relay it unchanged."""


@dataclass(frozen=True)
class CopyTracking:
    """What one recipient's copy gets."""

    site_url: str
    keys: Sequence[bytes]
    tracking_id: str
    track_opens: bool = True
    track_clicks: bool = True
    unsubscribe_header: bool = False
    honeypot: bool = True

    @property
    def tracks_anything(self) -> bool:
        return self.track_opens or self.track_clicks


@dataclass
class _Fill:
    """Per-copy state while rendering: the link wrapper and the pixel still to place."""

    wrap: Callable[[str], str] | None
    extra_html: str

    def take_extra(self) -> str:
        extra, self.extra_html = self.extra_html, ""
        return extra


def _codec(charset: str) -> tuple[str, bool]:
    """The codec to decode with, and whether the HTML can be scanned byte for byte."""
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return "utf-8", True  # an unknown label: the tag structure is still ASCII
    if name.startswith(_STATEFUL_CODECS):
        return name, False
    return ("utf-8" if name == "ascii" else name), True


def _encode_part(part: Part, data: bytes) -> tuple[bytes, bytes]:
    """Headers and body for new content, keeping the part's transfer encoding where legal."""
    encoding = part.transfer_encoding
    headers = part.headers
    if encoding not in ("base64", "quoted-printable") and mime.longest_line(data) > _MAX_LINE:
        # Longer links can push a line past the SMTP limit; quoted-printable keeps it legal.
        encoding = "quoted-printable"
        headers = mime.set_header(headers, "Content-Transfer-Encoding", encoding, part.eol)
    body = mime.encode_body(data, encoding, part.eol)
    if encoding == "base64" and bytes(part.body[-1:]) != b"\n":
        body = body.rstrip(b"\r\n")  # the line break before the next delimiter belongs to it
    return headers, body


class _HtmlLeaf:
    def __init__(self, part: Part, policy: LinkPolicy) -> None:
        self.part = part
        self.codec, self.byte_exact = _codec(part.charset)
        data = mime.decode_body(part)
        if self.byte_exact:
            codec = self.codec
            markup = data.decode("latin-1")
            self.template = scan_html(
                markup, policy, lambda raw: raw.encode("latin-1").decode(codec, "replace")
            )
        else:
            try:
                markup = data.decode(self.codec)
            except UnicodeDecodeError as exc:
                raise RewriteError(f"HTML part is not valid {self.codec}") from exc
            self.template = scan_html(markup, policy)

    def render(self, fill: _Fill) -> tuple[bytes, Buffer]:
        wrap = fill.wrap if self.template.links else None
        extra = fill.take_extra()
        if wrap is None and not extra and not self.template.changed:
            return self.part.headers, self.part.body
        markup = self.template.render(wrap, extra)
        data = markup.encode("latin-1") if self.byte_exact else markup.encode(self.codec)
        return _encode_part(self.part, data)


class _TextLeaf:
    """A text-only message gains an HTML alternative, so it can carry links and a pixel."""

    def __init__(self, part: Part, policy: LinkPolicy) -> None:
        self.part = part
        codec, _ = _codec(part.charset)
        self.template: HtmlTemplate = scan_text(mime.decode_body(part).decode(codec, "replace"), policy)
        self.boundary = f"=_mailbeacon_{uuid.uuid4().hex}"

    def render(self, fill: _Fill) -> tuple[bytes, Buffer] | None:
        wrap = fill.wrap if self.template.links else None
        extra = fill.take_extra()
        if wrap is None and not extra:
            return None  # nothing to track in this copy: the text stays as it was
        markup = self.template.render(wrap, extra)
        eol = self.part.eol
        html_part = (
            b"Content-Type: text/html; charset=utf-8" + eol
            + b"Content-Transfer-Encoding: quoted-printable" + eol + eol
            + mime.encode_body(markup.encode(), "quoted-printable", eol)
        )  # fmt: skip
        delimiter = f"--{self.boundary}".encode()
        body = (
            delimiter + eol + self.part.to_bytes().rstrip(b"\r\n") + eol
            + delimiter + eol + html_part.rstrip(b"\r\n") + eol
            + delimiter + b"--" + eol
        )  # fmt: skip
        headers = f'Content-Type: multipart/alternative; boundary="{self.boundary}"'.encode() + eol
        return headers, body


_Leaf = _HtmlLeaf | _TextLeaf
Segment = bytes | memoryview | _Leaf


@dataclass
class _Scan:
    policy: LinkPolicy
    convert_text: bool
    leaves: list[_Leaf] = field(default_factory=list)


def _leaf(part: Part, scan: _Scan) -> _Leaf | None:
    if part.is_attachment:
        return None
    if part.content_type == "text/html":
        return _HtmlLeaf(part, scan.policy)
    if part.content_type == "text/plain" and scan.convert_text:
        scan.convert_text = False
        return _TextLeaf(part, scan.policy)
    return None


def _body_segments(part: Part, scan: _Scan) -> list[Segment] | None:
    """The body of a multipart as fixed slices and leaves, or None when nothing in it changes."""
    if part.is_attachment or not part.content_type.startswith("multipart/") or part.boundary is None:
        return None
    segments: list[Segment] = []
    changed = False
    for is_part, data in mime.split_multipart(part.body, part.boundary):
        if is_part:
            child = Part.parse(data)
            leaf = _leaf(child, scan)
            if leaf is not None:
                scan.leaves.append(leaf)
                segments.append(leaf)
                changed = True
                continue
            inner = _body_segments(child, scan)
            if inner is not None:
                segments.append(child.headers + child.separator)
                segments.extend(inner)
                changed = True
                continue
        segments.append(data)
    return segments if changed else None


def dkim_signed_headers(message: Part) -> frozenset[str]:
    """Header names covered by the message's DKIM signatures (they must not be touched)."""
    names: set[str] = set()
    for value in message.parsed.get_all("DKIM-Signature") or []:
        match = _DKIM_H_TAG.search(re.sub(r"\s+", "", str(value)))
        if match:
            names.update(name.strip().lower() for name in match.group(1).split(":") if name.strip())
    return frozenset(names)


def existing_unsubscribe_urls(message: Part) -> frozenset[str]:
    values = message.parsed.get_all("List-Unsubscribe") or []
    return frozenset(url for value in values for url in _ANGLE_URL.findall(str(value)))


class PreparedMessage:
    """One received message, split and scanned once; :meth:`render` makes each copy."""

    def __init__(self, message: Part, site_url: str, skip_links: Sequence[str] = ()) -> None:
        if not message.separator:
            raise RewriteError("message has no body")
        if any(b":" not in field for field in mime.header_lines(message.headers) if field.strip()):
            # Readers disagree on where such a header block ends: leave the message alone.
            raise RewriteError("malformed header block")
        self.message = message
        self.eol = message.eol
        self.dkim_signed = message.parsed.get("DKIM-Signature") is not None
        self.protected = dkim_signed_headers(message)
        self.headers = mime.remove_headers(
            message.headers, set(CONTROL_HEADERS), CONTROL_PREFIXES, self.protected
        )
        policy = LinkPolicy(
            is_ours=lambda url: signing.is_tracking_url(site_url, url),
            skip_globs=skip_links,
            unsubscribe_urls=existing_unsubscribe_urls(message),
        )
        scan = _Scan(policy, convert_text=False)
        self.root_leaf, self.segments = self._scan(message, scan)
        if not scan.leaves:
            # No HTML anywhere: the first text part gets an HTML alternative instead.
            scan = _Scan(policy, convert_text=True)
            self.root_leaf, self.segments = self._scan(message, scan)
        self.leaves = scan.leaves

    @staticmethod
    def _scan(message: Part, scan: _Scan) -> tuple[_Leaf | None, list[Segment] | None]:
        root_leaf = _leaf(message, scan)
        if root_leaf is not None:
            scan.leaves.append(root_leaf)
            return root_leaf, None
        return None, _body_segments(message, scan)

    @property
    def links(self) -> list[str]:
        """Every trackable link of the message, in order (the same in each copy)."""
        return [url for leaf in self.leaves for url in leaf.template.links]

    def _root(self, fill: _Fill) -> tuple[bytes, Iterator[Buffer]]:
        message = self.message
        if self.root_leaf is not None:
            rendered = self.root_leaf.render(fill)
            if rendered is None:
                return self.headers, iter((message.body,))
            content_headers, body = rendered
            # The top-level part is itself the leaf: its content fields are replaced in place.
            headers = mime.remove_headers(self.headers, _CONTENT_FIELDS, keep=self.protected)
            if isinstance(self.root_leaf, _TextLeaf) and message.parsed.get("MIME-Version") is None:
                headers += b"MIME-Version: 1.0" + self.eol
            fields = [f for f in mime.header_lines(content_headers) if mime.field_name(f) in _CONTENT_FIELDS]
            return headers + b"".join(fields), iter((body,))
        if self.segments is None:
            return self.headers, iter((message.body,))
        return self.headers, self._segments(fill)

    def _segments(self, fill: _Fill) -> Iterator[Buffer]:
        assert self.segments is not None
        for segment in self.segments:
            if isinstance(segment, (bytes, memoryview)):
                yield segment
                continue
            rendered = segment.render(fill)
            if rendered is None:
                yield segment.part.to_bytes()
            else:
                headers, body = rendered
                yield headers
                yield segment.part.separator or self.eol
                yield body

    def render(self, tracking: CopyTracking) -> tuple[bytes, Iterator[Buffer]]:
        """One copy's header block (ending in its line break) and body pieces, in order."""
        wrap = None
        if tracking.track_clicks:
            site, keys, tid = tracking.site_url, tracking.keys, tracking.tracking_id
            wrap = lambda url: signing.click_url(site, keys, tid, url)  # noqa: E731
        extra = ""
        if tracking.track_clicks and tracking.honeypot:
            extra += honeypot_tag(
                signing.honeypot_url(tracking.site_url, tracking.keys, tracking.tracking_id)
            )
        if tracking.track_opens:
            extra += pixel_tag(signing.pixel_url(tracking.site_url, tracking.tracking_id))
        headers, body = self._root(_Fill(wrap, extra))
        headers += f"{TRACKING_HEADER}: {tracking.tracking_id}".encode() + self.eol
        if tracking.unsubscribe_header and not self.protected & {"list-unsubscribe", "list-unsubscribe-post"}:
            url = signing.unsubscribe_url(tracking.site_url, tracking.tracking_id)
            headers = mime.remove_headers(headers, {"list-unsubscribe", "list-unsubscribe-post"})
            headers += f"List-Unsubscribe: <{url}>".encode() + self.eol
            headers += b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" + self.eol
        return headers, body

    def untouched(self) -> tuple[bytes, Iterator[Buffer]]:
        """The message as received, less the proxy's control headers (signed ones stay)."""
        return self.headers, iter((self.message.body,))

    @property
    def separator(self) -> bytes:
        return self.message.separator


def prepare(raw: Buffer | Part, site_url: str, skip_links: Sequence[str] = ()) -> PreparedMessage:
    message = raw if isinstance(raw, Part) else Part.parse(raw)
    return PreparedMessage(message, site_url, skip_links)


def join(prepared: PreparedMessage, rendered: tuple[bytes, Iterator[Buffer]]) -> bytes:
    headers, body = rendered
    return b"".join([headers, prepared.separator, *(bytes(piece) for piece in body)])


@dataclass
class RewriteResult:
    content: bytes
    links_tracked: list[str] = field(default_factory=list)
    pixel_inserted: bool = False


def rewrite_copy(raw: Buffer, tracking: CopyTracking, skip_links: Sequence[str] = ()) -> RewriteResult:
    """Prepare and render one copy in one go (the handler prepares once for all recipients)."""
    prepared = prepare(raw, tracking.site_url, skip_links)
    content = join(prepared, prepared.render(tracking))
    wrapped = prepared.links if tracking.track_clicks else []
    return RewriteResult(content, wrapped, tracking.track_opens and bool(prepared.leaves))
