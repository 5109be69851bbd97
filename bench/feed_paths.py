"""The aggregator's ingest feed over its own NATS path and over nats-py's public API, in one run.

- ``custom``: :class:`aggregator.ingest.feed.PullFeed` as the aggregator runs it: a lean protocol
  connection (:mod:`aggregator.ingest.wire`), pull requests kept outstanding for three batches, raw
  ``(ack subject, payload)`` pairs, a batch's acknowledgements in one write;
- ``nats-py``: :class:`NatsPyFeed`, the same interface built on nats-py's public API only:
  ``js.pull_subscribe_bind`` to the durable consumer, ``fetch(batch)``, and ``msg.ack()``
  (``nak``/``term``) per message after the commit.

Two measures. The feed alone: a child process takes 200,000 stored events (fewer when the
stream holds fewer, as with ``bench_aggregator --events``) through a fresh durable consumer
and acknowledges each batch at once, with no database work (events/s, CPU µs per event of
the child and of nats-server). Then ingest: a real ``mailbeacon aggregator`` process, with
each feed, stores the stream's first 200,000 events (or all it holds) into a new SQLite
database (events/s up to the last acknowledgement, CPU µs per event of the aggregator and
nats-server). Rounds alternate between the two paths; medians are reported.

``python -m bench.feed_paths`` runs both on a stream of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from aggregator.ingest.feed import ACK, TERM, Delivery
from mailbeacon.bus.jetstream import ALL_EVENTS, CONSUMER_ACK_WAIT_SECONDS, STREAM, connect

PATHS = ("custom", "nats-py")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
FEED_EVENTS = 200_000
FEED_BATCH = 5000  # the aggregator's default INGEST_BATCH_SIZE
INGEST_EVENTS = 200_000
INGEST_ROUNDS = 2


class NatsPyFeed:
    """:class:`aggregator.ingest.feed.PullFeed`'s interface on nats-py's public pull-consumer API.

    ``take`` is one ``fetch``; ``settle`` acknowledges message by message through the ``Msg``
    each acknowledgement subject belongs to. A refused fetch (503: nobody serves the consumer)
    pauses the next one, as the custom feed does.
    """

    def __init__(self, nc: NATS, stream: str, consumer: str, batch: int, **_: object) -> None:
        self._nc = nc
        self._stream = stream
        self._consumer = consumer
        self.batch = batch
        self._sub: nats.js.JetStreamContext.PullSubscription | None = None
        self._unsettled: dict[bytes, Msg] = {}
        self.refusals = 0
        self._pause = 0.0

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected) and self._sub is not None

    async def start(self) -> None:
        self._sub = await self._nc.jetstream().pull_subscribe_bind(
            durable=self._consumer, stream=self._stream, pending_msgs_limit=max(65536, self.batch * 4)
        )

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def take(self, wait: float) -> list[Delivery]:
        if self._sub is None:
            return []
        try:
            messages = await self._sub.fetch(self.batch, timeout=wait)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except APIError:
            self.refusals += 1
            self._pause = min(max(self._pause * 2, 0.1), 1.0)
            await asyncio.sleep(self._pause)
            return []
        self._pause = 0.0
        taken = []
        for msg in messages:
            reply = msg.reply.encode()
            self._unsettled[reply] = msg
            taken.append((reply, msg.data))
        return taken

    async def settle(self, replies: Sequence[bytes], verdict: bytes) -> bool:
        try:
            for reply in replies:
                msg = self._unsettled.pop(reply, None)
                if msg is None:
                    continue
                if verdict == ACK:
                    await msg.ack()
                elif verdict == TERM:
                    await msg.term()
                else:  # b'-NAK {"delay": <ns>}'
                    await msg.nak(delay=json.loads(verdict[5:])["delay"] / 1e9)
        except Exception:
            return False
        return True


def make_feed(path: str, nc: NATS, consumer: str, batch: int) -> object:
    from aggregator.ingest.feed import PullFeed

    return (
        NatsPyFeed(nc, STREAM, consumer, batch)
        if path == "nats-py"
        else PullFeed(nc, STREAM, consumer, batch)
    )


# -- the feed alone --------------------------------------------------------------------------


async def _child(nats_url: str, path: str, consumer: str, count: str) -> None:
    wanted = int(count)
    nc = await connect(nats_url, f"bench-feed-{path}")
    feed = make_feed(path, nc, consumer, FEED_BATCH)
    await feed.start()  # type: ignore[attr-defined]
    print("ready", flush=True)
    sys.stdin.readline()
    cpu, started = time.process_time(), time.perf_counter()
    taken = size = 0
    while taken < wanted:
        batch = await feed.take(wait=0.5)  # type: ignore[attr-defined]
        for _, payload in batch:
            size += len(payload)  # what the consumer would decode
        await feed.settle([reply for reply, _ in batch], ACK)  # type: ignore[attr-defined]
        taken += len(batch)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"events": taken, "seconds": elapsed, "cpu": cpu}), flush=True)
    await feed.stop()  # type: ignore[attr-defined]
    await nc.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    path: str
    events: int
    rate: float
    cpu_us: float  # the consuming process (or the aggregator), per event
    nats_us: float  # nats-server, per event
    acked: int  # the consumer's ack floor afterwards (stream sequence)


async def _consumer(nats_url: str, name: str, *, create: bool, wanted: int) -> int:
    """Create (or delete) a durable consumer like the aggregator's; its ack floor once it
    reaches ``wanted`` (or after 30 s)."""
    nc = await connect(nats_url, "bench-feed-admin")
    try:
        js = nc.jetstream()
        if create:
            config = ConsumerConfig(
                durable_name=name,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                filter_subject=ALL_EVENTS,
                ack_wait=CONSUMER_ACK_WAIT_SECONDS,
                max_ack_pending=20000,
            )
            await js.add_consumer(STREAM, config=config)
            return 0
        floor = 0
        for _ in range(300):  # acknowledgements may still be on their way: wait for them a while
            floor = int((await js.consumer_info(STREAM, name)).ack_floor.stream_seq or 0)
            if floor >= wanted:
                break
            await asyncio.sleep(0.1)
        await js.delete_consumer(STREAM, name)
        return floor
    finally:
        await nc.close()


def feed_round(nats_url: str, nats_pid: int, path: str, number: int, wanted: int) -> Round:
    name = f"bench-feed-{path.replace('-', '')}-{number}"
    asyncio.run(_consumer(nats_url, name, create=True, wanted=0))
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.feed_paths", "--child", nats_url, path, name, str(wanted)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {path} feed did not start")
        nats_before = cpu_seconds(nats_pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        result = json.loads(child.stdout.readline())
        nats_cpu = cpu_seconds(nats_pid) - nats_before
    finally:
        child.wait(60)
    floor = asyncio.run(_consumer(nats_url, name, create=False, wanted=wanted))
    events = int(result["events"])
    return Round(
        path,
        events,
        events / result["seconds"],
        result["cpu"] / events * 1e6,
        nats_cpu / events * 1e6,
        floor,
    )


def _row(label: str, runs: dict[str, list[Round]], wanted: int) -> str:
    med = {
        path: (
            statistics.median(r.rate for r in rs),
            statistics.median(r.cpu_us for r in rs),
            statistics.median(r.nats_us for r in rs),
        )
        for path, rs in runs.items()
    }
    (c_rate, c_cpu, c_nats), (n_rate, n_cpu, n_nats) = med["custom"], med["nats-py"]
    short = [f"{r.path} {r.acked:,}" for rs in runs.values() for r in rs if r.acked < min(r.events, wanted)]
    return (
        f"| {label} | {c_rate:,.0f} | {n_rate:,.0f} | {c_rate / n_rate:.2f} | {c_cpu:.1f} | {n_cpu:.1f} "
        f"| {n_cpu / c_cpu:.2f} | {c_nats:.1f} / {n_nats:.1f} | {'NO: ' + ', '.join(short) if short else 'yes'} "
        f"| {' '.join(f'{r.cpu_us:.1f}' for r in runs['custom'])} / {' '.join(f'{r.cpu_us:.1f}' for r in runs['nats-py'])} |"
    )


HEADER = (
    "| measure | custom events/s | nats-py events/s | custom ÷ nats-py | custom CPU µs/event | nats-py CPU µs/event "
    "| nats-py ÷ custom | nats-server µs/event custom / nats-py | all acknowledged | CPU µs/event per round custom / nats-py |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
)


def compare_feeds(nats_url: str, nats_pid: int, wanted: int, rounds: int = ROUNDS) -> str:
    runs: dict[str, list[Round]] = {path: [] for path in PATHS}
    for number in range(rounds):
        for path in PATHS:
            runs[path].append(feed_round(nats_url, nats_pid, path, number, wanted))
    row = _row(f"feed alone, {wanted:,} events, batches of {FEED_BATCH:,}", runs, wanted)
    print(row, flush=True)
    return row


# -- ingest into SQLite with each feed ------------------------------------------------------


def serve_aggregator() -> None:
    """``mailbeacon aggregator`` with :class:`NatsPyFeed` in place of the custom pull feed."""
    import aggregator.ingest.consumer
    from mailbeacon.app.cli import main as cli_main

    aggregator.ingest.consumer.PullFeed = NatsPyFeed  # type: ignore[assignment, misc]
    cli_main(["aggregator"])


def ingest_round(nats_url: str, nats_pid: int, path: str, workdir: Path, number: int, wanted: int) -> Round:
    from bench.aggregator_world import cpu_seconds as tree_cpu
    from bench.aggregator_world import reset_consumer, start_aggregator, wait_ingested

    asyncio.run(reset_consumer(nats_url))
    database = workdir / f"ingest-{path}-{number}.db"
    aggregator = start_aggregator(nats_url, f"sqlite:///{database}", workdir, None, feed=path)
    try:
        before = tree_cpu([aggregator.process.pid]), cpu_seconds(nats_pid)
        seconds = asyncio.run(wait_ingested(nats_url, 1, wanted))
        after = tree_cpu([aggregator.process.pid]), cpu_seconds(nats_pid)
    finally:
        aggregator.stop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    return Round(
        path,
        wanted,
        wanted / seconds,
        (after[0] - before[0]) / wanted * 1e6,
        (after[1] - before[1]) / wanted * 1e6,
        wanted,
    )


def compare_ingest(
    nats_url: str, nats_pid: int, workdir: Path, wanted: int, rounds: int = INGEST_ROUNDS
) -> str:
    runs: dict[str, list[Round]] = {path: [] for path in PATHS}
    for number in range(rounds):
        for path in PATHS:
            runs[path].append(ingest_round(nats_url, nats_pid, path, workdir, number, wanted))
    row = _row(f"ingest into SQLite, first {wanted:,} stream events", runs, wanted)
    print(row, flush=True)
    return row


def compare(nats_url: str, nats_pid: int, workdir: Path, stored: int) -> list[str]:
    """Both measures, on the first events of a stream holding ``stored`` of them."""
    return [
        compare_feeds(nats_url, nats_pid, min(FEED_EVENTS, stored)),
        compare_ingest(nats_url, nats_pid, workdir, min(INGEST_EVENTS, stored)),
    ]


def main() -> None:
    import shutil
    import tempfile

    from bench.aggregator_world import CAMPAIGNS, generate, provision_stream, publish
    from mailbeacon.app.embedded_nats import EmbeddedNats

    workdir = Path(tempfile.mkdtemp(prefix="bench-feed-"))
    nats = EmbeddedNats(workdir / "nats")
    try:
        nats_url = nats.start()
        asyncio.run(provision_stream(nats_url))
        _, stored = asyncio.run(
            publish(nats_url, generate(max(FEED_EVENTS, INGEST_EVENTS), CAMPAIGNS, seed=5))
        )
        assert nats.process is not None
        print("The aggregator's NATS path against nats-py's public API", flush=True)
        rows = compare(nats_url, nats.process.pid, workdir, stored)
        print()
        print(HEADER)
        for row in rows:
            print(row)
    finally:
        nats.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        asyncio.run(_child(*sys.argv[2:]))
    elif sys.argv[1:] == ["--aggregator"]:
        serve_aggregator()
    else:
        main()
