"""What recipients hit: the open pixel, signed click redirects and the unsubscribe page.

These answer at once and never wait on NATS: their events go to the publisher's bounded
buffer (clicks first sit out the scanner-burst window), so a recipient sees the image,
the destination or the confirmation even while NATS is unreachable. Pixel and click
handlers only check what decides the answer; judging the request and encoding its event
happen a millisecond later, for all requests of that millisecond together
(:mod:`tracker.engagement.arrivals`).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import re
import time
from json.encoder import encode_basestring

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from mailbeacon.bus.fast_batch import MSG_ID_HEADER, Outgoing
from mailbeacon.bus.publisher import SUBJECTS, EventPublisher
from mailbeacon.contract import codec, signing
from mailbeacon.contract.events import (
    Event,
    EventType,
    derived_event_id,
    parse_tracking_id,
    storable_text,
    utcnow,
)
from mailbeacon.contract.netaddr import anonymize_ip, anonymize_text
from mailbeacon.contract.settings import Settings
from mailbeacon.web.server import json_error
from tracker import classify, metrics
from tracker.engagement import pages
from tracker.engagement.arrivals import Arrivals
from tracker.engagement.bursts import ClickHold
from tracker.engagement.privacy import client_ip

# The classic 43-byte 1x1 transparent GIF.
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
NO_STORE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
REDIRECT_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
# The same, ready for aiohttp: a copy of a CIMultiDict is cheaper than building one from a
# dict, on every pixel and click.
_PIXEL_HEADERS = CIMultiDict({**NO_STORE, "Content-Type": "image/gif"})
_REDIRECT_HEADERS = CIMultiDict(REDIRECT_HEADERS)
ONE_CLICK = "One-Click"


# C0 controls and DEL: no web address contains them once decoded, and a CR or LF in a
# Location header would split the response.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f]")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_tracking_id(value: str) -> str | None:
    """``parse_tracking_id`` with a fast path for the canonical form our links carry."""
    return value if _CANONICAL_UUID.fullmatch(value) else parse_tracking_id(value)


class EventIds:
    """Unique event ids without a system call per event: a random prefix and a counter.

    32 hex digits like ``new_event_id()``: 80 random bits drawn once per process (again in
    a forked child) followed by a 48-bit counter, so two processes never share a prefix in
    practice and one process never repeats an id.
    """

    def __init__(self) -> None:
        self.restart()
        os.register_at_fork(after_in_child=self.restart)

    def restart(self) -> None:
        self._prefix = os.urandom(10).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


log = logging.getLogger(__name__)
new_engagement_id = EventIds()
_SUBJECT_OPENED, _SUBJECT_CLICKED = SUBJECTS[EventType.OPENED], SUBJECTS[EventType.CLICKED]
_OPENED, _CLICKED = EventType.OPENED.value, EventType.CLICKED.value
# The Nats-Msg-Id header of an engagement: its id is always 32 hex digits.
_HEADER_SIZE = len(f"{MSG_ID_HEADER}{'0' * 32}\r\n\r\n")
# An engagement's JSON around the values engagement_message fills in, in this order; the
# contract supplies the keys, their order and every other field (codec.json_pieces). Each
# piece is named after the value that follows it.
(
    _J_EVENT_ID,
    _J_TYPE,
    _J_TRACKING_ID,
    _J_OCCURRED_AT,
    _J_IP,
    _J_USER_AGENT,
    _J_URL,
    _J_MACHINE,
    _J_MACHINE_KIND,
    _J_SOURCE,
    _J_METADATA,
    _J_END,
) = codec.json_pieces(
    (
        "event_id",
        "type",
        "tracking_id",
        "occurred_at",
        "ip",
        "user_agent",
        "url",
        "machine",
        "machine_kind",
        "source",
        "metadata",
    ),
    quoted=("event_id", "type", "tracking_id", "occurred_at", "source"),
)
# Text a client sent that fits these is kept as it is when it is ASCII without NUL.
_IP_LIMIT, _USER_AGENT_LIMIT, _URL_LIMIT = (codec.TEXT_LIMITS[name] for name in ("ip", "user_agent", "url"))


class _Second:
    """The second whose date and time of day :func:`json_time` last formatted."""

    number = -1
    text = ""


def json_now() -> str:
    """Now, as :func:`json_time` writes it."""
    return json_time(time.time())


def json_time(moment: float) -> str:
    """A POSIX time as pydantic writes a UTC time in JSON ("2026-11-28T04:16:54.763105Z"; no
    fraction when it is zero). The date and time of day are formatted once a second: every
    pixel load and click is stamped."""
    second, micro = divmod(round(moment * 1_000_000), 1_000_000)  # rounded as datetime rounds
    if second != _Second.number:
        _Second.text, _Second.number = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)), second
    return f"{_Second.text}.{micro:06d}Z" if micro else f"{_Second.text}Z"


def engagement_message(
    event_type: EventType,
    tracking_id: str,
    ip: str | None,
    user_agent: str | None,
    verdict: classify.Verdict,
    source: str,
    url: str | None = None,
    occurred_at: str | None = None,
) -> Outgoing:
    """An open or click event, encoded and ready to publish, without building an Event.

    This runs on every pixel load and click. The JSON is written directly: it is byte for
    byte the serialization of the validated ``Event`` of the same values (tests hold it to
    that), at a fraction of the cost of building the model and serializing it. The tracker
    produced the id, the tracking id (canonical), the time (``occurred_at``, from
    :func:`json_time`; now when not given) and the source itself;
    text a client sent still gets the sanitation validation applies
    (:func:`mailbeacon.contract.events.storable_text`: no NUL nor lone surrogate, column-sized).
    """
    # Strings go through json's C string encoder, which escapes exactly what pydantic's JSON
    # escapes and, like it, keeps non-ASCII text as it is.
    machine_kind, evidence = verdict.machine_kind, verdict.evidence
    if machine_kind is None:
        machine, kind, metadata = "false", "null", "{}"
    else:
        if evidence is not None:
            if not evidence.isascii():
                evidence = encodable(evidence)  # a prefetch header's value may be quoted in it
            if "\x00" in evidence:
                evidence = evidence.replace("\x00", "")  # metadata is JSON the store keeps as well
        machine, kind = "true", encode_basestring(machine_kind)
        metadata = f'{{"machine_evidence":{"null" if evidence is None else encode_basestring(evidence)}}}'
    # Column-sized ASCII without NUL, nearly all a client sends, is already storable text.
    if ip is not None and (len(ip) > _IP_LIMIT or "\x00" in ip or not ip.isascii()):
        ip = storable_text("ip", ip)
    if user_agent is not None and (
        len(user_agent) > _USER_AGENT_LIMIT or "\x00" in user_agent or not user_agent.isascii()
    ):
        user_agent = storable_text("user_agent", user_agent)
    if url is not None and (len(url) > _URL_LIMIT or "\x00" in url or not url.isascii()):
        url = storable_text("url", url)
    opened = event_type is EventType.OPENED
    event_id = new_engagement_id()
    frame = (
        f"{MSG_ID_HEADER}{event_id}\r\n\r\n"
        f"{_J_EVENT_ID}{event_id}{_J_TYPE}{_OPENED if opened else _CLICKED}{_J_TRACKING_ID}{tracking_id}"
        f"{_J_OCCURRED_AT}{occurred_at or json_now()}"
        f"{_J_IP}{'null' if ip is None else encode_basestring(ip)}"
        f"{_J_USER_AGENT}{'null' if user_agent is None else encode_basestring(user_agent)}"
        f"{_J_URL}{'null' if url is None else encode_basestring(url)}"
        f"{_J_MACHINE}{machine}{_J_MACHINE_KIND}{kind}{_J_SOURCE}{source}{_J_METADATA}{metadata}{_J_END}"
    ).encode()
    return (_SUBJECT_OPENED if opened else _SUBJECT_CLICKED), event_id, frame, _HEADER_SIZE


def encodable(text: str) -> str:
    """Header text as JSON can carry it: bytes that were not UTF-8 become U+FFFD.

    aiohttp keeps such bytes as lone surrogates, which no JSON encoder accepts; one event
    that cannot be encoded would otherwise never leave the publisher's buffer.
    """
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# A click sitting out the burst window: tracking id, destination, time (JSON), the address kept,
# user agent, and the request's own machine verdict (None: a person, so far). A tuple of
# plain values: a busy tracker holds a second's worth of them.
HeldClick = tuple[str, str, str, str | None, str | None, classify.Verdict | None]

# A pixel load or click answered and not yet judged (see :mod:`tracker.engagement.arrivals`): tracking
# id, destination (None for a pixel), wall-clock and monotonic time of arrival (the latter
# for the burst window, so 0.0 for a pixel), method, headers and socket peer. The headers
# are kept only until the arrivals are handed over.
Arrival = tuple[str, str | None, float, float, str, CIMultiDictProxy[str], str | None]


class Engagement:
    def __init__(self, settings: Settings, publisher: EventPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.hold: ClickHold[HeldClick] = ClickHold(
            self._publish_click,
            window=settings.tracker.click_burst_seconds,
            max_pending=settings.tracker.event_buffer_limit,
        )
        self.arrivals: Arrivals[Arrival] = Arrivals(self._hand_over)
        self.signatures = signing.ClickVerifier(settings.signing_keys())
        self.trusted = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies]
        self.machine_networks = [
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.tracker.machine_ip_ranges
        ]
        self._anonymize = settings.tracker.anonymize_ip

    @property
    def held(self) -> int:
        """Clicks and pixel loads answered whose events are not in the publisher's buffer yet."""
        return self.hold.pending + self.arrivals.pending

    def flush(self) -> None:
        """Hand every event still held to the publisher (shutdown)."""
        self.arrivals.flush()
        self.hold.flush()

    def _client(self, peer: str | None, headers: CIMultiDictProxy[str]) -> tuple[str | None, str | None]:
        """The real client address (for classification) and the one we may keep."""
        address = peer
        if self.trusted:
            address = client_ip(address, headers.get("X-Forwarded-For"), self.trusted)
        kept = anonymize_ip(address) if address and self._anonymize else address
        return address, kept or None

    def _classified(
        self,
        kind: classify.Engagement,
        method: str,
        headers: CIMultiDictProxy[str],
        peer: str | None,
        verdict: classify.Verdict | None,
    ) -> tuple[str | None, str | None, classify.Verdict]:
        """The address we keep, the user agent, and the verdict on this request."""
        address, kept = self._client(peer, headers)
        user_agent = headers.get("User-Agent")
        if user_agent:
            user_agent = encodable(user_agent[:500])
        if verdict is None:
            verdict = classify.judge(kind, method, user_agent, address, headers, self.machine_networks)
        if self._anonymize and address and verdict.evidence and address in verdict.evidence:
            # Evidence may quote the address it judged (Apple's network, MACHINE_IP_RANGES):
            # it leaves the tracker no more complete than the event's own ip.
            verdict = classify.Verdict(verdict.machine_kind, anonymize_text(verdict.evidence))
        return kept, user_agent or None, verdict

    def _hand_over(self, arrivals: list[Arrival]) -> None:
        """Judge the arrivals: pixel events go to the publisher, clicks into the burst window."""
        publish, hold = self.publisher.publish_encoded_later, self.hold
        for arrival in arrivals:
            tracking_id, url, wall, monotonic, method, headers, peer = arrival
            try:
                if url is None:
                    ip, user_agent, verdict = self._classified("open", method, headers, peer, None)
                    metrics.count_engagement(_OPENED, verdict.machine_kind or "human")
                    occurred_at = json_time(wall)
                    publish(
                        engagement_message(
                            EventType.OPENED, tracking_id, ip, user_agent, verdict, "pixel", None, occurred_at
                        )
                    )
                    continue
                honeypot = classify.honeypot() if url == signing.HONEYPOT_URL else None
                ip, user_agent, verdict = self._classified("click", method, headers, peer, honeypot)
                if self.publisher.reserve():  # held clicks count against the buffer limit from now on
                    own = verdict if verdict.machine_kind is not None else None
                    hold.add(
                        tracking_id, url, (tracking_id, url, json_time(wall), ip, user_agent, own), monotonic
                    )
            except Exception:  # one odd request must not cost the others their events
                self.publisher.discard()
                log.exception(
                    "dropping the event of a %s that could not be judged", "click" if url else "pixel load"
                )

    def _publish_click(self, held: HeldClick, burst: classify.Verdict | None) -> None:
        """A click whose burst window is over: published with its final verdict."""
        tracking_id, url, occurred_at, ip, user_agent, own = held
        # The request's own evidence (HEAD, scanner agent, honeypot) is more specific than the burst.
        verdict = own or burst or classify.HUMAN
        try:
            message = engagement_message(
                EventType.CLICKED, tracking_id, ip, user_agent, verdict, "click", url, occurred_at
            )
        except Exception:  # released with others: it must not cost them their events
            self.publisher.discard(reserved=True)
            log.exception("dropping a held click event that could not be encoded")
            return
        self.publisher.publish_encoded_later(message, reserved=True)  # its room was reserved when held
        # Counted with its final verdict (a scanner burst is known only now), as it is stored.
        metrics.count_engagement(_CLICKED, verdict.machine_kind or "human")

    # Pixel and click never wait: plain functions, answered from the route's one coroutine.
    # They only check what decides the answer; the rest happens when the arrivals are handed over.
    def pixel(self, request: web.Request) -> web.StreamResponse:
        tracking_id = canonical_tracking_id(request.match_info["tracking_id"])
        if tracking_id is None:
            metrics.PIXEL_INVALID.inc()
            return json_error(400, "tracking id is not a UUID")
        self.arrivals.add(
            (tracking_id, None, time.time(), 0.0, request.method, request.headers, request.remote)
        )
        metrics.PIXEL_OK.inc()
        return web.Response(body=PIXEL_GIF, headers=_PIXEL_HEADERS.copy())

    def click(self, request: web.Request) -> web.StreamResponse:
        tracking_id = canonical_tracking_id(request.match_info["tracking_id"])
        query = request.query
        url = query.get("url", "")
        signature = query.get("sig", "")
        if tracking_id is None:
            metrics.CLICK_INVALID.inc()
            return pages.invalid_link("The tracking id is malformed.")
        honeypot = url == signing.HONEYPOT_URL
        if not honeypot and not url[:8].lower().startswith(("http://", "https://")):
            metrics.CLICK_INVALID.inc()
            return pages.invalid_link("The destination is missing or not a web address.")
        if _CONTROL_CHARACTERS.search(url):
            metrics.CLICK_INVALID.inc()
            return pages.invalid_link("The destination contains control characters.")
        if not self.signatures.verify(tracking_id, url, signature):
            metrics.CLICK_FORGED.inc()
            return pages.invalid_link("The link's signature does not match.")
        self.arrivals.add(
            (tracking_id, url, time.time(), time.monotonic(), request.method, request.headers, request.remote)
        )
        if honeypot:
            metrics.CLICK_HONEYPOT.inc()
            return pages.honeypot()
        metrics.CLICK_OK.inc()
        # A plain response rather than raising HTTPFound: same answer, without exception handling.
        headers = _REDIRECT_HEADERS.copy()
        headers["Location"] = url
        return web.Response(status=302, headers=headers)

    def _list_name(self, request: web.Request, tracking_id: str) -> str | None:
        """The list an unsubscribe link leaves, when the link carries its name signed by the
        proxy; anything else (no name, an altered one) shows no name at all."""
        name, signature = request.query.get("list", ""), request.query.get("sig", "")
        if len(name) > signing.MAX_LIST_NAME or _CONTROL_CHARACTERS.search(name):
            return None
        return name if signing.list_name_verified(self.signatures, tracking_id, name, signature) else None

    async def unsubscribe_page(self, request: web.Request) -> web.StreamResponse:
        tracking_id = parse_tracking_id(request.match_info["tracking_id"])
        if tracking_id is None:
            metrics.UNSUBSCRIBE_PAGE_INVALID.inc()
            return pages.invalid_link("The unsubscribe link is malformed.")
        metrics.UNSUBSCRIBE_PAGE_OK.inc()
        name = self._list_name(request, tracking_id)
        # The form posts to the same link, a verified name and its signature included, so the
        # answer names the list too.
        return pages.unsubscribe_confirm(request.path_qs if name else request.path, name)

    async def unsubscribe(self, request: web.Request) -> web.StreamResponse:
        tracking_id = parse_tracking_id(request.match_info["tracking_id"])
        if tracking_id is None:
            metrics.UNSUBSCRIBE_REFUSED.inc()
            return pages.invalid_link("The unsubscribe link is malformed.")
        try:
            form = await request.post()
        except (ValueError, HttpProcessingError):  # no multipart boundary, broken part headers, ...
            metrics.UNSUBSCRIBE_REFUSED.inc()
            return pages.unsubscribe_refused("The request body is not a form.")
        one_click = form.get("List-Unsubscribe") == ONE_CLICK
        if not one_click and "confirm" not in form:
            metrics.UNSUBSCRIBE_REFUSED.inc()
            return pages.unsubscribe_refused(
                "An unsubscribe request must carry List-Unsubscribe=One-Click (RFC 8058) or the form's button."
            )
        _, kept = self._client(request.remote, request.headers)
        event = Event(
            # One unsubscribe per copy: a repeated POST (double click, retry) is the same event.
            event_id=derived_event_id("unsubscribe", tracking_id),
            type=EventType.UNSUBSCRIBED,
            tracking_id=tracking_id,
            occurred_at=utcnow(),
            ip=kept,
            user_agent=request.headers.get("User-Agent", "")[:500] or None,
            source="unsubscribe",
            metadata={"via": "one_click" if one_click else "page"},
        )
        await self.publisher.publish_or_buffer(event)
        metrics.UNSUBSCRIBE_OK.inc()
        return pages.unsubscribed(self._list_name(request, tracking_id))
