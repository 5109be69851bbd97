"""The parts of a message that carry tracking: HTML parts, and a text part given an HTML alternative.

Each leaf is scanned once per message; :meth:`render` then fills in one copy's links and
pixel. Nothing here re-reads a part's header block per copy: the only header change a
copy can need (a switch to quoted-printable) is made once and kept.
"""

from __future__ import annotations

import codecs
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from smtp_proxy.rewrite import mime
from smtp_proxy.rewrite.html_links import HtmlTemplate, LinkPolicy, scan_html, scan_text
from smtp_proxy.rewrite.mime import Buffer, Part

_MAX_LINE = 998  # RFC 5322 line limit for 7bit/8bit bodies
# Encodings in which ASCII bytes can stand for something else: these are decoded and
# re-encoded; every other charset is scanned byte for byte (as latin-1), so no byte of
# the HTML outside the rewritten values can change.
_STATEFUL_CODECS = ("iso2022", "utf_16", "utf_32", "utf_7", "hz")
# Text signed or encrypted in place (RFC 4880 cleartext signature, ASCII armour).
_INLINE_PGP = ("-----BEGIN PGP SIGNED MESSAGE-----", "-----BEGIN PGP MESSAGE-----")


class RewriteError(ValueError):
    """The message cannot be rewritten safely; relay it unchanged."""


@dataclass
class Fill:
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


class HtmlLeaf:
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

    @cached_property
    def _quoted_printable_headers(self) -> bytes:
        return mime.set_header(
            self.part.headers, "Content-Transfer-Encoding", "quoted-printable", self.part.eol
        )

    def render(self, fill: Fill) -> tuple[bytes, Buffer]:
        """The part's header block and body for one copy."""
        wrap = fill.wrap if self.template.links else None
        extra = fill.take_extra()
        part = self.part
        if wrap is None and not extra and not self.template.changed:
            return part.headers, part.body
        markup = self.template.render(wrap, extra)
        data = markup.encode("latin-1") if self.byte_exact else markup.encode(self.codec)
        encoding, headers = part.transfer_encoding, part.headers
        if encoding not in ("base64", "quoted-printable") and mime.longest_line(data) > _MAX_LINE:
            # Longer links can push a line past the SMTP limit; quoted-printable keeps it legal.
            encoding, headers = "quoted-printable", self._quoted_printable_headers
        body = mime.encode_body(data, encoding, part.eol)
        if encoding == "base64" and bytes(part.body[-1:]) != b"\n":
            body = body.rstrip(b"\r\n")  # the line break before the next delimiter belongs to it
        return headers, body


class TextLeaf:
    """A text-only message gains an HTML alternative, so it can carry links and a pixel."""

    def __init__(self, part: Part, policy: LinkPolicy) -> None:
        self.part = part
        codec, _ = _codec(part.charset)
        text = mime.decode_body(part).decode(codec, "replace")
        self.empty = not text.strip()
        self.inline_pgp = any(armour in text for armour in _INLINE_PGP)
        self.template: HtmlTemplate = scan_text(text, policy)
        self.boundary = f"=_mailbeacon_{uuid.uuid4().hex}"
        eol = part.eol
        # The part as it was, its last line break included: the one before the delimiter
        # belongs to the delimiter (RFC 2046 5.1.1), so the text keeps every byte.
        self._text_alternative = f"--{self.boundary}".encode() + eol + part.to_bytes() + eol
        self._headers = f'Content-Type: multipart/alternative; boundary="{self.boundary}"'.encode() + eol

    def render(self, fill: Fill) -> tuple[bytes, Buffer] | None:
        """The multipart/alternative replacing the text part, or None to leave the text as it is."""
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
            self._text_alternative
            + delimiter + eol + html_part.rstrip(b"\r\n") + eol
            + delimiter + b"--" + eol
        )  # fmt: skip
        return self._headers, body


Leaf = HtmlLeaf | TextLeaf
