"""JetStream fast-ingest batches: many events published with one acknowledgement per batch.

A plain JetStream publish gets an acknowledgement per message, which the server has to
build and send and the publisher has to parse: a few microseconds for every pixel and
click. A fast batch (nats-server 2.14+, ADR-50; the stream must allow it) stores each
message as it arrives and acknowledges every ``flow`` messages and the batch's end. The
protocol is carried in each message's reply subject,
``<inbox>.<flow>.<gap mode>.<batch sequence>.<operation>.$FI``; the server answers on it:

- ``{"type":"ack","seq":N,"msgs":F}``: messages 1..N are stored (gap mode ``fail``), and
  from now on an acknowledgement comes every F messages;
- ``{"type":"gap",...}`` or ``{"type":"err","seq":N,...}``: the batch stops there;
- the end of the batch (operation 3, a message that is not stored) gets a publish
  acknowledgement with the batch's ``count``, or an ``error``.

The raw publish frames (:func:`outgoing`, :func:`hpub`, :func:`send_commands`) live here
too: the event-by-event publisher in :mod:`mailbeacon.bus.publisher` writes the same ones.

``Nats-Msg-Id`` deduplication works inside fast batches as for single publishes (a
repeated id is skipped silently, the batch goes on), so a batch that ended in doubt is
simply published again.

Why this is not nats-py's public API (custom NATS code stays only where it is at least 1.3
times faster; docs/performance.md "The NATS paths, measured"). Measured 2026-12-07 with
``python -m bench.bench_tracker --paths`` (part of ``make bench``), three runs on the shared 2-core
machine, the same buffered pixel events: this path cost the publishing process 3.0-3.7 µs of
CPU per event, ``js.publish_async`` (nats-py 2.16's cheapest way, a batch in flight) 26-35
µs, 8.4-9.5 times as much, and drained 2.7-4.4 times the events a second; at one tracker
process's rate (20,000 events/s) 5.1-6.4 against 29-30 µs (nats-py fell behind that rate in
every run). A tracker worker publishing through nats-py spent 1.37-1.44 times the CPU per
pixel request. Event by event over the same raw frames (a stream that refuses fast batches):
6.2-9.1 µs, still 3.2-4.9 times less than nats-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from functools import partial

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

_START, _APPEND, _END = 0, 1, 3
FLOW = 128  # acknowledgements requested every FLOW messages (the server may choose fewer)
MAX_OUTSTANDING_ACKS = 2  # unacknowledged flows in flight before the publisher waits


_HEADER_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})

# A message ready to publish: subject, Nats-Msg-Id, and the frame that follows the HPUB line
# (the Nats-Msg-Id header, then the payload) with the size of its header part. Built once
# when an event is buffered; only the reply subject differs from one publication to the next.
Outgoing = tuple[bytes, str, bytes, int]
MSG_ID_HEADER = "NATS/1.0\r\nNats-Msg-Id: "


def outgoing(subject: bytes, event_id: str, payload: bytes) -> Outgoing:
    """``payload`` ready to publish with ``Nats-Msg-Id: event_id`` (as nats-py writes it:
    trimmed, line breaks made spaces)."""
    value = event_id.strip()
    if "\r" in value or "\n" in value:
        value = value.translate(_HEADER_VALUE_NEWLINES)
    header = f"{MSG_ID_HEADER}{value}\r\n\r\n".encode()
    return subject, event_id, header + payload, len(header)


def hpub(message: Outgoing, reply: bytes) -> bytes:
    """The HPUB command publishing ``message`` with ``reply`` as its reply subject."""
    subject, _, frame, header_size = message
    return b"HPUB %s %s %d %d\r\n%s\r\n" % (subject, reply, header_size, len(frame), frame)


def hpub_command(subject: bytes, reply: bytes, event_id: str, payload: bytes) -> bytes:
    """The HPUB protocol line nats-py's ``publish(subject, payload, reply, {"Nats-Msg-Id": ...})``
    sends (a test holds the two to the same bytes)."""
    return hpub(outgoing(subject, event_id, payload), reply)


async def send_commands(nc: NATS, commands: list[bytes]) -> None:
    """Hand protocol commands to nats-py's outgoing buffer and wake its writer, once per chunk.

    What ``publish()`` does per message (validation, header building, a flush per call),
    done once for a chunk of commands built by :func:`hpub_command`. Like ``publish()`` it
    refuses while the connection is closed or, while reconnecting, when the reconnect
    buffer would overflow.
    """
    if nc.is_closed:
        raise ConnectionError("NATS connection closed")
    data = b"".join(commands)
    # Private attributes of nats-py's client (as of nats-py 2.16), for want of a public way
    # to write ready frames: publish() costs 4.4 µs of CPU a message, these joined frames 0.6
    # (``python -m bench.bench_tracker --paths``, 2026-12-07); without them fast batches would
    # cost the tracker twice as much CPU per event (see the module docstring).
    # tests/tracker/test_tracker_hot_path.py holds the frames to the bytes publish() sends, and the
    # publisher's tests run through these calls against a real nats-server, so a nats-py that
    # renames them fails there first. The pending sizes: publish()'s own refusal while
    # reconnecting once the reconnect buffer is full (no public accessor either).
    if not nc.is_connected and nc._pending_data_size + len(data) > nc._max_pending_size:
        raise ConnectionError("NATS reconnect buffer full")
    await nc._send_command(data)  # appends to the outgoing buffer, as publish() does
    await nc._flush_pending()  # wakes the writer task once for the whole chunk


class FastBatchesUnavailable(Exception):
    """The stream (or the server) refused to start a fast batch: publish one by one instead."""


class ReplySink:
    """Takes the replies on an inbox straight from nats-py's reader.

    Given to ``subscribe()`` as the subscription's ``future``, it receives each message
    through ``set_result`` as soon as nats-py has parsed it: no queue and no task switch per
    acknowledgement, as a callback subscription would cost.
    """

    def __init__(self, on_reply: Callable[[Msg], None]) -> None:
        self._on_reply = on_reply

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        self._on_reply(msg)


class _Batch:
    """What the server said so far about one batch."""

    def __init__(self) -> None:
        self.stored = 0  # messages 1..stored are surely stored
        self.flow = FLOW
        self.started = False
        self.finished = False  # the end was acknowledged
        self.failure: str | None = None
        self.not_enabled = False
        self.progress = asyncio.Event()

    def on_reply(self, msg: Msg) -> None:
        # This runs inside nats-py's reader: whatever the reply holds, it must not raise.
        try:
            if msg.headers and msg.headers.get("Status") == "503":
                self.failure = "no stream takes these subjects"
            else:
                self._read(msg.data)
        except Exception as exc:
            self.failure = f"unreadable reply ({exc}): {msg.data[:80]!r}"
        self.progress.set()

    def _read(self, data: bytes) -> None:
        try:
            reply = json.loads(data)
        except ValueError:
            self.failure = f"unreadable reply {data[:80]!r}"
            return
        kind = reply.get("type")
        if kind == "ack":
            self.started = True
            self.stored = max(self.stored, int(reply.get("seq", 0)))
            self.flow = max(1, int(reply.get("msgs") or self.flow))
        elif kind in ("gap", "err"):
            self.failure = f"batch stopped: {data[:200].decode(errors='replace')}"
        elif "error" in reply:
            # Refused before or while it started (fast batches not allowed, too many in
            # flight, ...): the caller publishes these one by one instead.
            error = reply["error"] or {}
            self.not_enabled = not self.started
            self.failure = f"JetStream refused the batch: {error.get('description', error)}"
        elif "count" in reply:  # the end's publish acknowledgement
            self.started = self.finished = True
            self.stored = max(self.stored, int(reply["count"]))
        elif "stream" in reply and "batch" not in reply:
            # A plain publish acknowledgement: the server does not know fast batches (before
            # 2.14) and stored the first message as a single publish.
            self.not_enabled = True
            self.failure = "the server answers fast batches as single publishes"


def _room_for(batch: _Batch, seq: int) -> bool:
    """Whether message ``seq`` may go out (ADR-50: while seq < stored + flow * outstanding)."""
    return batch.stored + batch.flow * MAX_OUTSTANDING_ACKS > seq


async def publish_fast_batch(
    nc: NATS,
    messages: Sequence[Outgoing],
    patience: float,
    chunk: int = 64,
) -> int:
    """Publish ``messages`` (see :func:`outgoing`) as one fast batch; returns how
    many of them, from the first, are surely stored (all of them when the batch ended well).

    ``patience``: seconds the whole batch may wait for the server. Raises :class:`FastBatchesUnavailable` when the stream does not take fast
    batches (then at most the first message was stored, as a single publish).
    """
    if not messages:
        return 0
    inbox = nc.new_inbox()  # two tokens, as the server's reading of the reply subject needs
    batch = _Batch()
    subscription = await nc.subscribe(inbox + ".>", future=ReplySink(batch.on_reply))  # type: ignore[arg-type]
    try:
        prefix = f"{inbox}.{FLOW}.fail.".encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience

        async def answered(ready: Callable[[], bool]) -> bool:
            """Wait (until the deadline) for the server to say enough; False on failure."""
            while not ready() and batch.failure is None:
                batch.progress.clear()
                if deadline <= loop.time():
                    return False
                try:
                    # timeout_at rather than wait_for, which wraps each wait in a task of its own.
                    async with asyncio.timeout_at(deadline):
                        await batch.progress.wait()
                except TimeoutError:
                    return False
            return batch.failure is None

        await send_commands(nc, [hpub(messages[0], b"%s1.%d.$FI" % (prefix, _START))])
        if not await answered(lambda: batch.started):
            if batch.not_enabled:
                raise FastBatchesUnavailable(batch.failure)
            return batch.stored
        position = 1
        while position < len(messages):
            # Never more than MAX_OUTSTANDING_ACKS flows ahead of what the server confirmed.
            window = batch.stored + batch.flow * MAX_OUTSTANDING_ACKS - 1 - position
            if window <= 0:
                if not await answered(partial(_room_for, batch, position + 1)):
                    return batch.stored
                continue
            frames = []
            for seq in range(position + 1, min(len(messages), position + min(window, chunk)) + 1):
                # hpub() with the reply subject written in place: this runs for every event.
                subject, _, frame, header_size = messages[seq - 1]
                frames.append(
                    b"HPUB %s %s%d.%d.$FI %d %d\r\n%s\r\n"
                    % (subject, prefix, seq, _APPEND, header_size, len(frame), frame)
                )
            await send_commands(nc, frames)
            position += len(frames)
            await asyncio.sleep(0)  # let the requests sharing this loop be served meanwhile
        # The end: an empty message that is not stored, only acknowledged.
        end = b"%s%d.%d.$FI" % (prefix, len(messages) + 1, _END)
        await send_commands(nc, [b"PUB %s %s 0\r\n\r\n" % (messages[0][0], end)])
        await answered(lambda: batch.finished)
        return min(batch.stored, len(messages))
    finally:
        with contextlib.suppress(Exception):  # a closed connection: nothing left to unsubscribe
            await subscription.unsubscribe()
