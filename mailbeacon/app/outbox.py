"""The development outbox of `mailbeacon up`: an SMTP sink that keeps each message as a .eml file.

It stands in for the real upstream on a laptop, so the proxy relays to it exactly as it
would to an ESP and you can open what recipients would get and click its links. It is
also the final mailbox: each tracked copy it keeps (one carrying the proxy's
``X-Mailbeacon-Tracking-ID`` header) is reported as ``delivered``, as a provider's
webhook would, so rates in development read real numbers.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailbeacon.contract.events import Event, EventType, parse_tracking_id, utcnow

Deliveries = Callable[[Event], Awaitable[None]]
_TRACKING_HEADER = re.compile(
    rb"^X-Mailbeacon-Tracking-ID:[ \t]*(\S+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE
)
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


# How long after its 250 the outbox reports a copy delivered: after the proxy has stamped its
# ``sent`` event (it does when the 250 arrives).
DELIVERY_DELAY_SECONDS = 0.05


def tracking_id_of(content: bytes) -> str | None:
    """The copy's tracking id from its header section, or None for mail the proxy did not track."""
    end = _END_OF_HEADERS.search(content)
    found = _TRACKING_HEADER.search(content, 0, end.start() if end else len(content))
    return parse_tracking_id(found.group(1).decode("ascii", "replace")) if found else None


def delivered_event(tracking_id: str, recipient: str) -> Event:
    """What the outbox reports for a kept copy; one event id per copy, so a resent copy counts once."""
    return Event(
        event_id=f"outbox:{tracking_id}",
        type=EventType.DELIVERED,
        tracking_id=tracking_id,
        recipient=recipient,
        occurred_at=utcnow(),
        source="outbox",
        reason="kept in the development outbox",
    )


class OutboxHandler:
    def __init__(self, directory: Path, outbox: Outbox | None = None) -> None:
        self.directory = directory
        self.outbox = outbox
        directory.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        trace = f"Return-Path: <{envelope.mail_from or ''}>\r\n".encode()
        for recipient in envelope.rcpt_tos:
            # Delivered-To records the envelope recipient, which the To: header may not show.
            name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.eml"
            data = trace + f"Delivered-To: {recipient}\r\n".encode() + content
            await asyncio.to_thread((self.directory / name).write_bytes, data)
        tracking_id = tracking_id_of(content) if self.outbox and self.outbox.on_delivery else None
        if self.outbox is not None and tracking_id is not None:
            # The proxy relays each tracked copy on its own, to its one recipient.
            self.outbox.report_delivery(tracking_id, list(envelope.rcpt_tos))
        return "250 2.0.0 kept in the outbox"


class Outbox:
    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.directory = directory
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        # Called with a ``delivered`` event for each tracked copy kept (mailbeacon up: publish it).
        self.on_delivery: Deliveries | None = None
        self._reports: set[asyncio.Task[None]] = set()

    def report_delivery(self, tracking_id: str, recipients: list[str]) -> None:
        """Report the copy delivered just after the outbox answered 250: a mailbox delivers
        after the relay accepted, so the copy's timeline reads sent, then delivered (reported
        within the same transaction, the delivery was stamped before the proxy's ``sent``)."""
        task = asyncio.get_running_loop().create_task(self._report(tracking_id, recipients))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self, tracking_id: str, recipients: list[str]) -> None:
        await asyncio.sleep(DELIVERY_DELAY_SECONDS)
        if self.on_delivery is not None:
            for recipient in recipients:
                await self.on_delivery(delivered_event(tracking_id, recipient))

    async def settle(self) -> None:
        """Wait for the deliveries still to be reported (before the publisher closes)."""
        while self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)

    async def start(self) -> None:
        handler = OutboxHandler(self.directory, self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(handler, hostname="outbox", enable_SMTPUTF8=True), self.host, self.port
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
