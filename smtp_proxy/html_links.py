"""HTML rewriting for tracking: signed click links and the open pixel.

Works on the HTML text with a small tag scanner instead of parsing and re-serialising
the document, so every character except the rewritten ``href`` values and the inserted
pixel stays exactly as the sender wrote it (mail clients are picky about markup).
"""

from __future__ import annotations

import fnmatch
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Elements whose href is a link a person can click: anchors, image-map areas and
# Outlook's VML shapes (bullet-proof buttons live inside conditional comments).
_TAG = re.compile(
    r"<(?P<tag>a|area|v:[a-z]+)(?=[\s/>])(?P<attrs>(?:[^>\"']|\"[^\"]*\"|'[^']*')*)>",
    re.IGNORECASE,
)
_HREF = re.compile(
    r"(?P<pre>(?:^|(?<=[\s\"']))href\s*=\s*)(?:\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)'|(?P<uq>[^\s\"'=<>`]+))",
    re.IGNORECASE,
)
_NOTRACK = re.compile(
    r"\s+data-notrack(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?(?=[\s/>]|$)",
    re.IGNORECASE,
)
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"https?://[^\s<>\"']+", re.IGNORECASE)
_UNSUBSCRIBE_WORDS = re.compile(r"unsubscribe|opt-?out|optout", re.IGNORECASE)


@dataclass
class LinkPolicy:
    """Decides which destinations get wrapped and how; ``wrap`` builds the tracked URL."""

    wrap: Callable[[str], str]
    is_ours: Callable[[str], bool]
    skip_globs: Sequence[str] = ()
    unsubscribe_urls: frozenset[str] = frozenset()
    wrapped: list[str] = field(default_factory=list)

    def should_track(self, url: str) -> bool:
        lowered = url.lower()
        if not (lowered.startswith("http://") or lowered.startswith("https://")):
            return False  # mailto:, tel:, #anchors, merge tags, javascript: ...
        if self.is_ours(url) or url in self.unsubscribe_urls:
            return False
        if _UNSUBSCRIBE_WORDS.search(url):
            return False  # unsubscribe must never count as a click nor break one-click
        return not any(fnmatch.fnmatchcase(url, glob) for glob in self.skip_globs)


def _quote_attr(url: str, quote: str) -> str:
    escaped = url.replace("&", "&amp;")
    return escaped.replace('"', "&quot;") if quote == '"' else escaped.replace("'", "&#39;")


def rewrite_links(markup: str, policy: LinkPolicy) -> str:
    """Replace every trackable href with its tracked URL; nothing else changes."""

    def on_tag(tag_match: re.Match[str]) -> str:
        attrs = tag_match.group("attrs")
        if _NOTRACK.search(attrs):
            # The sender asked us to leave this link alone; the marker itself is ours to remove.
            start, end = tag_match.span("attrs")
            whole = tag_match.group(0)
            base = tag_match.start()
            return whole[: start - base] + _NOTRACK.sub("", attrs) + whole[end - base :]
        href = _HREF.search(attrs)
        if href is None:
            return tag_match.group(0)
        raw_value = href.group("dq") if href.group("dq") is not None else href.group("sq")
        if raw_value is None:
            raw_value = href.group("uq")
        url = html.unescape(raw_value).strip()
        if not policy.should_track(url):
            return tag_match.group(0)
        tracked = policy.wrap(url)
        policy.wrapped.append(url)
        quote = "'" if href.group("sq") is not None else '"'
        new_attrs = attrs[: href.start()] + href.group("pre") + quote + _quote_attr(tracked, quote) + quote
        new_attrs += attrs[href.end() :]
        whole = tag_match.group(0)
        base = tag_match.start()
        start, end = tag_match.span("attrs")
        return whole[: start - base] + new_attrs + whole[end - base :]

    return _TAG.sub(on_tag, markup)


def pixel_tag(pixel_url: str) -> str:
    return (
        f'<img src="{html.escape(pixel_url)}" width="1" height="1" alt="" '
        'style="border:0;width:1px;height:1px;overflow:hidden" />'
    )


def insert_pixel(markup: str, pixel_url: str) -> str:
    """Put the pixel just before the last ``</body>``, or at the very end without one."""
    closes = list(_BODY_CLOSE.finditer(markup))
    tag = pixel_tag(pixel_url)
    if not closes:
        return markup + tag
    at = closes[-1].start()
    return markup[:at] + tag + markup[at:]


def text_to_html(text: str, policy: LinkPolicy | None) -> str:
    """An HTML rendering of a plain-text body: escaped, line breaks kept, URLs as (tracked) links."""
    pieces: list[str] = []
    position = 0
    for match in _URL_IN_TEXT.finditer(text):
        url = match.group(0).rstrip(".,;:!?)]}")
        end = match.start() + len(url)
        pieces.append(html.escape(text[position : match.start()]))
        href = policy.wrap(url) if policy and policy.should_track(url) else url
        if policy and href != url:
            policy.wrapped.append(url)
        pieces.append(f'<a href="{_quote_attr(href, chr(34))}">{html.escape(url)}</a>')
        position = end
    pieces.append(html.escape(text[position:]))
    body = "".join(pieces).replace("\r\n", "\n").replace("\n", "<br>\n")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head>\n'
        f'<body><div style="font-family:monospace">{body}</div>\n</body></html>\n'
    )
