"""The development outbox of `mailbeacon up`: an SMTP sink that keeps each message as a .eml file.

It stands in for the real upstream on a laptop, so the proxy relays to it exactly as it
would to an ESP and you can open what recipients would get and click its links.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class OutboxHandler:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        trace = f"Return-Path: <{envelope.mail_from or ''}>\r\n".encode()
        for recipient in envelope.rcpt_tos:
            # Delivered-To records the envelope recipient, which the To: header may not show.
            name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.eml"
            data = trace + f"Delivered-To: {recipient}\r\n".encode() + content
            await asyncio.to_thread((self.directory / name).write_bytes, data)
        return "250 2.0.0 kept in the outbox"


class Outbox:
    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.directory = directory
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        handler = OutboxHandler(self.directory)
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
