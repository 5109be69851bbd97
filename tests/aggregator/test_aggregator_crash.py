"""Aggregator processes killed with SIGKILL while ingesting: nothing lost, nothing counted twice.

Real ``mailbeacon aggregator`` processes consume a real JetStream stream into SQLite or
PostgreSQL and are killed (SIGKILL, no chance to clean up) several times in the middle
of their batches, one process or two at once. After the last restart the statistics
served equal a recount written here from the published events, and equal ``refresh``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailbeacon.bus.jetstream import CONSUMER, STREAM, connect, consumer_config, stream_config
from mailbeacon.contract.settings import Settings
from mailbeacon.contract.signing import HONEYPOT_URL
from tests.support import eventually, free_port

pytestmark = pytest.mark.slow  # processes killed mid-ingest, seconds each

CAMPAIGNS = ("crash/one", "crash/two")
LINKS = ("https://shop.example/a", "https://shop.example/b", HONEYPOT_URL)


AGENTS = [  # Apple Mail on an iPhone, Outlook on Windows, webmail in Chrome on Android
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Mobile Safari/537.36",
]


def generate(messages: int, seed: int) -> list[dict[str, Any]]:
    """A stream with out-of-order opens, address-only deliveries and machine clicks."""
    rng = random.Random(seed)
    start = datetime(2026, 4, 1, 8, tzinfo=UTC)
    events: list[dict[str, Any]] = []
    for i in range(messages):
        tid, recipient = str(uuid.UUID(int=rng.getrandbits(128), version=4)), f"user{i}@crash.example"
        at = start + timedelta(minutes=rng.randrange(600))

        def event(kind: str, minutes: float, at: datetime = at, **fields: Any) -> None:
            moment = (at + timedelta(minutes=minutes)).isoformat()
            events.append({"event_id": uuid.uuid4().hex, "type": kind, "occurred_at": moment, **fields})

        event("sent", 0, tracking_id=tid, campaign=CAMPAIGNS[i % 2], recipient=recipient)
        if rng.random() < 0.3:
            event("delivered", 1, recipient=recipient, source="webhook:generic")  # address only
        else:
            event("delivered", 1, tracking_id=tid, source="webhook:sendgrid")
        for _ in range(rng.randrange(4)):
            event(
                "opened",
                rng.uniform(-5, 300),
                tracking_id=tid,
                machine=rng.random() < 0.3,
                source="pixel",
                user_agent=rng.choice(AGENTS),
            )
        for _ in range(rng.randrange(3)):
            url = rng.choice(LINKS)
            event("clicked", rng.uniform(1, 300), tracking_id=tid, url=url, machine=url == HONEYPOT_URL)
        if rng.random() < 0.05:
            event("bounced", 2, tracking_id=tid, bounce_kind=rng.choice(["hard", "soft"]))
    rng.shuffle(events)  # arrival order has nothing to do with time
    return events


def recount(events: list[dict[str, Any]], campaign: str) -> dict[str, Any]:
    """The statistics these events must produce, from the definitions."""
    unique = {e["event_id"]: e for e in events}.values()
    messages = {e["tracking_id"]: e for e in unique if e["type"] == "sent" and e["campaign"] == campaign}
    by_address = {m["recipient"]: tid for tid, m in messages.items()}
    per_message: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in unique:
        tid = e.get("tracking_id") or by_address.get(e.get("recipient", ""))
        if tid in messages and e["type"] != "sent":
            per_message[tid].append(e)

    def having(kind: str, human: bool = False) -> int:
        return sum(
            1
            for evs in per_message.values()
            if any(e["type"] == kind and not (human and e.get("machine")) for e in evs)
        )

    def total(kind: str, human: bool = False) -> int:
        return sum(
            1
            for evs in per_message.values()
            for e in evs
            if e["type"] == kind and not (human and e.get("machine"))
        )

    links: dict[str, list[Any]] = defaultdict(lambda: [0, set()])
    for tid, evs in per_message.items():
        for e in evs:
            if e["type"] == "clicked" and e["url"] != HONEYPOT_URL:
                links[e["url"]][0] += 1
                links[e["url"]][1].add(tid)
    hard = sum(
        1
        for evs in per_message.values()
        if any(e["type"] == "bounced" and e["bounce_kind"] == "hard" for e in evs)
    )
    return {
        "sent_count": len(messages),
        "total_recipients": len(messages),
        "delivered_count": having("delivered"),
        "bounced_count": having("bounced"),
        "hard_bounced_count": hard,
        "unique_opens": having("opened"),
        "total_opens": total("opened"),
        "human_unique_opens": having("opened", human=True),
        "human_total_opens": total("opened", human=True),
        "unique_clicks": having("clicked"),
        "total_clicks": total("clicked"),
        "human_unique_clicks": having("clicked", human=True),
        "top_links": sorted(
            ({"url": u, "total_clicks": t, "unique_clicks": len(q)} for u, (t, q) in links.items()),
            key=lambda link: (-link["total_clicks"], -link["unique_clicks"], link["url"]),
        ),
    }


class Aggregators:
    """``mailbeacon aggregator`` child processes, each stopped by its own PID."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, port: int | None = None) -> subprocess.Popen[bytes]:
        env = {**self.env, "MAILBEACON_AGGREGATOR_LISTEN": f"127.0.0.1:{port or free_port()}"}
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "mailbeacon.app.cli", "aggregator"], env=env, stdout=log, stderr=log
            )
        self.processes.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def ack_floor(nats_url: str) -> tuple[int, int]:
    nc = await connect(nats_url, "crash-test")
    try:
        info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
    finally:
        await nc.close()
    return int(info.ack_floor.stream_seq or 0), int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def publish(nats_url: str, events: list[dict[str, Any]]) -> int:
    nc = await connect(nats_url, "crash-test")
    js = nc.jetstream()
    await js.add_stream(config=stream_config(Settings(nats_url=nats_url)))
    # The durable consumer as an operator could tune it: what a killed process held is
    # redelivered after 2 s instead of the default minute (aggregators keep it as it is).
    config = consumer_config()
    config.ack_wait = 2.0
    await js.add_consumer(STREAM, config=config)
    for i in range(0, len(events), 500):
        await asyncio.gather(
            *(
                js.publish(
                    f"mailbeacon.events.{e['type']}",
                    json.dumps(e).encode(),
                    headers={"Nats-Msg-Id": e["event_id"]},
                )
                for e in events[i : i + 500]
            )
        )
    # Redeliveries JetStream cannot catch (no Nats-Msg-Id): the aggregator must drop them.
    for e in events[:: max(1, len(events) // 200)]:
        await js.publish(f"mailbeacon.events.{e['type']}", json.dumps(e).encode())
    last = int((await js.stream_info(STREAM)).state.last_seq)
    await nc.close()
    return last


@pytest.fixture(
    params=[
        pytest.param(("postgresql", 1), marks=pytest.mark.postgres),
        pytest.param(("postgresql", 2), marks=pytest.mark.postgres),
        ("sqlite", 2),
    ],
    ids=lambda p: f"{p[0]}-x{p[1]}",
)
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    kind, replicas = request.param
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'crash.db'}", replicas
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"crash_{uuid.uuid4().hex[:10]}"
        server.psql(f'CREATE DATABASE "{name}";')
        yield str(server.get_uri(name)), replicas


async def test_sigkill_while_ingesting_loses_and_doubles_nothing(
    setup: tuple[str, int], nats_url: str, tmp_path: Path
) -> None:
    database_url, replicas = setup
    events = generate(500, seed=replicas)
    last = await publish(nats_url, events)
    env = {
        **os.environ,
        "MAILBEACON_NATS_URL": nats_url,
        "MAILBEACON_DATABASE_URL": database_url,
        "MAILBEACON_DATA_DIR": str(tmp_path / "data"),
        "MAILBEACON_MIGRATE_ON_START": "true",  # replicas starting together migrate once
        "MAILBEACON_INGEST_BATCH_SIZE": "50",  # many transactions, so kills land inside them
        "MAILBEACON_LOG_LEVEL": "WARNING",
    }
    aggregators = Aggregators(env, tmp_path / "aggregators.log")
    rng = random.Random(7)
    try:
        running = [aggregators.start() for _ in range(replicas)]
        kills = 0
        while kills < 4:
            _, before = await ack_floor(nats_url)

            async def progressed(before: int = before) -> bool:
                _, outstanding = await ack_floor(nats_url)
                return outstanding < before or outstanding == 0

            await eventually(progressed, within=30)  # the new process is consuming
            if (await ack_floor(nats_url))[1] == 0:
                break  # finished before the next kill: enough kills happened mid-stream
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            victim = running.pop(rng.randrange(len(running)))
            aggregators.kill(victim)
            kills += 1
            running.append(aggregators.start())
        assert kills >= 2, "the aggregator finished before it could be killed twice"
        port = free_port()
        running.append(aggregators.start(port))  # a survivor that serves the API

        async def drained() -> bool:
            floor, outstanding = await ack_floor(nats_url)
            assert floor >= last and outstanding == 0, (floor, last, outstanding)
            return True

        await eventually(drained, within=60, interval=0.2)
        async with aiohttp.ClientSession() as http:

            async def serving() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError as exc:
                    raise AssertionError(f"not listening yet: {exc}") from exc

            await eventually(serving, within=30, interval=0.1)
            for campaign in CAMPAIGNS:
                expected = recount(events, campaign)
                url = f"http://127.0.0.1:{port}/api/campaigns/{campaign}/statistics"

                async def settled(url: str = url, expected: dict[str, Any] = expected) -> dict[str, Any]:
                    async with http.get(url) as response:
                        assert response.status == 200, await response.text()
                        stats = dict(await response.json())
                    # Parked events are adopted within a few seconds by any replica.
                    assert {k: stats[k] for k in expected} == expected
                    return stats

                await eventually(settled, within=20, interval=0.3)
                async with http.post(f"http://127.0.0.1:{port}/api/campaigns/{campaign}/refresh") as response:
                    refreshed = await response.json()
                assert {k: refreshed[k] for k in expected} == expected
    finally:
        aggregators.stop_all()
