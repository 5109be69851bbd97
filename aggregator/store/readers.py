"""Which mail client and kind of device a person's open came from, by its User-Agent.

Pure functions (docs/aggregator.md "Insights": clients and devices). ``ua-parser`` names the
browser or app and the operating system; the rules here turn that into a mail client
and one of :data:`DEVICES`:

- the families the tracker knows by their proxies come first: Gmail's image proxy
  (``GoogleImageProxy``: Gmail, webmail), Yahoo's (``YahooMailProxy``: Yahoo Mail,
  webmail) and Apple Mail Privacy Protection's bare ``Mozilla/5.0`` (Apple Mail, device
  unknown). The tracker flags these opens as automated, so they reach the clients only
  when an open carrying such a user agent was not flagged;
- mail apps by name (Apple Mail, Outlook, Thunderbird, ...); on iOS an embedded web view
  without a browser's ``Safari/`` token is the Mail app;
- a web browser means the message was read in a webmail page: client
  ``Webmail (<browser>)``, device ``webmail``;
- everything else is client ``Other``. Only the names listed here are ever returned, so
  the number of clients a campaign can have stays small whatever user agents arrive.

The device of a mail app comes from its operating system: iPhone, Android with the
``Mobile`` token and other phone systems are ``mobile``; iPad and Android without it
(Google's rule for tablets) ``tablet``; Windows, macOS, Linux and ChromeOS ``desktop``.

Parsing one user agent takes about half a millisecond; mail comes back from the same
few clients all day, so each distinct user agent is parsed once (:func:`reader_of` is
cached).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from ua_parser import parse

DEVICES: tuple[str, ...] = ("desktop", "mobile", "tablet", "webmail", "unknown")
OTHER = "Other"
UNKNOWN_DEVICE = "unknown"
# Longest user agent looked at: the families are decided in the first few hundred characters.
_AGENT_LIMIT = 512

APPLE_PRIVACY_PROXY_AGENT = "Mozilla/5.0"
_PROXIES: tuple[tuple[str, str], ...] = (
    ("googleimageproxy", "Gmail"),
    ("yahoomailproxy", "Yahoo Mail"),
    ("ymailproxy", "Yahoo Mail"),
)
# ua-parser family -> mail client.
MAIL_APPS: dict[str, str] = {
    "Apple Mail": "Apple Mail",
    "Outlook": "Outlook",
    "Outlook-iOS": "Outlook",
    "Outlook-Android": "Outlook",
    "Windows Live Mail": "Windows Live Mail",
    "Thunderbird": "Thunderbird",
    "Lotus Notes": "IBM Notes",
    "Airmail": "Airmail",
    "Postbox": "Postbox",
    "YahooMobileMail": "Yahoo Mail",
    "GmailImageProxy": "Gmail",
    "YahooMailProxy": "Yahoo Mail",
    "Chrome Mobile WebView": "Android mail app",
}
# ua-parser family of a web browser (the message was read in a webmail page).
BROWSERS: frozenset[str] = frozenset(
    {
        "Chrome",
        "Chrome Mobile",
        "Chrome Mobile iOS",
        "Chromium",
        "Firefox",
        "Firefox Mobile",
        "Firefox iOS",
        "Safari",
        "Mobile Safari",
        "Edge",
        "Edge Mobile",
        "IE",
        "Opera",
        "Opera Mobile",
        "Samsung Internet",
        "Yandex Browser",
        "Brave",
        "Vivaldi",
        "UC Browser",
        "DuckDuckGo Mobile",
    }
)
_PHONE_SYSTEMS = frozenset({"Windows Phone", "BlackBerry OS", "KaiOS", "Symbian OS", "Firefox OS"})
_DESKTOP_SYSTEMS = frozenset(
    {"Windows", "Mac OS X", "Linux", "Ubuntu", "Chrome OS", "Fedora", "Debian", "FreeBSD", "OpenBSD"}
)


class Reader(NamedTuple):
    client: str
    device: str


# Every client name reader_of can return.
CLIENTS: frozenset[str] = frozenset({OTHER, *MAIL_APPS.values(), *(f"Webmail ({b})" for b in BROWSERS)})


def _device(agent: str, system: str | None, model: str | None) -> str:
    if system in ("iOS", "iPadOS"):
        return "tablet" if model == "iPad" or "ipad" in agent.lower() else "mobile"
    if system == "Android":
        return "mobile" if "mobile" in agent.lower() else "tablet"
    if system in _PHONE_SYSTEMS:
        return "mobile"
    if system in _DESKTOP_SYSTEMS:
        return "desktop"
    return UNKNOWN_DEVICE


@lru_cache(maxsize=8192)
def reader_of(user_agent: str | None) -> Reader:
    """The mail client and device of a person's open with this User-Agent (see the module)."""
    agent = (user_agent or "").strip()[:_AGENT_LIMIT]
    if not agent:
        return Reader(OTHER, UNKNOWN_DEVICE)
    if agent == APPLE_PRIVACY_PROXY_AGENT:
        return Reader("Apple Mail", UNKNOWN_DEVICE)
    lowered = agent.lower()
    for needle, client in _PROXIES:
        if needle in lowered:
            return Reader(client, "webmail")
    result = parse(agent)
    family = result.user_agent.family if result.user_agent else None
    system = result.os.family if result.os else None
    model = result.device.family if result.device else None
    if family in BROWSERS:
        return Reader(f"Webmail ({family})", "webmail")
    if family in MAIL_APPS:
        return Reader(MAIL_APPS[family], _device(agent, system, model))
    if family == "Mobile Safari UI/WKWebView" and system in ("iOS", "iPadOS") and "safari/" not in lowered:
        return Reader("Apple Mail", _device(agent, system, model))
    return Reader(OTHER, _device(agent, system, model))
