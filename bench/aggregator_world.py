"""The aggregator benchmarks' world: generated events, JetStream, a real aggregator process and
the CPU it spends. Shared by :mod:`bench.bench_aggregator` (ingest, reads, refresh) and
:mod:`bench.feed_paths` (the NATS paths), so neither imports the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailbeacon.bus.jetstream import CONSUMER, STREAM, connect, provision
from mailbeacon.contract.settings import Settings


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


CAMPAIGNS = 10
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
LINKS = [f"https://shop.example.com/p/{i}?utm_source=mail" for i in range(8)]
AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
]


def event_dict(kind: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "type": kind, "occurred_at": at.isoformat(), **fields}


def message_events(
    rng: random.Random, campaign: str, index: int, spread_hours: float
) -> list[dict[str, Any]]:
    """One recipient copy's life: sent or failed, delivery, maybe bounces, opens, clicks."""
    tid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    recipient = f"user{index}@example{index % 97}.com"
    sent = START + timedelta(hours=rng.random() * spread_hours)
    base = {"campaign": campaign, "recipient": recipient}
    if rng.random() < 0.01:
        return [
            event_dict(
                "failed", sent, tracking_id=tid, source="proxy", reason="550 5.1.1 no such user", **base
            )
        ]
    out = [
        event_dict(
            "sent", sent, tracking_id=tid, source="proxy", metadata={"message_id": f"<{tid}@app>"}, **base
        )
    ]
    later = lambda hours: sent + timedelta(hours=rng.expovariate(1 / hours))  # noqa: E731
    roll = rng.random()
    if roll < 0.02:
        out.append(
            event_dict("bounced", later(0.1), tracking_id=tid, bounce_kind="hard", source="webhook:ses")
        )
        return out
    if roll < 0.03:
        out.append(event_dict("bounced", later(2), tracking_id=tid, bounce_kind="soft", source="webhook:ses"))
    if rng.random() < 0.03:
        out.append(event_dict("deferred", later(0.5), tracking_id=tid, source="webhook:sendgrid"))
    # One delivery in ten is an address-only webhook (no tracking id).
    if rng.random() < 0.1:
        out.append(event_dict("delivered", later(0.2), recipient=recipient, source="webhook:generic"))
    else:
        out.append(event_dict("delivered", later(0.2), tracking_id=tid, source="webhook:sendgrid"))
    if rng.random() < 0.6:  # opens: Apple's privacy proxy opens everything once, people open repeatedly
        if rng.random() < 0.3:
            out.append(
                event_dict("opened", later(0.05), tracking_id=tid, source="pixel", machine=True,
                       machine_kind="apple_privacy_proxy", ip="17.58.0.0", user_agent="Mozilla/5.0")
            )  # fmt: skip
        for _ in range(1 + int(rng.expovariate(1 / 9))):
            out.append(
                event_dict("opened", later(20), tracking_id=tid, source="pixel", ip="203.0.113.0",
                       user_agent=rng.choice(AGENTS))
            )  # fmt: skip
    if rng.random() < 0.25:
        for _ in range(1 + int(rng.expovariate(1 / 9))):
            out.append(
                event_dict("clicked", later(24), tracking_id=tid, source="click", url=rng.choice(LINKS),
                       ip="203.0.113.0", user_agent=rng.choice(AGENTS))
            )  # fmt: skip
    if rng.random() < 0.02:
        out.append(
            event_dict("clicked", later(0.01), tracking_id=tid, source="click", url="mailbeacon:honeypot",
                   machine=True, machine_kind="honeypot")
        )  # fmt: skip
    if rng.random() < 0.005:
        out.append(event_dict("unsubscribed", later(30), tracking_id=tid, source="unsubscribe"))
    if rng.random() < 0.001:
        out.append(event_dict("complained", later(30), tracking_id=tid, source="webhook:ses"))
    return out


