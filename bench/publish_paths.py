"""The tracker's buffered events over its own NATS path and over nats-py's public API, in one run.

Two publishers take the same pixel events, encoded as the tracker encodes them
(:func:`tracker.engagement.engagement.engagement_message`), into the same buffer:

- ``custom``: :class:`mailbeacon.bus.publisher.EventPublisher` as the tracker runs it: ready
  protocol frames, JetStream fast batches (one acknowledgement per 128 events);
- ``nats-py``: the same publisher whose flush uses only nats-py's public API,
  ``js.publish_async`` with ``Nats-Msg-Id`` for each event of a batch (at most a batch, 512,
  in flight) and the acknowledgements awaited with the same timeout (:class:`NatsPyPublisher`).

Each round runs in a child process of its own, so its CPU time is its alone, against the
tracker's stream on an embedded nats-server (fast batches allowed, as the tracker provisions
it), in two loads: ``drain`` (100,000 events buffered at once, published as fast as the path
goes: events/s) and ``paced`` (20,000 events/s handed over a millisecond's worth at a time, as
the tracker's arrivals do: the CPU it costs at the rate one tracker process serves). Rounds
alternate between the paths; the stream is purged between rounds and must have stored every
event of each. Reported: medians of events/s and CPU µs per event of the publishing process
and of nats-server.

``python -m bench.publish_paths`` runs this comparison alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from mailbeacon.bus.fast_batch import Outgoing
from mailbeacon.bus.publisher import _FLUSH_BATCH, EventPublisher

# custom-single: the custom publisher as it runs where the stream refuses fast batches (an
# older server, STREAM_FAST_BATCHES=false): raw frames, an acknowledgement per event.
PATHS = ("custom", "custom-single", "nats-py")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DRAIN_EVENTS = 100_000
PACED_RATE = 20_000  # events/s: about what one tracker process serves (docs/performance.md "Tracker")
PACED_SECONDS = 3.0
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
PROVISIONING_KEY = "bench-provisioning-key-0123456789abcdef"  # settings need one; never signs


class NatsPyPublisher(EventPublisher):
    """:class:`EventPublisher` whose buffered events go out through nats-py's public API only.

    A batch is published with ``js.publish_async`` (one reply subscription, a future per
    event) and its acknowledgements are awaited with the publisher's timeout; what is not
    acknowledged goes back to the front of the buffer, as in the custom path.
    """

    async def _flush_once(self, batch_size: int = _FLUSH_BATCH) -> bool:
        assert self._js is not None
        js: JetStreamContext = self._js
        batch = [self._buffer.popleft() for _ in range(min(batch_size, len(self._buffer)))]
        futures: list[asyncio.Future[object]] = []
        try:
            for subject, event_id, frame, header_size in batch:
                futures.append(
                    await js.publish_async(
                        subject.decode(), frame[header_size:], headers={"Nats-Msg-Id": event_id}
                    )
                )
                if len(futures) % 64 == 0:
                    await asyncio.sleep(0)  # let the requests sharing this loop be served meanwhile
            if futures:
                await asyncio.wait(futures, timeout=self._timeout)
        finally:
            failed: list[Outgoing] = []
            for n, message in enumerate(batch):
                future = futures[n] if n < len(futures) else None
                if (
                    future is not None
                    and future.done()
                    and not future.cancelled()
                    and future.exception() is None
                ):
                    self.published += 1
                    if self._ledger is not None:
                        self._stored_spooled(message)
                else:
                    if future is not None:
                        future.cancel()  # frees its place among nats-py's pending publishes
                    failed.append(message)
            self._buffer.extendleft(reversed(failed))
        return not failed


async def stream_count(nats_url: str, create: bool = False) -> int:
    """The events in the stream; with ``create``, the stream provisioned first (as a tracker would)."""
    from mailbeacon.bus.jetstream import STREAM, connect, provision
    from mailbeacon.contract.settings import Settings

    nc = await connect(nats_url, "bench")
    try:
        if create:
            await provision(nc.jetstream(), Settings(secret_keys=PROVISIONING_KEY))
        return int((await nc.jetstream().stream_info(STREAM)).state.messages)
    finally:
        await nc.close()


def make_publisher(path: str, js: JetStreamContext) -> EventPublisher:
    return {"nats-py": NatsPyPublisher, "custom-single": SinglePublisher, "custom": EventPublisher}[path](js)


def pixel_messages(count: int) -> list[Outgoing]:
    from mailbeacon.contract.events import EventType
    from tracker import classify
    from tracker.engagement.engagement import engagement_message

    ids = [str(uuid.UUID(int=i + 1)) for i in range(1000)]
    return [
        engagement_message(
            EventType.OPENED, ids[i % 1000], "203.0.113.7", BROWSER_UA, classify.HUMAN, "pixel"
        )
        for i in range(count)
    ]


# -- the child: one round of one path --------------------------------------------------------


async def _child(nats_url: str, path: str, load: str) -> None:
    from mailbeacon.bus.jetstream import connect

    count = DRAIN_EVENTS if load == "drain" else int(PACED_RATE * PACED_SECONDS)
    nc = await connect(nats_url, f"bench-publish-{path}")
    js = nc.jetstream()
    warm = make_publisher(path, js)  # the first publication's subscriptions, out of the figures
    for message in pixel_messages(1000):
        warm.publish_encoded_later(message)
    await warm.close(60)
    messages = pixel_messages(count)
    publisher = make_publisher(path, js)
    print("ready", flush=True)
    sys.stdin.readline()
    loop = asyncio.get_running_loop()
    cpu, started = time.process_time(), loop.time()
    if load == "drain":
        for message in messages:
            publisher.publish_encoded_later(message)
    else:
        handed = 0
        while handed < count:
            due = min(count, int((loop.time() - started) * PACED_RATE) + 1)
            for message in messages[handed:due]:
                publisher.publish_encoded_later(message)
            handed = due
            await asyncio.sleep(0.001)
    await publisher.close(120)
    elapsed, cpu = loop.time() - started, time.process_time() - cpu
    print(
        json.dumps(
            {"events": publisher.published, "seconds": elapsed, "cpu": cpu, "left": publisher.buffered}
        ),
        flush=True,
    )
    await nc.close()


# -- the parent: alternating rounds ----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    path: str
    load: str
    events: int
    stored: int
    rate: float
    cpu_us: float  # the publishing process, per event
    nats_us: float  # nats-server, per event


async def _stream_messages(nats_url: str, purge: bool = False) -> int:
    from mailbeacon.bus.jetstream import STREAM, connect

    nc = await connect(nats_url, "bench-publish-admin")
    try:
        js = nc.jetstream()
        if purge:
            await js.purge_stream(STREAM)
        return int((await js.stream_info(STREAM)).state.messages)
    finally:
        await nc.close()


def one_round(nats_url: str, nats_pid: int, path: str, load: str) -> Round:
    asyncio.run(_stream_messages(nats_url, purge=True))
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.publish_paths", "--child", nats_url, path, load],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {path} publisher did not start")
        asyncio.run(_stream_messages(nats_url, purge=True))  # the warm-up's events out of the count
        nats_before = cpu_seconds(nats_pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        result = json.loads(child.stdout.readline())
        nats_cpu = cpu_seconds(nats_pid) - nats_before
    finally:
        child.wait(60)
    stored = asyncio.run(_stream_messages(nats_url))
    events = int(result["events"])
    return Round(
        path,
        load,
        events,
        stored,
        events / result["seconds"],
        result["cpu"] / events * 1e6,
        nats_cpu / events * 1e6,
    )


def compare(nats_url: str, nats_pid: int, rounds: int = ROUNDS) -> list[str]:
    """Table rows: per load and path, the medians and how many times nats-py's figure it is."""
    rows = []
    for load in ("drain", "paced"):
        runs: dict[str, list[Round]] = {path: [] for path in PATHS}
        for _ in range(rounds):
            for path in PATHS:
                runs[path].append(one_round(nats_url, nats_pid, path, load))
        base_rate = statistics.median(r.rate for r in runs["nats-py"])
        base_cpu = statistics.median(r.cpu_us for r in runs["nats-py"])
        for path, results in runs.items():
            rate, cpu = (
                statistics.median(r.rate for r in results),
                statistics.median(r.cpu_us for r in results),
            )
            rows.append(
                f"| {load} | {path} | {rate:,.0f} | {rate / base_rate:.2f} | {cpu:.1f} | {base_cpu / cpu:.2f} "
                f"| {statistics.median(r.nats_us for r in results):.1f} "
                f"| {'yes' if all(r.stored == r.events for r in results) else 'NO'} "
                f"| {' '.join(f'{r.cpu_us:.1f}' for r in results)} |"
            )
            print(rows[-1], flush=True)
    return rows


