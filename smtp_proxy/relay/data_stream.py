"""DATA as a stream: a message given as slices goes upstream without ever being copied whole.

aiosmtplib's own DATA normalises line endings and doubles dots over the whole message,
several copies of it at once. Here the slices (mostly views of the received bytes) are
cut at line breaks, made transparent block by block, gathered into socket-sized writes
and sent with flow control.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Iterator

import aiosmtplib

from smtp_proxy.rewrite.mime import Buffer

# CRs before a LF belong to the line break (as Postfix reads them); any other bare CR
# becomes a line break too, so no upstream can read one as part of an end of DATA.
_LINE_ENDINGS = re.compile(rb"\r*\n|\r")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_CHUNK = 256 * 1024


def _transparent(block: bytes) -> bytes:
    """One block (starting at a line start) with CRLF line endings and leading dots doubled."""
    crlf = block.count(b"\r\n")
    if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
        block = _LINE_ENDINGS.sub(b"\r\n", block)
    if block[:1] == b"." or b"\n." in block:
        block = _LEADING_DOT.sub(b"..", block)
    return block  # the common case costs three memchr scans and no copy


def _blocks(pieces: Iterable[Buffer]) -> Iterator[bytes]:
    carry = b""
    last = b"\n"
    for piece in pieces:
        view = memoryview(piece)
        for offset in range(0, len(view), _CHUNK):
            block = carry + bytes(view[offset : offset + _CHUNK])
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                carry = block
                continue
            # Cut after a line break, so each block starts at the start of a line.
            ready, carry = block[:cut], block[cut:]
            last = ready[-1:]
            yield _transparent(ready)
    if carry:
        last = carry[-1:]
        yield _transparent(carry)
    if last != b"\n":
        yield b"\r\n"


def smtp_data(pieces: Iterable[Buffer]) -> Iterator[bytes]:
    """The message as DATA wants it: CRLF line endings, leading dots doubled, in bounded chunks.

    Small pieces (headers, rewritten parts, delimiters) are gathered into one write: a
    send per piece costs more than the copy.
    """
    gathered: list[bytes] = []
    size = 0
    for block in _blocks(pieces):
        gathered.append(block)
        size += len(block)
        if size >= _CHUNK:
            yield gathered[0] if len(gathered) == 1 else b"".join(gathered)
            gathered, size = [], 0
    if gathered:
        yield b"".join(gathered)


async def send_data(
    client: aiosmtplib.SMTP, pieces: Iterable[Buffer], reply_timeout: float
) -> tuple[int, str]:
    """DATA with the content streamed; the final reply as ``(code, text)``."""
    response = await client.execute_command(b"DATA")
    if response.code != 354:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("connection lost before the message")
    # An early refusal (a server that stops reading) must be kept for read_response.
    protocol._response_pending = True
    for chunk in smtp_data(pieces):
        protocol.write(chunk)
        # Flow control: never buffer more than the socket takes, nor wait forever for it.
        try:
            await asyncio.wait_for(protocol._drain_helper(), reply_timeout)
        except TimeoutError as exc:
            raise aiosmtplib.SMTPTimeoutError("upstream stopped reading the message") from exc
    protocol.write(b".\r\n")
    response = await protocol.read_response(timeout=reply_timeout)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response.code, response.message