def generate(total: int, campaigns: int, seed: int, prefix: str = "bench") -> list[dict[str, Any]]:
    """``total`` events (about ten per message), ordered by the time they arrive."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    i = 0
    while len(events) < total:
        events.extend(message_events(rng, f"{prefix}/campaign-{i % campaigns}", i, spread_hours=6))
        i += 1
    # Arrival order: by time, with jitter so a few events come before their message's sent.
    events.sort(key=lambda e: e["occurred_at"][:16] + str(rng.random())[:4])
    events = events[:total]
    for i in rng.sample(range(len(events)), len(events) // 100):  # 1% re-sent (provider retries)
        events.append(events[i])
    return events


async def publish(nats_url: str, events: list[dict[str, Any]]) -> tuple[float, int]:
    """Publish with many acks in flight; returns the seconds taken and the stream's last sequence.

    Re-sent events go without ``Nats-Msg-Id`` so JetStream keeps them and the aggregator's
    own duplicate check has to drop them.
    """
    nc = await connect(nats_url, "bench-publisher")
    js = nc.jetstream()
    seen: set[str] = set()
    started = time.perf_counter()
    window = 4000
    for i in range(0, len(events), window):
        pending = []
        for e in events[i : i + window]:
            headers = None if e["event_id"] in seen else {"Nats-Msg-Id": e["event_id"]}
            seen.add(e["event_id"])
            pending.append(
                js.publish(f"mailbeacon.events.{e['type']}", json.dumps(e).encode(), headers=headers)
            )
        await asyncio.gather(*pending)
    elapsed = time.perf_counter() - started
    last = int((await js.stream_info(STREAM)).state.last_seq)
    await nc.close()
    return elapsed, last


async def reset_consumer(nats_url: str) -> None:
    nc = await connect(nats_url, "bench-admin")
    with contextlib.suppress(Exception):  # absent on the first run
        await nc.jetstream().delete_consumer(STREAM, CONSUMER)
    await nc.close()


async def ack_floor(nats_url: str) -> int:
    nc = await connect(nats_url, "bench-admin")
    try:
        info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
    finally:
        await nc.close()
    return int(info.ack_floor.stream_seq or 0)


@dataclass
class Aggregator:
    process: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_aggregator(
    nats_url: str, database_url: str, workdir: Path, batch: int | None, feed: str = "custom"
) -> Aggregator:
    """A ``mailbeacon aggregator`` process; ``feed="nats-py"``: with bench.feed_paths' nats-py feed."""
    port_probe = __import__("socket").socket()
    port_probe.bind(("127.0.0.1", 0))
    port = port_probe.getsockname()[1]
    port_probe.close()
    env = {
        **os.environ,
        "MAILBEACON_NATS_URL": nats_url,
        "MAILBEACON_DATABASE_URL": database_url,
        "MAILBEACON_AGGREGATOR_LISTEN": f"127.0.0.1:{port}",
        "MAILBEACON_DATA_DIR": str(workdir),
        "MAILBEACON_MIGRATE_ON_START": "true",
        "MAILBEACON_LOG_LEVEL": "WARNING",
    }
    if batch is not None:
        env["MAILBEACON_INGEST_BATCH_SIZE"] = str(batch)
    log = open(workdir / "aggregator.log", "ab")  # noqa: SIM115  (closed with the process)
    command = (
        ["bench.feed_paths", "--aggregator"] if feed == "nats-py" else ["mailbeacon.app.cli", "aggregator"]
    )
    process = subprocess.Popen([sys.executable, "-m", *command], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return Aggregator(process, port)
        except OSError:
            if process.poll() is not None:
                tail = (workdir / "aggregator.log").read_text()[-3000:]
                raise RuntimeError(f"aggregator exited:\n{tail}") from None
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("aggregator did not come up")


async def wait_ingested(nats_url: str, first_seq: int, last_seq: int) -> float:
    """Seconds the aggregator takes for stream messages first..last, timed from its first ack."""
    first: tuple[float, int] | None = None
    while True:
        floor = await ack_floor(nats_url)
        now = time.perf_counter()
        if first is None and floor >= first_seq:
            first = (now, floor)
        if floor >= last_seq:
            assert first is not None
            done = max(1, last_seq - first[1])
            return (now - first[0]) * (last_seq - first_seq + 1) / done
        await asyncio.sleep(0.1)


def cpu_seconds(pids: list[int], reaped: bool = False) -> float:
    """User and system CPU time of these processes (all their threads) so far, from /proc;
    ``reaped``: also that of their children which have exited (PostgreSQL's backends)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone, or not Linux
        ticks += int(fields[11]) + int(fields[12])
        if reaped:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (PostgreSQL's postmaster and its backends)."""
    found = [root]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{root}/task"):
            for child in Path(f"/proc/{root}/task/{task}/children").read_text().split():
                found += process_tree(int(child))
    return found


async def provision_stream(nats_url: str) -> None:
    nc = await connect(nats_url, "bench-admin")
    await provision(nc.jetstream(), Settings(nats_url=nats_url, stream_max_age_days=1))
    await nc.close()