async def _frame_cost(nats_url: str, count: int = 50_000, rounds: int = ROUNDS) -> tuple[float, float]:
    """CPU µs to hand one event's frame to the connection: nats-py's public ``publish()`` with
    the reply subject and ``Nats-Msg-Id`` header a fast batch needs, against the raw frames
    :func:`mailbeacon.bus.fast_batch.send_commands` writes (what its private attributes buy)."""
    from mailbeacon.bus.fast_batch import send_commands
    from mailbeacon.bus.jetstream import connect

    nc = await connect(nats_url, "bench-frames")
    messages = pixel_messages(count)
    public, raw = [], []
    reply = "_INBOX.bench.128.fail."
    try:
        for _ in range(rounds):
            cpu = time.process_time()
            for n, (_, event_id, frame, header_size) in enumerate(messages):
                await nc.publish(
                    "bench.frames",
                    frame[header_size:],
                    reply=f"{reply}{n}.1.$FI",
                    headers={"Nats-Msg-Id": event_id},
                )
            await nc.flush()
            public.append((time.process_time() - cpu) / count * 1e6)
            cpu = time.process_time()
            prefix = reply.encode()
            for start in range(0, count, 64):
                await send_commands(
                    nc,
                    [
                        b"HPUB bench.frames %s%d.1.$FI %d %d\r\n%s\r\n" % (prefix, n, size, len(frame), frame)
                        for n, (_, _, frame, size) in enumerate(messages[start : start + 64], start)
                    ],
                )
            await nc.flush()
            raw.append((time.process_time() - cpu) / count * 1e6)
    finally:
        await nc.close()
    return statistics.median(public), statistics.median(raw)


