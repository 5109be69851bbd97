"""A lean NATS connection for the ingest feed: the few protocol verbs a pull consumer needs.

At tens of thousands of events a second, nats-py's per-message work (a regular
expression per protocol line, a ``Msg`` object with its headers parsed into a dict, a
queue and a coroutine per message, one publish call per acknowledgement) costs about as
much CPU as storing the event. This connection parses ``MSG``/``HMSG`` frames with plain
``bytes.find`` and hands the caller raw ``(subject, reply, status, payload)``; headers are
looked at only for a status line. Writes are whole frames the caller joined, so a batch
of acknowledgements is one ``write``.

It speaks the documented client protocol (``INFO``/``CONNECT``/``PING``/``PONG``/``SUB``/
``PUB``/``MSG``/``HMSG``/``+OK``/``-ERR``) over TCP, upgraded to TLS when the server's
``INFO`` says ``tls_required`` (verified against ``NATS_CA_FILE``, with the client certificate
when one is configured), and logs in as the other components do (:class:`NatsLogin`: user and
password, token, nkey or ``.creds`` JWT, signing the server's nonce), else with the user and
password or token of a ``nats://`` URL. WebSocket URLs raise :class:`Unsupported`, and the
caller uses nats-py instead. It reconnects by itself; a keepalive ``PING`` finds a silently
dead connection.

Why this is not nats-py (custom NATS code stays only where it is at least 1.3 times faster;
docs/performance.md "The NATS paths, measured"). Measured 2026-12-07 with ``python -m
bench.bench_aggregator --only paths`` (part of ``make bench``), four runs on the shared 2-core
machine: taking
200,000 stored events in batches of 5,000 and acknowledging them, the feed over this
connection cost 2.3-2.7 µs of CPU per event, nats-py's ``pull_subscribe``/``fetch`` with
``msg.ack()`` after the commit 34-37 µs (14-15 times as much) at a fifth to a seventh of the
events a second; a whole ``mailbeacon aggregator`` ingesting into SQLite spent 1.47-1.77 times
the CPU per event with nats-py's feed, and stored 1.29-1.61 times fewer events a second. No
nats-py internals are used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from mailbeacon.bus.nats_auth import NatsLogin

log = logging.getLogger(__name__)

# subject, reply ("" when none), status code of a status message (else None), payload
Handler = Callable[[bytes, bytes, bytes | None, bytes], None]

_CRLF = b"\r\n"
_STATUS_LINE = b"NATS/1.0 "
_READ_SIZE = 1 << 18


class Unsupported(Exception):
    """The server or URL needs something this connection does not speak (WebSocket)."""


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls: bool = False  # a tls:// URL: the server must offer TLS

    @classmethod
    def from_url(cls, url: str) -> Server:
        """``nats://[user:password@|token@]host[:port]``, read the way nats-py reads it:
        user, password and token exactly as written (no percent-decoding), or the same
        URL would log in for the other components and be refused for this one."""
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        if parts.scheme not in ("nats", "tls"):
            raise Unsupported(f"{parts.scheme}:// URLs are served by nats-py")
        user = parts.username or None
        password = parts.password
        token = None
        if user is not None and password is None:
            user, token = None, user
        return cls(
            parts.hostname or "127.0.0.1", parts.port or 4222, user, password, token, parts.scheme == "tls"
        )


def pub(subject: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    """One ``PUB`` frame; join many and :meth:`WireConnection.write` them at once."""
    head = b"PUB " + subject + (b" " + reply if reply else b"") + b" %d\r\n" % len(payload)
    return head + payload + _CRLF


class WireConnection:
    """A self-reconnecting NATS connection delivering every message to ``handler``.

    ``address()`` is asked for the server URL before every (re)connect, so the feed can
    follow the server nats-py is connected to in a cluster. ``on_connect`` runs after each
    handshake, once the subscriptions are back: state tied to the old connection (pull
    requests waiting on it) is void by then.
    """

    def __init__(
        self,
        address: Callable[[], str],
        name: str,
        handler: Handler,
        on_connect: Callable[[], None] = lambda: None,
        *,
        ping_interval: float = 10.0,
        connect_timeout: float = 5.0,
        login: NatsLogin | None = None,
    ) -> None:
        self._login = login or NatsLogin()
        self._address = address
        self._name = name
        self._handler = handler
        self._on_connect = on_connect
        self._ping_interval = ping_interval
        self._connect_timeout = connect_timeout
        self._subs: dict[bytes, int] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pings_out = 0
        # One entry per PING sent on the current connection, answered in order: None for a
        # keepalive, the future of a flush().
        self._pongs: deque[asyncio.Future[None] | None] = deque()
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def start(self) -> None:
        """Connect once (errors, :class:`Unsupported` included, reach the caller), then keep connected."""
        reader, writer = await self._handshake()
        self._task = asyncio.create_task(self._run(reader, writer), name=f"{self._name}-connection")

    def subscribe(self, subject: bytes) -> None:
        """Subscribe now and after every reconnect."""
        sid = self._subs.setdefault(subject, len(self._subs) + 1)
        self.write(b"SUB %s %d\r\n" % (subject, sid))

    def write(self, frames: bytes) -> bool:
        """Send protocol frames; False (nothing sent) while disconnected."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(frames)
        return True

    async def drain(self) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    async def flush(self) -> None:
        """Returns once the server has handled everything written before: it answers a PING
        after the commands before it (a connection's commands are handled in order). Raises
        ConnectionError when the connection is down or closes meanwhile."""
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ConnectionError("not connected")
        answered = asyncio.get_running_loop().create_future()
        self._pongs.append(answered)
        writer.write(b"PING\r\n")
        await answered

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close()

    # -- connection ---------------------------------------------------------------------------

    async def _handshake(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        server = Server.from_url(self._address())
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(server.host, server.port, limit=1 << 20), self._connect_timeout
        )
        try:
            line = await asyncio.wait_for(reader.readline(), self._connect_timeout)
            if not line.startswith(b"INFO "):
                raise ConnectionError(f"not a NATS server: {line[:80]!r}")
            info = json.loads(line[5:])
            wants_tls = server.tls or self._login.tls_configured
            secured = bool(info.get("tls_required") or (wants_tls and info.get("tls_available")))
            if secured:
                # As nats-py does: the INFO comes in clear, then the TLS handshake.
                context = self._login.ssl_context(required=True)
                assert context is not None
                await asyncio.wait_for(
                    writer.start_tls(context, server_hostname=server.host), self._connect_timeout
                )
            elif wants_tls:
                raise ConnectionError("TLS is configured for NATS, but the server does not offer it")
            options: dict[str, object] = {
                "verbose": False,
                "pedantic": False,
                "tls_required": secured,
                "name": self._name,
                "lang": "python3",
                "version": "mailbeacon-wire",
                "protocol": 1,
                "headers": True,
                "no_responders": True,
                "echo": False,
            }
            # The configured login applies to every server; a URL's own credentials to that one.
            login = self._login.connect_fields(info.get("nonce"))
            if login:
                options.update(login)
            elif server.user is not None:
                options.update(user=server.user, **{"pass": server.password or ""})
            elif server.token is not None:
                options["auth_token"] = server.token
            writer.write(b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n")
            while True:
                line = await asyncio.wait_for(reader.readline(), self._connect_timeout)
                if not line:
                    raise ConnectionError("the server closed the connection during the handshake")
                if line.startswith(b"PONG"):
                    break
                if line.startswith(b"-ERR"):
                    raise ConnectionError(
                        f"NATS refused the connection: {line[5:].strip().decode(errors='replace')}"
                    )
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self._pings_out = 0
        writer.write(b"".join(b"SUB %s %d\r\n" % (subject, sid) for subject, sid in self._subs.items()))
        self._on_connect()
        return reader, writer

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                await self._session(reader, writer)
            except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("ingest feed connection lost: %s; reconnecting", exc)
            self._close()
            while not self._closing:
                await asyncio.sleep(backoff)
                try:
                    reader, writer = await self._handshake()
                    backoff = 0.1
                    log.info("ingest feed reconnected")
                    break
                except Exception as exc:
                    backoff = min(backoff * 2, 2.0)
                    log.debug("ingest feed reconnect failed: %s", exc)

    def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        for answered in self._pongs:
            if answered is not None and not answered.done():
                answered.set_exception(ConnectionError("the connection closed before the server answered"))
        self._pongs.clear()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        keepalive = asyncio.create_task(self._keepalive(writer))
        try:
            pending = b""
            while True:
                chunk = await reader.read(_READ_SIZE)
                if not chunk:
                    raise ConnectionError("closed by the server")
                buffer = pending + chunk if pending else chunk
                pending = buffer[self._parse(buffer, writer) :]
        finally:
            keepalive.cancel()

    async def _keepalive(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(self._ping_interval)
            if self._pings_out >= 2:
                log.warning("ingest feed: no PONG for %.0f s; reconnecting", 2 * self._ping_interval)
                writer.close()  # the read loop ends and the connection is made again
                return
            self._pings_out += 1
            self._pongs.append(None)
            writer.write(b"PING\r\n")

    def _parse(self, buffer: bytes, writer: asyncio.StreamWriter) -> int:
        """Hand over every complete message in ``buffer``; returns how many bytes were consumed."""
        handler = self._handler
        size = len(buffer)
        pos = 0
        while True:
            eol = buffer.find(_CRLF, pos)
            if eol < 0:
                return pos
            op = buffer[pos : pos + 4]
            if op == b"HMSG" or op == b"MSG ":
                args = buffer[pos + 4 : eol].split()
                total = int(args[-1])
                start = eol + 2
                end = start + total
                if end + 2 > size:
                    return pos  # the payload has not fully arrived yet
                if op == b"HMSG":
                    header_size = int(args[-2])
                    reply = args[2] if len(args) == 5 else b""
                    status = None
                    if buffer.startswith(_STATUS_LINE, start):
                        status = buffer[start + 9 : start + 12]
                    handler(args[0], reply, status, buffer[start + header_size : end])
                else:
                    handler(args[0], args[2] if len(args) == 4 else b"", None, buffer[start:end])
                pos = end + 2
                continue
            line = buffer[pos:eol]
            pos = eol + 2
            if line == b"PING":
                writer.write(b"PONG\r\n")
            elif line == b"PONG":
                self._pings_out = 0
                if self._pongs:
                    answered = self._pongs.popleft()
                    if answered is not None and not answered.done():
                        answered.set_result(None)
            elif line.startswith(b"-ERR"):
                log.warning("NATS error on the ingest feed: %s", line[5:].decode(errors="replace"))
            # +OK and INFO (cluster topology updates) need nothing here.
