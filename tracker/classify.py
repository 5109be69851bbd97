"""Human or machine: the evidence that an open or a click was not a person reading the mail.

Plain functions over the shape of a request (method, headers, client address), so every
rule is testable without a server. Automated events are flagged, never dropped: the
aggregator reports human and total numbers side by side. The first matching rule wins,
most specific first, and its name goes into ``machine_kind``; ``evidence`` says what
matched so an operator can audit a verdict.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mailbeacon.contract.netaddr import normalize_ip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Engagement = Literal["open", "click"]

# Apple's own address space; Mail Privacy Protection fetches remote content from it (and
# from Private Relay partners, which is why the bare user agent below also counts).
APPLE_NETWORKS: tuple[Network, ...] = (
    ipaddress.ip_network("17.0.0.0/8"),
    ipaddress.ip_network("2620:149::/32"),
    ipaddress.ip_network("2a01:b740::/32"),
)
# Mail Privacy Protection announces itself with this exact, otherwise unused user agent.
APPLE_PROXY_USER_AGENT = "Mozilla/5.0"

# Mailbox providers that fetch images through their own proxy.
IMAGE_PROXY_AGENTS: tuple[tuple[str, str], ...] = (
    ("googleimageproxy", "gmail"),
    ("yahoomailproxy", "yahoo"),
    ("ymailproxy", "yahoo"),
    ("mail.ru imageproxy", "mail.ru"),
    ("imageproxy", "generic"),
)

# Mail security gateways and link checkers that fetch every link of incoming mail.
SCANNER_AGENTS: tuple[str, ...] = (
    "barracuda",
    "mimecast",
    "proofpoint",
    "urldefense",
    "symantec",
    "messagelabs",
    "trend micro",
    "trendmicro",
    "forcepoint",
    "sophos",
    "fortiguard",
    "fortinet",
    "ironport",
    "cisco",
    "zscaler",
    "paloalto",
    "checkpoint",
    "bitdefender",
    "kaspersky",
    "safelinks",
    "bingpreview",
    "headlesschrome",
    "phantomjs",
    "bot",
    "crawler",
    "spider",
    "scanner",
    "python-requests",
    "python-urllib",
    "aiohttp",
    "httpx",
    "curl/",
    "wget/",
    "go-http-client",
    "java/",
    "okhttp",
    "apache-httpclient",
    "libwww-perl",
    "scrapy",
    "node-fetch",
    "axios/",
    "postmanruntime",
)

# Chat and social apps that unfurl a link someone pasted: automated, not the recipient.
LINK_PREVIEW_AGENTS: tuple[str, ...] = (
    "slackbot",
    "slack-imgproxy",
    "facebookexternalhit",
    "twitterbot",
    "linkedinbot",
    "whatsapp",
    "telegrambot",
    "discordbot",
    "skypeuripreview",
    "microsoft teams",
)

PREFETCH_HEADERS: tuple[tuple[str, str], ...] = (
    ("Purpose", "prefetch"),
    ("Sec-Purpose", "prefetch"),
    ("X-Purpose", "preview"),
    ("X-Moz", "prefetch"),
)


@dataclass(frozen=True)
class RequestShape:
    """What the classifier looks at; built from an HTTP request or a provider's event."""

    method: str = "GET"
    user_agent: str | None = None
    ip: str | None = None  # the real client address, before any anonymization
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    machine_kind: str | None = None
    evidence: str | None = None

    @property
    def machine(self) -> bool:
        return self.machine_kind is not None


HUMAN = Verdict()


def _in(ip: str | None, networks: Sequence[Network]) -> bool:
    if not ip or not networks:
        return False
    address = normalize_ip(ip)
    return address is not None and any(address in network for network in networks)


def _apple(ip: str | None) -> bool:
    if not ip:
        return False
    if ip[0].isdigit() and "." in ip:  # the common IPv4 case without parsing: 17.0.0.0/8
        return ip.startswith("17.")
    return _in(ip, APPLE_NETWORKS)


