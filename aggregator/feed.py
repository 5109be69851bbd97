"""A JetStream pull feed that keeps messages flowing while the previous batch is written.

nats-py's ``fetch()`` asks for one batch, then waits message by message and sends the
next request only when called again, so the stream stalls during every database
transaction. This feed speaks the pull protocol directly: it keeps pull requests
outstanding for about two batches (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``,
each with its own reply subject under one inbox, where status replies arrive), collects
delivered messages in a buffer, and tops the requests up as the buffer drains. Acknowledgement stays with the
caller (after its commit), so delivery semantics are those of any pull consumer.

Status replies end a request: 404/408 (nothing more, or expired), 409 (the server
refused it, e.g. the consumer was deleted; logged). A request lost to a reconnect is
forgotten when its ``expires`` has passed, so the feed never waits for it forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

_STATUS = "Status"
T = TypeVar("T")


@dataclass
class _Request:
    remaining: int
    deadline: float


class PullFeed(Generic[T]):
    """Delivered messages, each with ``decode(msg)`` computed on arrival.

    Decoding on arrival (in the subscription's callback) overlaps it with the caller's
    database round trips instead of adding it to them.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        batch: int,
        decode: Callable[[Msg], T],
        *,
        expires: float = 5.0,
        depth: int = 3,
    ) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.batch = batch
        self._expires = expires
        self._target = batch * depth
        self._decode = decode
        self._buffer: list[tuple[Msg, T]] = []
        self._requests: dict[str, _Request] = {}
        self._counter = 0
        self._inbox = ""
        self._sub: Subscription | None = None
        self._arrived = asyncio.Event()
        self.refusals = 0

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(
            f"{self._inbox}.*",
            cb=self._on_message,
            pending_msgs_limit=max(65536, self._target * 4),
            pending_bytes_limit=256 * 1024 * 1024,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:  # a closed connection: nothing left to unsubscribe
                log.debug("unsubscribing the pull feed: %s", exc)

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status:
            request = msg.subject.rpartition(".")[2]
            if status == "100":  # heartbeat
                return
            self._requests.pop(request, None)
            if status not in ("404", "408"):
                self.refusals += 1
                description = (msg.headers or {}).get("Description", "")
                log.warning("JetStream refused a pull request: %s %s", status, description)
            self._arrived.set()
            return
        # Delivered messages carry their stream subject, not the request's reply subject;
        # the server fills one consumer's waiting requests first come, first served.
        for name, pending in self._requests.items():
            pending.remaining -= 1
            if pending.remaining <= 0:
                del self._requests[name]
            break
        self._buffer.append((msg, self._decode(msg)))
        self._arrived.set()

    async def _top_up(self) -> None:
        now = time.monotonic()
        for name in [n for n, r in self._requests.items() if r.deadline < now]:
            del self._requests[name]
        outstanding = sum(r.remaining for r in self._requests.values()) + len(self._buffer)
        wanted = self._target - outstanding
        if wanted < max(1, self.batch // 2) or not self._nc.is_connected:
            return
        self._counter += 1
        name = str(self._counter)
        expires_ns = int(self._expires * 1_000_000_000)
        body = json.dumps({"batch": wanted, "expires": expires_ns}).encode()
        self._requests[name] = _Request(wanted, now + self._expires + 1.0)
        await self._nc.publish(self._next_subject, body, reply=f"{self._inbox}.{name}")

    async def take(self, wait: float) -> list[tuple[Msg, T]]:
        """Up to one batch of messages; an empty list when none arrived within ``wait`` seconds."""
        await self._top_up()
        if not self._buffer:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except TimeoutError:
                return []
        taken, self._buffer = self._buffer[: self.batch], self._buffer[self.batch :]
        await self._top_up()
        return taken
