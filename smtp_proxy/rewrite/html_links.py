"""HTML rewriting for tracking: signed click links, the open pixel and the honeypot link.

Works on the HTML text with a small tag scanner instead of parsing and re-serialising
the document, so every character except the rewritten ``href`` values and the inserted
pixel stays exactly as the sender wrote it (mail clients are picky about markup).

Scanning happens once per message and yields an :class:`HtmlTemplate`: the literal
text between link values plus one slot per trackable link. Each recipient's copy is
then a cheap fill-in of the slots with that copy's signed URLs.
"""

from __future__ import annotations

import fnmatch
import html
import html.entities
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Elements whose href is a link a person can click: anchors, image-map areas and
# Outlook's VML shapes (bullet-proof buttons live inside conditional comments).
_TAG = re.compile(
    r"<(?P<tag>a|area|v:[a-z]+)(?=[\s/>])(?P<attrs>(?:[^>\"']|\"[^\"]*\"|'[^']*')*)>",
    re.IGNORECASE,
)
# An unquoted value runs to whitespace or ">" (HTML5): "=", quotes and "<" inside it are
# parse errors a browser keeps in the value, so ``href=https://x/?a=1&b=2`` is one URL.
_HREF = re.compile(
    r"(?P<pre>(?:^|(?<=[\s\"']))href\s*=\s*)(?:\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)'|(?P<uq>[^\s\"'>][^\s>]*))",
    re.IGNORECASE,
)
_NOTRACK_ATTR = re.compile(
    r"\s+data-notrack(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?(?=[\s/>]|$)",
    re.IGNORECASE,
)
# ``https+notrack://...`` (or ``+notrack:https://...``): leave the link alone, drop the marker.
_NOTRACK_SCHEME = re.compile(r"^(\s*)(?:\+notrack:)?(https?)(?:\+notrack)?(?=://)", re.IGNORECASE)
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"https?://[^\s<>\"']+", re.IGNORECASE)
_UNSUBSCRIBE_WORDS = re.compile(r"unsubscribe|opt-?out|optout", re.IGNORECASE)
_TAB_OR_NEWLINE = re.compile(r"[\t\r\n]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NUMERIC_REFERENCE = re.compile(r"&#(?:[xX]([0-9a-fA-F]+)|([0-9]+));?")
# The candidate references html.unescape itself finds (numeric, or a name of up to 32 characters).
_CHARACTER_REFERENCE = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_BLOCKS_LEGACY_REFERENCE = re.compile(r"[A-Za-z0-9=]")


def _control_reference(match: re.Match[str]) -> str:
    hexadecimal, decimal = match.groups()
    code = int(hexadecimal, 16) if hexadecimal else int(decimal)
    return chr(code) if code < 0x20 or code == 0x7F else match.group(0)


def _attribute_reference(match: re.Match[str]) -> str:
    name = match.group(1)
    if name.startswith("#") or name in html.entities.html5:
        return html.unescape(match.group(0))
    # A legacy reference without ``;`` (``&sect``, ``&times``, ``&not``): the longest
    # known prefix. Inside an attribute a browser leaves it as written when the next
    # character is alphanumeric or ``=`` (HTML5 "character reference in attribute"), so
    # ``?id=1&section=2`` keeps its ``&section=2`` where html.unescape makes it ``§ion=2``.
    for length in range(len(name) - 1, 1, -1):
        prefix = name[:length]
        if prefix in html.entities.html5:
            if _BLOCKS_LEGACY_REFERENCE.match(name, length):
                return match.group(0)
            return html.entities.html5[prefix] + name[length:]
    return match.group(0)


def unescape_attribute(value: str) -> str:
    """Character references decoded as a browser decodes them in an attribute.

    ``html.unescape`` drops references to most control characters, where a browser keeps
    them (``&#1;`` is U+0001 to it): they are decoded here first, so such a link is seen
    for what it is. Legacy named references without ``;`` follow the attribute rule.
    """
    value = _NUMERIC_REFERENCE.sub(_control_reference, value)
    if "&" not in value:
        return value
    return _CHARACTER_REFERENCE.sub(_attribute_reference, value)


def browser_url(value: str) -> str:
    """An ``href`` value (entities already decoded) as a browser follows it.

    The URL standard drops every ASCII tab and line break anywhere in a URL and trims
    the ends, so ``https://shop.example/&#10;sale`` leads to ``https://shop.example/sale``.
    The signed click URL must carry that destination, not one the redirect cannot use.
    """
    return _TAB_OR_NEWLINE.sub("", value).strip()


@dataclass(frozen=True)
class LinkPolicy:
    """Which destinations of one message get wrapped (the same for every recipient)."""

    is_ours: Callable[[str], bool]
    skip_globs: Sequence[str] = ()
    unsubscribe_urls: frozenset[str] = frozenset()

    def should_track(self, url: str) -> bool:
        lowered = url.lower()
        if not (lowered.startswith("http://") or lowered.startswith("https://")):
            return False  # mailto:, tel:, #anchors, merge tags, javascript: ...
        if _CONTROL.search(url):
            return False  # no browser would follow it as written: not ours to sign
        if self.is_ours(url) or url in self.unsubscribe_urls:
            return False
        if _UNSUBSCRIBE_WORDS.search(url):
            return False  # unsubscribe must never count as a click nor break one-click
        return not any(fnmatch.fnmatchcase(url, glob) for glob in self.skip_globs)


@dataclass(frozen=True)
class LinkSlot:
    """One trackable ``href`` value: ``original`` is the value as written, quotes included."""

    url: str
    quote: str
    original: str


class _Marker:
    """Where the pixel and honeypot go (just before the last ``</body>``)."""


PIXEL_MARK = _Marker()
Piece = str | LinkSlot | _Marker


@dataclass
class HtmlTemplate:
    pieces: list[Piece]
    links: list[str]
    changed: bool  # markers were removed, so even an untracked rendering differs from the input

    def render(self, wrap: Callable[[str], str] | None, extra_html: str = "") -> str:
        out: list[str] = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
            elif isinstance(piece, LinkSlot):
                if wrap is None:
                    out.append(piece.original)
                else:
                    out.append(piece.quote + quote_attr(wrap(piece.url), piece.quote) + piece.quote)
            else:
                out.append(extra_html)
        return "".join(out)


def quote_attr(url: str, quote: str) -> str:
    escaped = url.replace("&", "&amp;")
    return escaped.replace('"', "&quot;") if quote == '"' else escaped.replace("'", "&#39;")


def scan_html(
    markup: str, policy: LinkPolicy, url_of: Callable[[str], str] = lambda value: value
) -> HtmlTemplate:
    """Split markup into literal text and trackable link slots.

    ``url_of`` turns the raw attribute text into a real string when the markup was
    decoded byte-for-byte (latin-1) rather than in its own charset.
    """
    pieces: list[Piece] = []
    links: list[str] = []
    changed = False
    literal_start = 0
    for tag in _TAG.finditer(markup):
        attrs_start, attrs_end = tag.span("attrs")
        attrs = tag.group("attrs")
        if _NOTRACK_ATTR.search(attrs):
            # The sender asked us to leave this link alone; the marker itself is ours to remove.
            pieces.append(markup[literal_start:attrs_start])
            pieces.append(_NOTRACK_ATTR.sub("", attrs))
            literal_start, changed = attrs_end, True
            continue
        href = _HREF.search(attrs)
        if href is None:
            continue
        group = "dq" if href.group("dq") is not None else "sq" if href.group("sq") is not None else "uq"
        value_start, value_end = href.span(group)
        raw_value = href.group(group)
        marker = _NOTRACK_SCHEME.match(raw_value)
        if marker and marker.group(0) != marker.group(1) + marker.group(2):
            pieces.append(markup[literal_start : attrs_start + value_start])
            pieces.append(_NOTRACK_SCHEME.sub(r"\1\2", raw_value, count=1))
            literal_start, changed = attrs_start + value_end, True
            continue
        # The raw bytes become text first: a reference may stand for any character (&sect; &#8364;).
        url = browser_url(unescape_attribute(url_of(raw_value)))
        if not policy.should_track(url):
            continue
        # The slot covers the value with its quotes, so an unquoted value can gain some.
        quote = "'" if group == "sq" else '"'
        slot_start = attrs_start + href.end("pre")
        slot_end = attrs_start + href.end()
        pieces.append(markup[literal_start:slot_start])
        pieces.append(LinkSlot(url, quote, markup[slot_start:slot_end]))
        links.append(url)
        literal_start = slot_end
    tail = markup[literal_start:]
    closes = list(_BODY_CLOSE.finditer(tail))
    if closes:
        at = closes[-1].start()
        pieces.extend([tail[:at], PIXEL_MARK, tail[at:]])
    else:
        pieces.extend([tail, PIXEL_MARK])
    return HtmlTemplate([p for p in pieces if not isinstance(p, str) or p], links, changed)


def pixel_tag(pixel_url: str) -> str:
    return (
        f'<img src="{html.escape(pixel_url)}" width="1" height="1" alt="" '
        'style="border:0;width:1px;height:1px;overflow:hidden" />'
    )


def honeypot_tag(honeypot_url: str) -> str:
    # No text, not displayed, not focusable, hidden from screen readers: only a robot
    # that follows every href it finds ever requests it.
    return (
        f'<a href="{quote_attr(honeypot_url, chr(34))}" style="display:none!important;mso-hide:all" '
        'aria-hidden="true" tabindex="-1"></a>'
    )


def scan_text(text: str, policy: LinkPolicy) -> HtmlTemplate:
    """An HTML rendering of a plain-text body: escaped, line breaks kept, URLs as (tracked) links."""
    pieces: list[Piece] = [
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head>\n<body><div style="font-family:monospace">'
    ]
    links: list[str] = []
    position = 0

    def escaped(chunk: str) -> str:
        return html.escape(chunk).replace("\r\n", "\n").replace("\n", "<br>\n")

    for match in _URL_IN_TEXT.finditer(text):
        url = match.group(0).rstrip(".,;:!?)]}")
        end = match.start() + len(url)
        pieces.append(escaped(text[position : match.start()]) + "<a href=")
        plain = '"' + quote_attr(url, '"') + '"'
        if policy.should_track(url):
            pieces.append(LinkSlot(url, '"', plain))
            links.append(url)
        else:
            pieces.append(plain)
        pieces.append(f">{html.escape(url)}</a>")
        position = end
    pieces.extend([escaped(text[position:]) + "</div>\n", PIXEL_MARK, "</body></html>\n"])
    return HtmlTemplate(pieces, links, changed=True)
