"""Turn one incoming message into tracked copies, one per recipient.

Pure: bytes in, bytes out. :class:`PreparedMessage` splits the message and scans its
HTML once; :meth:`PreparedMessage.render` then fills in one recipient's tracking id,
signed links, pixel and honeypot. HTML parts get the tracking; a message without HTML
gets an HTML alternative made from its text; every other part, attachments above all,
is passed through as slices of the received bytes. Signed or encrypted mail keeps its
body as it is. Every change to the header block that does not depend on the recipient
is made once here, so a copy costs no scan of the headers however large they are. The
caller relays the original unchanged when preparing raises.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from mailbeacon.contract import signing
from smtp_proxy.rewrite import mime
from smtp_proxy.rewrite.html_links import LinkPolicy, honeypot_tag, pixel_tag
from smtp_proxy.rewrite.leaves import Fill, HtmlLeaf, Leaf, RewriteError, TextLeaf
from smtp_proxy.rewrite.mime import Buffer, Part

TRACKING_HEADER = "X-Mailbeacon-Tracking-ID"
# Headers apps use to talk to the proxy; they never leave it.
CONTROL_HEADERS = frozenset({"x-campaign"})
CONTROL_PREFIXES = ("x-mailbeacon-",)
_CONTENT_FIELDS = frozenset(
    {"content-type", "content-transfer-encoding", "content-disposition", "content-id"}
)
_UNSUBSCRIBE_FIELDS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
_ANGLE_URL = re.compile(r"<\s*(https?://[^>\s]+)\s*>", re.IGNORECASE)
_DKIM_H_TAG = re.compile(r"(?:^|;)\s*h\s*=\s*([^;]*)", re.IGNORECASE)
# A signature covers its part byte for byte (RFC 1847, S/MIME, PGP/MIME), an encrypted part
# cannot be read: a message that carries one anywhere keeps its body untouched.
SIGNED_TYPES = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
        "application/pkcs7-signature",
        "application/x-pkcs7-signature",
        "application/pgp-signature",
        "application/pgp-encrypted",
    }
)


@dataclass(frozen=True)
class CopyTracking:
    """What one recipient's copy gets."""

    site_url: str
    keys: Sequence[bytes]
    tracking_id: str
    track_opens: bool = True
    track_clicks: bool = True
    honeypot: bool = True


Segment = bytes | memoryview | Leaf


@dataclass
class _Scan:
    policy: LinkPolicy
    convert_text: bool
    leaves: list[Leaf] = field(default_factory=list)


class _Signed(Exception):
    """The message carries a signed or encrypted part: its body must not change."""


def _leaf(part: Part, scan: _Scan) -> Leaf | None:
    if part.content_type in SIGNED_TYPES:
        raise _Signed(part.content_type)
    if part.is_attachment:
        return None
    if part.content_type == "text/html":
        return HtmlLeaf(part, scan.policy)
    if part.content_type == "text/plain" and scan.convert_text:
        leaf = TextLeaf(part, scan.policy)
        if leaf.inline_pgp:
            raise _Signed("inline PGP")  # an HTML alternative would show it unverifiable
        if leaf.empty:
            return None  # nothing to show, so nothing to track: a later text part may be
        scan.convert_text = False
        return leaf
    return None