def frame_cost(nats_url: str) -> str:
    public, raw = asyncio.run(_frame_cost(nats_url))
    return (
        "| writing one event's frame | nats-py `publish()` | raw frames (`send_commands`) | ratio |\n"
        f"|---|---:|---:|---:|\n| CPU µs/event | {public:.2f} | {raw:.2f} | {public / raw:.1f} |"
    )


HEADER = (
    "| load | path | events/s | vs nats-py | CPU µs/event (publisher) | nats-py's CPU ÷ this "
    "| nats-server µs/event | all stored | CPU µs/event per round |\n"
    "|---|---|---:|---:|---:|---:|---:|---|---|"
)


def main() -> None:
    from mailbeacon.app.embedded_nats import EmbeddedNats

    print(
        f"Tracker publish paths: {ROUNDS} alternating rounds per path and load (median shown); "
        f"drain {DRAIN_EVENTS:,} events, paced {PACED_RATE:,}/s for {PACED_SECONDS:.0f} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        nats = EmbeddedNats(Path(tmp) / "nats")
        nats_url = nats.start()
        try:
            asyncio.run(stream_count(nats_url, create=True))
            assert nats.process is not None
            rows = compare(nats_url, nats.process.pid)
            frames = frame_cost(nats_url)
        finally:
            nats.stop()
    print()
    print(HEADER)
    for row in rows:
        print(row)
    print()
    print(frames)


class SinglePublisher(EventPublisher):
    """The custom publisher as it runs where the stream refuses fast batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast_batches_after = float("inf")


def serve_tracker(path: str) -> None:
    """``mailbeacon tracker`` (one worker) with the publisher of ``path``."""
    import tracker.service
    from mailbeacon.app.cli import main as cli_main

    tracker.service.EventPublisher = {"nats-py": NatsPyPublisher, "custom-single": SinglePublisher}[path]  # type: ignore[misc]
    cli_main(["tracker"])


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        asyncio.run(_child(*sys.argv[2:]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--tracker":
        serve_tracker(sys.argv[2])
    else:
        with contextlib.suppress(KeyboardInterrupt):
            main()
