"""The few HTML pages a recipient can see: invalid link, unsubscribe confirmation and result."""

from __future__ import annotations

from html import escape

from aiohttp import web

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="robots" content="noindex,nofollow"><title>{title}</title></head>
<body style="font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem">
{body}
</body></html>"""

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Referrer-Policy": "no-referrer",
}


def page(title: str, body: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        text=_PAGE.format(title=escape(title), body=body),
        content_type="text/html",
        headers=PAGE_HEADERS,
    )


def invalid_link(reason: str) -> web.Response:
    return page(
        "Invalid link",
        f"<h1>This link is not valid</h1><p>{escape(reason)}</p>"
        "<p>The link may have been altered or cut off. Please use the original link from the email.</p>",
        400,
    )


def honeypot() -> web.Response:
    # Nobody can see the link that leads here; whatever follows it gets an empty page.
    return page("", "", 200)


def _leaving(list_name: str | None) -> str:
    return f"<strong>{escape(list_name)}</strong>" if list_name else "this mailing"


def unsubscribe_confirm(action: str, list_name: str | None = None) -> web.Response:
    """GET: changes nothing (link scanners follow GETs); only the button's POST unsubscribes.
    ``list_name``: the list the link leaves, when the link carries it signed."""
    heading = f"Unsubscribe from {escape(list_name)}?" if list_name else "Unsubscribe from these emails?"
    return page(
        "Unsubscribe",
        f"<h1>{heading}</h1>"
        f"<p>Press the button to stop receiving {_leaving(list_name)} at this address.</p>"
        f'<form method="post" action="{escape(action)}">'
        '<input type="hidden" name="confirm" value="page">'
        '<button type="submit" style="font-size:1.1rem;padding:.5rem 1.2rem">Unsubscribe</button>'
        "</form>",
    )


def unsubscribed(list_name: str | None = None) -> web.Response:
    return page(
        "Unsubscribed",
        f"<h1>You are unsubscribed</h1><p>You will not receive {_leaving(list_name)} at this address any more.</p>",
    )


def unsubscribe_refused(reason: str) -> web.Response:
    return page("Unsubscribe", f"<h1>Nothing was changed</h1><p>{escape(reason)}</p>", 400)
