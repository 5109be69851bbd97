"""Connection limits for a public aiohttp server: a header deadline and a connection cap.

aiohttp reads request headers without a deadline: a client that sends a few bytes now and
then (slowloris) holds its connection, and a file descriptor, for as long as it likes.
Here a connection must complete a request's headers within ``header_timeout`` seconds of
connecting, and within as long of the first bytes of each later request on a kept-alive
connection; otherwise it is closed. Idle kept-alive connections are closed after
``KEEPALIVE_SECONDS``. At most ``max_connections`` are open per process; a connection above
that is answered 503 and closed at once, before anything is read from it.

The cost is a timer per connection, and per read of the socket (about once per request)
a check whether it left a request incomplete, about 55 ns; only then is a timer set.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

# File descriptors a process keeps for everything but client connections (NATS, logs,
# the listening sockets, outbound HTTPS).
RESERVED_DESCRIPTORS = 128

# Idle kept-alive connections are closed after this long: longer than the usual reverse
# proxies and load balancers keep theirs open (60 s), much shorter than aiohttp's default
# hour, during which an idle connection would hold its place under the cap.
KEEPALIVE_SECONDS = 75.0

_REFUSAL_BODY = b'{"status": "error", "error": "too many connections, retry later"}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
) % (len(_REFUSAL_BODY), _REFUSAL_BODY)


def effective_max_connections(configured: int, descriptor_limit: int | None) -> int:
    """The cap actually applied: ``configured``, lowered to what the open-file limit can hold."""
    if descriptor_limit is None or descriptor_limit <= 0:
        return configured
    return max(1, min(configured, descriptor_limit - RESERVED_DESCRIPTORS))


def descriptor_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


@dataclass
class ConnectionLimits:
    header_timeout: float
    max_connections: int
    open: int = 0
    refused: int = 0  # connections answered 503 for being above the cap
    timed_out: int = 0  # connections closed for sending their headers too slowly


class _Refusal(asyncio.Protocol):
    """A connection above the cap: a 503, then closed, without reading the request."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.limits.refused += 1
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSAL)
        transport.close()


_data_received = RequestHandler.data_received


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol with a header deadline, counted against the connection cap."""

    __slots__ = ("_armed_at", "_deadline", "_limits")

    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._armed_at = 0  # requests parsed when the deadline was set

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._limits.open += 1
        super().connection_made(transport)
        self._arm()  # the first request's headers are due from the moment it connects

    def connection_lost(self, exc: BaseException | None) -> None:
        self._limits.open -= 1
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        _data_received(self, data)  # not super(): this runs for every request, and it costs less
        # The handler waits for a request while this read did not complete one: the bytes
        # began a request whose headers have yet to come. Set a deadline unless one runs
        # for this very request.
        waiter = self._waiter
        if (
            waiter is not None
            and not waiter.done()
            and (self._deadline is None or self._armed_at != self._request_count)
        ):
            self._arm()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._armed_at = self._request_count
        self._deadline = self._loop.call_later(self._limits.header_timeout, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self._request_count != self._armed_at or self._request_in_progress:
            return  # the request arrived in time (a later one sets its own deadline)
        self._limits.timed_out += 1
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's server, handing each connection a :class:`GuardedRequestHandler`, or a 503
    above the cap."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits

    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]  # asyncio wants any protocol
        if self.limits.open >= self.limits.max_connections:
            return _Refusal(self.limits)
        # aiohttp keeps the handler options (access log, debug, handler_args) in _kwargs.
        return GuardedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose server applies ``limits``."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=KEEPALIVE_SECONDS, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return GuardedServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            limits=self.limits,
            **server._kwargs,
        )
