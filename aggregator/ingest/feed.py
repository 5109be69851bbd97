"""A JetStream pull feed that keeps messages flowing while the previous batch is written.

nats-py's ``fetch()`` asks for one batch, then waits message by message and sends the
next request only when called again, so the stream stalls during every database
transaction. This feed speaks the pull protocol directly: it keeps pull requests
outstanding for about ``depth`` batches (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``,
each with its own reply subject under one inbox, where status replies arrive), collects
delivered messages in a buffer, and tops the requests up as the buffer drains.
Acknowledgement stays with the caller (after its commit), so delivery semantics are
those of any pull consumer; a whole batch is acknowledged in one write.

Messages travel over a dedicated lean connection (:mod:`aggregator.ingest.wire`) that hands
over raw ``(ack subject, payload)`` pairs, with no header parsing and no per-message
objects; for URLs it cannot serve (WebSocket) the feed uses the nats-py client instead. Both log
in with the same :class:`~mailbeacon.bus.nats_auth.NatsLogin` (credentials and TLS). Against
nats-py's own ``pull_subscribe``/``fetch`` and ``msg.ack()``, the feed costs 14 times less CPU
per event and ingest into SQLite 1.5-1.8 times less (measured 2026-12-07; the figures are in
:mod:`aggregator.ingest.wire`).

Status replies end a request: 404/408 (nothing more, or expired), 409 (the server
refused it, e.g. the consumer was deleted or its leader changed) and 503 (nobody serves the
consumer: in a NATS cluster, while its replicas elect a new leader after a node failed).
After a refusal the next request waits, a little longer after each refusal in a row (up
to :data:`REFUSAL_PAUSE_MAX`): asked again at once, the server refuses as fast as it is
asked. A request lost to a reconnect is forgotten with the connection, or when its
``expires`` has passed, so the feed never waits for it forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from aggregator.ingest.wire import Unsupported, WireConnection, pub
from mailbeacon.bus.nats_auth import NatsLogin, NatsLoginError

log = logging.getLogger(__name__)

# A delivered message: its acknowledgement subject and its payload.
Delivery = tuple[bytes, bytes]

ACK = b"+ACK"
TERM = b"+TERM"

# Seconds before a pull request follows a refused one, doubling per refusal in a row: a
# leader election in a NATS cluster takes a few seconds, and the feed goes on within about
# a second of its end.
REFUSAL_PAUSE_MIN = 0.1
REFUSAL_PAUSE_MAX = 1.0
# Seconds a stopping feed waits for the server to have handled its last acknowledgements.
FLUSH_SECONDS = 2


def nak(delay: float) -> bytes:
    """A negative acknowledgement asking for redelivery after ``delay`` seconds."""
    return b'-NAK {"delay": %d}' % int(delay * 1_000_000_000)


@dataclass
class _Request:
    remaining: int
    deadline: float


@dataclass(frozen=True)
class DeliveryInfo:
    """What an acknowledgement subject tells about its message."""

    pending: int  # messages in the stream not yet delivered to the consumer
    stored_at: datetime
    delivered: int  # how often this message has been delivered, this time included


def delivery_info(reply: bytes) -> DeliveryInfo | None:
    """Parse ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>``
    (or the newer form with domain and account hash before the stream); None otherwise."""
    tokens = reply.split(b".")
    if len(tokens) < 9 or tokens[0] != b"$JS" or tokens[1] != b"ACK":
        return None
    if len(tokens) == 9:
        delivered, stamp, pending = tokens[4], tokens[7], tokens[8]
    else:
        delivered, stamp, pending = tokens[6], tokens[9], tokens[10]
    try:
        return DeliveryInfo(int(pending), datetime.fromtimestamp(int(stamp) / 1e9, UTC), int(delivered))
    except (ValueError, OverflowError):
        return None


class _NatsPyLink:
    """The same feed over nats-py, for servers the lean connection does not speak to (WebSocket)."""

    def __init__(self, nc: NATS, feed: PullFeed) -> None:
        self._nc = nc
        self._feed = feed
        self._sub: Subscription | None = None

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def start(self, subject: bytes) -> None:
        self._sub = await self._nc.subscribe(
            subject.decode(),
            cb=self._on_msg,
            pending_msgs_limit=max(65536, self._feed.target * 4),
            pending_bytes_limit=256 * 1024 * 1024,
        )

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        self._feed.on_message(
            msg.subject.encode(), (msg.reply or "").encode(), status.encode() if status else None, msg.data
        )

    async def publish(self, subject: bytes, payload: bytes, reply: bytes = b"") -> bool:
        await self._nc.publish(subject.decode(), payload, reply=reply.decode())
        return True

    async def send_each(self, subjects: Sequence[bytes], payload: bytes) -> bool:
        for subject in subjects:
            await self._nc.publish(subject.decode(), payload)
        return True

    async def flush(self) -> None:
        with contextlib.suppress(Exception):  # a closed connection: nothing to wait for
            await self._nc.flush(timeout=FLUSH_SECONDS)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:  # a closed connection: nothing left to unsubscribe
                log.debug("unsubscribing the pull feed: %s", exc)


class _WireLink:
    def __init__(self, nc: NATS, feed: PullFeed, login: NatsLogin | None) -> None:
        self._url = ""
        self._nc = nc
        self._conn = WireConnection(
            self._address, "mailbeacon-aggregator-feed", feed.on_message, feed.forget_requests, login=login
        )

    def _address(self) -> str:
        # Follow the server nats-py is connected to (it knows the cluster's other servers).
        url = self._nc.connected_url
        if url is not None:
            self._url = url.geturl()
        return self._url

    @property
    def connected(self) -> bool:
        return self._conn.connected

    async def start(self, subject: bytes) -> None:
        await self._conn.start()
        self._conn.subscribe(subject)

    async def publish(self, subject: bytes, payload: bytes, reply: bytes = b"") -> bool:
        return self._conn.write(pub(subject, payload, reply))

    async def send_each(self, subjects: Sequence[bytes], payload: bytes) -> bool:
        tail = b" %d\r\n%s\r\n" % (len(payload), payload)
        sent = self._conn.write(b"".join([b"PUB " + subject + tail for subject in subjects]))
        await self._conn.drain()
        return sent

    async def flush(self) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):  # down: nothing to wait for
            async with asyncio.timeout(FLUSH_SECONDS):
                await self._conn.flush()

    async def stop(self) -> None:
        await self._conn.stop()


class PullFeed:
    """Delivered messages in arrival order, ``batch`` at a time; see the module docstring."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        batch: int,
        *,
        expires: float = 5.0,
        depth: int = 3,
        lean: bool = True,
        login: NatsLogin | None = None,
    ) -> None:
        self._nc = nc
        self._login = login
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}".encode()
        self.batch = batch
        self._expires = expires
        self.target = batch * depth
        self._lean = lean
        self._buffer: list[Delivery] = []
        self._requests: dict[bytes, _Request] = {}
        self._counter = 0
        self._inbox = b""
        self._link: _WireLink | _NatsPyLink | None = None
        self._arrived = asyncio.Event()
        self.refusals = 0
        self._refused_in_a_row = 0
        self._pause = 0.0
        self._resume_at = 0.0  # monotonic time before which no pull request is sent

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.connected

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox().encode() + b"."
        if self._lean:
            link = _WireLink(self._nc, self, self._login)
            try:
                await link.start(self._inbox + b"*")
                self._link = link
                return
            except Unsupported as exc:
                log.info("ingest feed over nats-py: %s", exc)
            except (ConnectionError, OSError, NatsLoginError) as exc:
                # nats-py is connected, so the server is there: whatever refused the lean
                # link (an auth method it does not speak), nats-py's own link works.
                log.warning("ingest feed over nats-py, the direct link failed: %s", exc)
                await link.stop()
        nats_link = _NatsPyLink(self._nc, self)
        await nats_link.start(self._inbox + b"*")
        self._link = nats_link

    async def stop(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            # The last acknowledgements must reach the server before the connection closes:
            # closed with deliveries it has not read (pull requests still outstanding), the
            # socket is reset and what it had not sent yet is lost, so JetStream would deliver
            # those messages again after the ack wait.
            await link.flush()
            await link.stop()

    def forget_requests(self) -> None:
        """Pull requests die with the connection that made them."""
        self._requests.clear()
        self._arrived.set()

    def on_message(self, subject: bytes, reply: bytes, status: bytes | None, payload: bytes) -> None:
        if subject.startswith(self._inbox):
            # A status reply to one of our pull requests (delivered messages carry their
            # stream subject instead).
            if status == b"100" or status is None:  # a heartbeat, or nothing a pull request sends
                return
            self._requests.pop(subject[len(self._inbox) :], None)
            if status in (b"404", b"408"):
                self._served()
            else:
                self._refused(status)
            self._arrived.set()
            return
        # The server fills one consumer's waiting requests first come, first served.
        requests = self._requests
        for name in requests:
            pending = requests[name]
            pending.remaining -= 1
            if pending.remaining <= 0:
                del requests[name]
            break
        self._buffer.append((reply, payload))
        self._arrived.set()

    def _refused(self, status: bytes) -> None:
        self.refusals += 1
        self._refused_in_a_row += 1
        self._pause = min(max(self._pause * 2, REFUSAL_PAUSE_MIN), REFUSAL_PAUSE_MAX)
        self._resume_at = time.monotonic() + self._pause
        if self._refused_in_a_row == 1:  # one line per outage, not one per request
            log.warning(
                "JetStream refused a pull request: %s; asking again after a pause growing to %.1f s",
                status.decode(errors="replace"),
                REFUSAL_PAUSE_MAX,
            )

    def _served(self) -> None:
        if self._refused_in_a_row:
            log.info("JetStream serves pull requests again (%d refused)", self._refused_in_a_row)
            self._refused_in_a_row = 0
        self._pause = self._resume_at = 0.0

    async def _top_up(self) -> None:
        if self._link is None or not self._link.connected:
            return
        now = time.monotonic()
        if now < self._resume_at:
            return
        for name in [n for n, r in self._requests.items() if r.deadline < now]:
            del self._requests[name]
        outstanding = sum(r.remaining for r in self._requests.values()) + len(self._buffer)
        wanted = self.target - outstanding
        if wanted < max(1, self.batch // 2):
            return
        self._counter += 1
        name = str(self._counter).encode()
        expires_ns = int(self._expires * 1_000_000_000)
        body = json.dumps({"batch": wanted, "expires": expires_ns}).encode()
        self._requests[name] = _Request(wanted, now + self._expires + 1.0)
        if not await self._link.publish(self._next_subject, body, self._inbox + name):
            self._requests.pop(name, None)

    async def take(self, wait: float) -> list[Delivery]:
        """Up to one batch of messages; an empty list when none arrived within ``wait`` seconds."""
        await self._top_up()
        if not self._buffer:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait)
            if not self._buffer:
                return []
        if self._pause:
            self._served()
        taken, self._buffer = self._buffer[: self.batch], self._buffer[self.batch :]
        await self._top_up()
        return taken

    async def settle(self, replies: Sequence[bytes], verdict: bytes) -> bool:
        """Send ``verdict`` (:data:`ACK`, :data:`TERM`, :func:`nak`) for each message; False if it
        could not be sent (JetStream then redelivers after its ack wait)."""
        if not replies or self._link is None:
            return False
        try:
            return await self._link.send_each(replies, verdict)
        except Exception as exc:
            log.warning("acknowledging %d messages failed: %s", len(replies), exc)
            return False