def _prefetch(headers: Mapping[str, str]) -> str | None:
    for name, value in PREFETCH_HEADERS:
        offered = headers.get(name)
        if offered and value in offered.lower():
            return f"{name}: {offered[:40]}"
    return None


def _needles(needles: Sequence[str]) -> re.Pattern[str]:
    # One alternation searched in C instead of dozens of substring tests per request.
    return re.compile("|".join(re.escape(needle) for needle in needles))


_IMAGE_PROXY = _needles([needle for needle, _ in IMAGE_PROXY_AGENTS])
_IMAGE_PROXY_NAMES = dict(IMAGE_PROXY_AGENTS)
_LINK_PREVIEW = _needles(LINK_PREVIEW_AGENTS)
_SCANNER = _needles(SCANNER_AGENTS)


def classify(kind: Engagement, request: RequestShape, machine_networks: Sequence[Network] = ()) -> Verdict:
    """The verdict for one pixel load or click.

    ``machine_networks`` are operator-configured ranges (a mail gateway's egress) whose
    requests are always automated.
    """
    return judge(kind, request.method, request.user_agent, request.ip, request.headers, machine_networks)


def judge(
    kind: Engagement,
    method: str,
    user_agent: str | None,
    ip: str | None,
    headers: Mapping[str, str],
    machine_networks: Sequence[Network] = (),
) -> Verdict:
    """:func:`classify` over the request's parts, without building a :class:`RequestShape`.

    The tracker calls this on every pixel load and click.
    """
    if method != "GET" and method.upper() == "HEAD":
        return _HEAD
    prefetch = _prefetch(headers)
    if prefetch:
        return Verdict("prefetch", prefetch)
    raw_agent = user_agent.strip() if user_agent else ""
    apple_address = _apple(ip)
    if raw_agent == APPLE_PROXY_USER_AGENT:
        return _APPLE_AGENT_FROM_APPLE if apple_address else _APPLE_AGENT
    if kind == "open" and apple_address:
        # Mail Privacy Protection preloads every image from Apple's range; a person reading
        # mail on Apple's own network is rare enough not to count as an open.
        return Verdict("apple_privacy_proxy", f"image fetched from Apple's network {ip}")
    proxy, otherwise = _agent_verdicts(raw_agent)
    if proxy is not None:
        return proxy
    if machine_networks and _in(ip, machine_networks):
        return Verdict("security_scanner", f"address {ip} is in MACHINE_IP_RANGES")
    return otherwise


_HEAD = Verdict("head_request", "HEAD request: the body was never wanted")
_APPLE_AGENT_FROM_APPLE = Verdict(
    "apple_privacy_proxy", "bare 'Mozilla/5.0' user agent, from Apple's network"
)
_APPLE_AGENT = Verdict("apple_privacy_proxy", "bare 'Mozilla/5.0' user agent, Apple proxy user agent")


@functools.lru_cache(maxsize=4096)
def _agent_verdicts(raw_agent: str) -> tuple[Verdict | None, Verdict]:
    """What the user agent alone says: an image proxy (checked before the operator's ranges),
    else the verdict when the address is not in them.

    Mail comes back from the same few browsers, proxies and gateways all day, so the
    pattern searches run once per distinct agent instead of on every request.
    """
    agent = raw_agent.lower()
    proxy = _IMAGE_PROXY.search(agent)
    if proxy:
        name = proxy.group()
        return Verdict("image_proxy", f"{_IMAGE_PROXY_NAMES[name]} image proxy ({name})"), HUMAN
    if not agent:
        return None, Verdict("no_user_agent", "no User-Agent header")
    preview = _LINK_PREVIEW.search(agent)
    if preview:
        return None, Verdict("link_preview", f"user agent contains {preview.group()!r}")
    scanner = _SCANNER.search(agent)
    if scanner:
        return None, Verdict("security_scanner", f"user agent contains {scanner.group()!r}")
    return None, HUMAN


def honeypot() -> Verdict:
    return Verdict("honeypot", "clicked the hidden link no person can see")


def burst(distinct_links: int, seconds: float) -> Verdict:
    return Verdict("burst", f"{distinct_links} different links of one message within {seconds:.2f}s")