def _body_segments(part: Part, scan: _Scan) -> list[Segment] | None:
    """The body of a multipart as fixed slices and leaves, or None when nothing in it changes."""
    if part.is_attachment or not part.content_type.startswith("multipart/") or part.boundary is None:
        return None
    segments: list[Segment] = []
    changed = False
    default_type = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
    for is_part, data in mime.split_multipart(part.body, part.boundary):
        if is_part:
            child = Part.parse(data, default_type)
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
    """One received message, split and scanned once; :meth:`render` makes each copy.

    ``protected`` names header fields a DKIM signature covers (left exactly as they
    are); ``drop`` names fields removed once for all copies because each copy gets its
    own (provider correlation) or none (the app's signature when the proxy re-signs).
    With ``unsubscribe_header`` a copy gets the proxy's RFC 8058 ``List-Unsubscribe``,
    unless the app wrote its own: that one stays, so the app keeps its requests. Its link
    carries ``list_name``, signed, for the unsubscribe page to say which list it leaves.

    What the proxy adds goes where every reader finds it: at the end of the header block,
    or before the first line a strict reader (RFC 5322's field syntax) takes for the start
    of the body; that line and the rest follow as ``header_tail``, byte for byte.
    """

    def __init__(
        self,
        message: Part,
        site_url: str,
        *,
        skip_links: Sequence[str] = (),
        protected: frozenset[str] = frozenset(),
        drop: frozenset[str] = frozenset(),
        unsubscribe_header: bool = False,
        list_name: str | None = None,
    ) -> None:
        if not message.separator:
            raise RewriteError("message has no body")
        fields = mime.header_lines(message.headers)
        strict_end = mime.strict_end(fields)  # every field before it is a field to every reader
        if strict_end is not None:
            rest = fields[strict_end:]
            if any(b":" not in field for field in rest if field.strip()):
                # Readers disagree on where such a header block ends: leave the message alone.
                raise RewriteError("malformed header block")
            if rest[0][:1] in (b" ", b"\t"):
                raise RewriteError("the header block starts with a folded line")  # ours would fold into it
        self.message = message
        self.eol = message.eol
        self.protected = protected
        names = {mime.field_name(field) for field in fields}
        self._has_mime_version = "mime-version" in names
        self.adds_unsubscribe = (
            unsubscribe_header and "list-unsubscribe" not in names and not protected & _UNSUBSCRIBE_FIELDS
        )
        self.list_name = list_name  # named on the unsubscribe page (the campaign's display name)
        if self.adds_unsubscribe:
            drop |= {"list-unsubscribe-post"}  # a stray one of the app's would contradict ours
        self.headers = mime.remove_headers(
            message.headers, set(CONTROL_HEADERS | drop), CONTROL_PREFIXES, protected
        )
        self.header_tail = b""
        self._cut_header_block = strict_end is not None
        if self._cut_header_block:
            self.headers, self.header_tail = mime.split_at_strict_end(self.headers)
        policy = LinkPolicy(
            is_ours=lambda url: signing.is_tracking_url(site_url, url),
            skip_globs=skip_links,
            unsubscribe_urls=existing_unsubscribe_urls(message),
        )
        # The message as a leaf carries only its content fields: those are all a copy
        # replaces, and a text part turned into an alternative takes nothing else along.
        content = b"".join(f for f in fields if mime.field_name(f) in _CONTENT_FIELDS)
        self._root_part = Part(content, message.separator, message.body)
        self.signed = False
        try:
            scan = _Scan(policy, convert_text=False)
            self.root_leaf, self.segments = self._scan(scan)
            if not scan.leaves:
                # No HTML anywhere: the first text part gets an HTML alternative instead.
                scan = _Scan(policy, convert_text=True)
                self.root_leaf, self.segments = self._scan(scan)
        except _Signed:
            # Nothing below the header block changes: no pixel, no links, no alternative.
            self.signed, scan = True, _Scan(policy, convert_text=False)
            self.root_leaf, self.segments = None, None
        self.leaves = scan.leaves

    def _scan(self, scan: _Scan) -> tuple[Leaf | None, list[Segment] | None]:
        root_leaf = _leaf(self._root_part, scan)
        if root_leaf is not None:
            scan.leaves.append(root_leaf)
            return root_leaf, None
        return None, _body_segments(self.message, scan)

    @property
    def links(self) -> list[str]:
        """Every trackable link of the message, in order (the same in each copy)."""
        return [url for leaf in self.leaves for url in leaf.template.links]

    @cached_property
    def _root_headers(self) -> tuple[bytes, bytes]:
        """The header block less the content fields, which the rendered leaf brings along
        (cut as ``headers`` and ``header_tail`` are)."""
        block = self.headers + self.header_tail
        headers = mime.remove_headers(block, set(_CONTENT_FIELDS), keep=self.protected)
        tail = b""
        if self._cut_header_block:
            headers, tail = mime.split_at_strict_end(headers)
        if isinstance(self.root_leaf, TextLeaf) and not self._has_mime_version:
            headers += b"MIME-Version: 1.0" + self.eol
        return headers, tail

    def _root(self, fill: Fill) -> tuple[list[bytes], bytes, Iterator[Buffer]]:
        message = self.message
        if self.root_leaf is not None:
            rendered = self.root_leaf.render(fill)
            if rendered is None:
                return [self.headers], self.header_tail, iter((message.body,))
            content_headers, body = rendered
            headers, tail = self._root_headers
            return [headers, content_headers], tail, iter((body,))
        if self.segments is None:
            return [self.headers], self.header_tail, iter((message.body,))
        return [self.headers], self.header_tail, self._segments(fill)

    def _segments(self, fill: Fill) -> Iterator[Buffer]:
        assert self.segments is not None
        for segment in self.segments:
            if isinstance(segment, (bytes, memoryview)):
                yield segment
                continue
            rendered = segment.render(fill)
            part = segment.part
            if rendered is None:
                yield from (part.headers, part.separator, part.body)
            else:
                headers, body = rendered
                yield from (headers, part.separator or self.eol, body)

    def render(self, tracking: CopyTracking, fields: bytes = b"") -> tuple[list[bytes], Iterator[Buffer]]:
        """One copy's header block (as pieces, the last ending in its line break) and body pieces.

        ``fields`` are further header lines of the copy's (the provider's correlation).
        """
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
        headers, tail, body = self._root(Fill(wrap, extra))
        headers.append(self.tracking_header(tracking.tracking_id))
        if self.adds_unsubscribe:
            url = signing.unsubscribe_url(
                tracking.site_url, tracking.tracking_id, tracking.keys, self.list_name
            )
            headers.append(
                f"List-Unsubscribe: <{url}>".encode() + self.eol
                + b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" + self.eol
            )  # fmt: skip
        headers.append(fields)
        if tail:
            headers.append(tail)
        return headers, body

    def tracking_header(self, tracking_id: str) -> bytes:
        return f"{TRACKING_HEADER}: {tracking_id}".encode() + self.eol

    def untouched(self, tracking_id: str, fields: bytes = b"") -> tuple[list[bytes], Iterator[Buffer]]:
        """The message as received, less the proxy's control headers (signed ones stay), with
        the copy's tracking id and ``fields``."""
        headers = [self.headers, self.tracking_header(tracking_id), fields]
        if self.header_tail:
            headers.append(self.header_tail)
        return headers, iter((self.message.body,))

    @property
    def separator(self) -> bytes:
        return self.message.separator
