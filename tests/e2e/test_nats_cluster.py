"""A NATS node may fail: a three-node cluster, the stream at three replicas, one node killed and back.

The proxy, tracker and aggregator run as the processes production runs (``mailbeacon proxy``
etc.), configured by environment, with ``MAILBEACON_NATS_URL`` naming all three servers.
Mail goes through the proxy to a capturing SMTP sink; every copy gets pixel loads, clicks
and a token-authenticated delivery or bounce webhook, concurrently, while the node leading
the stream is SIGKILLed and restarted, then a follower. A webhook answered 503 is sent again,
as a provider would. Afterwards every copy must have been stored exactly as often as the
test made it happen, and the statistics must equal both that and a recount.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
import json
import os
import signal
import smtplib
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from mailbeacon.bus.jetstream import CONSUMER, STREAM, connect
from tests.e2e.test_end_to_end import BROWSER, CAMPAIGN, html_message, tracking_urls
from tests.nats_cluster import NatsCluster, Node
from tests.support import SECRET, SmtpSink, eventually, free_port, wait_http_ok

pytestmark = pytest.mark.slow

TOKEN = "cluster-webhook-token-0123456789"
RECIPIENTS_PER_MESSAGE = 3
MAX_BACKLOG = 30  # copies received upstream and not yet given their pixels, clicks and webhook


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "nats")
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


@dataclass
class Processes:
    """The components, each a ``mailbeacon`` process of its own, stopped by PID."""

    smtp_port: int
    tracker: str
    aggregator: str
    running: list[asyncio.subprocess.Process] = field(default_factory=list)


@asynccontextmanager
async def components(tmp_path: Path, cluster: NatsCluster, sink: SmtpSink) -> AsyncIterator[Processes]:
    tracker_port, aggregator_port, smtp_port, proxy_http = (free_port() for _ in range(4))
    tracker = f"http://127.0.0.1:{tracker_port}"
    common = {
        **os.environ,
        "MAILBEACON_NATS_URL": cluster.url,
        "MAILBEACON_STREAM_REPLICAS": "3",
        "MAILBEACON_SECRET_KEYS": SECRET,
        "MAILBEACON_SITE_URL": tracker,
        "MAILBEACON_DATA_DIR": str(tmp_path / "data"),
    }
    roles = {
        "aggregator": {
            "MAILBEACON_AGGREGATOR_LISTEN": f"127.0.0.1:{aggregator_port}",
            "MAILBEACON_DATABASE_URL": f"sqlite:///{tmp_path / 'mailbeacon.db'}",
            "MAILBEACON_MIGRATE_ON_START": "true",
            "MAILBEACON_INGEST_BATCH_SIZE": "200",
        },
        "tracker": {
            "MAILBEACON_TRACKER_LISTEN": f"127.0.0.1:{tracker_port}",
            "MAILBEACON_WEBHOOK_TOKEN": TOKEN,
        },
        "proxy": {
            "MAILBEACON_SMTP_LISTEN": f"127.0.0.1:{smtp_port}",
            "MAILBEACON_PROXY_HTTP_LISTEN": f"127.0.0.1:{proxy_http}",
            "MAILBEACON_UPSTREAM_SMTP": sink.url,
            "MAILBEACON_AUTO_CREATE_CAMPAIGNS": "true",
        },
    }
    processes = Processes(smtp_port, tracker, f"http://127.0.0.1:{aggregator_port}")
    command = str(Path(sys.executable).parent / "mailbeacon")
    try:
        for role, env in roles.items():
            with (tmp_path / f"{role}.log").open("wb") as log:  # the child keeps its own descriptor
                processes.running.append(
                    await asyncio.create_subprocess_exec(
                        command, role, env={**common, **env}, stdout=log, stderr=log, start_new_session=True
                    )
                )
        # A busy machine (the suite on every core) can keep a three-node cluster's JetStream
        # from answering for a while; the components wait for it (provision_patiently).
        await wait_http_ok(f"{processes.aggregator}/readyz", within=60)
        await wait_http_ok(f"{tracker}/readyz", within=60)
        await wait_http_ok(f"http://127.0.0.1:{proxy_http}/readyz", within=60)
        yield processes
    finally:
        for process in processes.running:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.running:
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


def send_mail(port: int, recipients: list[str]) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo()
        refused = smtp.sendmail("news@shop.example.com", recipients, html_message(recipients).as_bytes())
        return len(recipients) - len(refused)


@dataclass
class Webhook:
    kind: str  # "delivery" or "bounce"
    first_sent: float = 0.0
    stored_at: float = 0.0  # when it was answered 2xx


class Traffic:
    """Mail through the proxy; for every copy the upstream received, pixels and clicks, then a
    webhook, posted again while it is answered 503. The three go on at the same time (a
    webhook being retried holds up no pixel). Counts what each answer promised to store."""

    def __init__(self, processes: Processes, sink: SmtpSink) -> None:
        self.processes = processes
        self.sink = sink
        self.opens: Counter[str] = Counter()  # tracking id -> pixel loads answered 200
        self.clicks: Counter[str] = Counter()  # tracking id -> clicks answered with the redirect
        self.webhooks: dict[str, Webhook] = {}  # tracking id -> its delivery or bounce
        self.retries = 0
        self.failures: list[str] = []  # answers no recipient or provider should ever get
        self.handled = 0  # copies of the sink given their pixels and clicks
        self.hooked = 0  # copies whose webhook was answered
        self._queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self._hooks: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._mailing = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._numbers = itertools.count()

    def start(self) -> None:
        self._mailing.set()
        self._tasks = [
            *(asyncio.create_task(self._mailer()) for _ in range(2)),
            asyncio.create_task(self._watch_sink()),
            *(asyncio.create_task(self._copy_worker()) for _ in range(4)),
            *(asyncio.create_task(self._webhook_worker()) for _ in range(4)),
        ]

    async def stop(self) -> None:
        """Stop sending mail, then finish the requests for every copy the upstream received."""
        self._mailing.clear()
        await asyncio.gather(*self._tasks[:2])

        async def all_handled() -> bool:
            return self.handled == self.hooked == len(self.sink.messages)

        await eventually(all_handled, within=60)
        for task in self._tasks[2:]:
            task.cancel()
        await asyncio.gather(*self._tasks[2:], return_exceptions=True)

    async def _mailer(self) -> None:
        while self._mailing.is_set():
            if len(self.sink.messages) - self.handled > MAX_BACKLOG:
                # Mail no faster than its copies get their requests: all three kinds of
                # traffic then go on at once, through each failover.
                await asyncio.sleep(0.02)
                continue
            n = next(self._numbers)
            recipients = [f"r{n}-{i}@example.com" for i in range(RECIPIENTS_PER_MESSAGE)]
            try:
                await asyncio.to_thread(send_mail, self.processes.smtp_port, recipients)
            except (smtplib.SMTPException, OSError) as exc:
                self.failures.append(f"mail {n}: {exc!r}")

    async def _watch_sink(self) -> None:
        seen = 0
        while True:
            while seen < len(self.sink.messages):
                self._queue.put_nowait((seen, self.sink.messages[seen].content))
                seen += 1
            await asyncio.sleep(0.02)

    async def _copy_worker(self) -> None:
        async with aiohttp.ClientSession(headers=BROWSER) as http:
            while True:
                index, content = await self._queue.get()
                try:
                    await self._copy(http, index, content)
                except (aiohttp.ClientError, OSError, IndexError) as exc:  # IndexError: no pixel or link
                    self.failures.append(f"copy {index}: {exc!r}")
                    self.hooked += 1  # no webhook follows
                self.handled += 1

    async def _webhook_worker(self) -> None:
        async with aiohttp.ClientSession() as http:
            while True:
                tid, kind = await self._hooks.get()
                try:
                    await self._webhook(http, tid, kind)
                except (aiohttp.ClientError, OSError) as exc:
                    self.failures.append(f"{kind} webhook {tid}: {exc!r}")
                self.hooked += 1

    async def _copy(self, http: aiohttp.ClientSession, index: int, content: bytes) -> None:
        tid, pixels, clicks = tracking_urls(content)
        # Some copies opened twice, some clicked twice (the same link: no scanner burst).
        for _ in range(2 if index % 3 == 0 else 1):
            async with http.get(pixels[0]) as response:
                await response.read()
                if response.status == 200:
                    self.opens[tid] += 1
                else:
                    self.failures.append(f"pixel {tid}: {response.status}")
        for _ in range(2 if index % 4 == 0 else 1):
            async with http.get(clicks[0], allow_redirects=False) as response:
                if response.status == 302:
                    self.clicks[tid] += 1
                else:
                    self.failures.append(f"click {tid}: {response.status}")
        self._hooks.put_nowait((tid, "bounce" if index % 5 == 0 else "delivery"))

    async def _webhook(self, http: aiohttp.ClientSession, tid: str, kind: str) -> None:
        """Posted until answered 2xx, the same body every time, as a provider retries."""
        hook = self.webhooks[tid] = Webhook(kind, first_sent=time.monotonic())
        body: dict[str, Any] = {"tracking_id": tid, "timestamp": datetime.now(UTC).isoformat()}
        if kind == "bounce":
            body |= {"bounce_type": "hard", "reason": "550 5.1.1 user unknown"}
        url = f"{self.processes.tracker}/track/{kind}/"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        while True:
            async with http.post(url, json=body, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    hook.stored_at = time.monotonic()
                    return
                if response.status != 503:
                    self.failures.append(f"{kind} webhook {tid}: {response.status}")
                    return
            self.retries += 1
            await asyncio.sleep(0.5)


async def stream_leader(nc: NATS) -> str:
    """The server leading the event stream, from ``$JS.API.STREAM.INFO`` (once there is one)."""

    async def leader() -> str | None:
        try:
            info = await nc.jetstream().stream_info(STREAM)
        except Exception:  # no leader yet, or the request went to the node just killed
            return None
        return info.cluster.leader if info.cluster else None

    return str(await eventually(leader, within=30, interval=0.2))


async def lead(nc: NATS, name: str) -> None:
    """Have server ``name`` lead the stream and the aggregator's consumer (a leader stepdown
    naming it), so that a kill hits what the test means it to."""
    js = nc.jetstream()
    stepdowns = {
        "stream": f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}",
        "consumer": f"$JS.API.CONSUMER.LEADER.STEPDOWN.{STREAM}.{CONSUMER}",
    }
    asked: dict[str, float] = {}

    async def leading() -> bool:
        try:
            leaders = {
                "stream": (await js.stream_info(STREAM)).cluster.leader,
                "consumer": (await js.consumer_info(STREAM, CONSUMER)).cluster.leader,
            }
        except Exception:  # an election under way
            return False
        for group, leader in leaders.items():
            if leader not in (None, name) and time.monotonic() - asked.get(group, 0.0) > 2.0:
                asked[group] = time.monotonic()
                request = json.dumps({"placement": {"preferred": name}}).encode()
                with contextlib.suppress(Exception):
                    await nc.request(stepdowns[group], request, timeout=2)
        return all(leader == name for leader in leaders.values())

    await eventually(leading, within=30, interval=0.2)


async def feed_node(cluster: NatsCluster) -> Node:
    """The server the aggregator's own pull-feed connection is connected to."""

    async def found() -> Node | None:
        return await asyncio.to_thread(cluster.holding, "mailbeacon-aggregator-feed")

    node: Node = await eventually(found, within=20)
    return node


async def replicas_current(nc: NATS) -> bool:
    """Every replica of the stream is online and caught up with its leader."""
    try:
        info = await nc.jetstream().stream_info(STREAM)
    except Exception:
        return False
    peers = (info.cluster.replicas or []) if info.cluster else []
    return (
        bool(info.cluster and info.cluster.leader)
        and len(peers) == 2
        and all(p.current and not p.offline for p in peers)
    )


async def more_copies(traffic: Traffic, count: int) -> None:
    """Wait until ``count`` more copies got their requests."""
    target = traffic.handled + count

    async def reached() -> bool:
        return traffic.handled >= target

    await eventually(reached, within=60)


@dataclass
class Failover:
    killed: str
    role: str
    seconds: float  # from the kill to the first webhook stored after it
    refused: int  # webhook answers 503 meanwhile


async def kill_and_restore(
    cluster: NatsCluster, node: Node, role: str, traffic: Traffic, nc: NATS
) -> Failover:
    retries_before = traffic.retries
    await asyncio.to_thread(cluster.kill, node)
    killed_at = time.monotonic()  # the process is gone

    async def stored_again() -> float | None:
        after = [h.stored_at for h in traffic.webhooks.values() if h.first_sent > killed_at and h.stored_at]
        return min(after) if after else None

    first_stored = await eventually(stored_again, within=60, interval=0.05)
    # Traffic goes on with the node down for a while, then the node comes back on its store.
    await more_copies(traffic, 15)
    await asyncio.to_thread(cluster.start_node, node)
    await eventually(lambda: replicas_current(nc), within=60, interval=0.2)
    await more_copies(traffic, 15)
    return Failover(node.name, role, first_stored - killed_at, traffic.retries - retries_before)


async def stored_events(http: aiohttp.ClientSession, aggregator: str) -> list[dict[str, str]]:
    async with http.get(f"{aggregator}/api/campaigns/{CAMPAIGN}/export.csv") as response:
        assert response.status == 200
        return list(csv.DictReader(io.StringIO(await response.text())))


async def test_a_nats_node_may_fail_and_nothing_is_lost_or_doubled(
    tmp_path: Path, cluster: NatsCluster, sink: SmtpSink
) -> None:
    started = time.monotonic()
    nc = await connect(cluster.url, "test")
    try:
        async with components(tmp_path, cluster, sink) as processes, aiohttp.ClientSession() as http:
            traffic = Traffic(processes, sink)
            traffic.start()
            await more_copies(traffic, 20)

            # First the node leading both the stream and the aggregator's consumer: both elect
            # a new leader. Then a follower: the node the aggregator's feed is connected to.
            leader = cluster.node(await stream_leader(nc))
            await lead(nc, leader.name)
            failovers = [await kill_and_restore(cluster, leader, "stream and consumer leader", traffic, nc)]
            feed = await feed_node(cluster)
            await lead(nc, next(n for n in cluster.nodes if n is not feed).name)
            failovers.append(await kill_and_restore(cluster, feed, "follower holding the feed", traffic, nc))
            phases = {"failovers": time.monotonic() - started}
            await traffic.stop()
            phases["traffic"] = time.monotonic() - started

            assert traffic.failures == []  # every pixel, click and mail answered, before, during, after
            assert failovers[0].refused > 0  # webhooks were refused while the stream had no leader
            copies = {tracking_urls(m.content)[0]: m.recipients for m in sink.messages}
            assert len(copies) == len(sink.messages)  # one tracking id per copy
            assert all(len(recipients) == 1 for recipients in copies.values())
            assert set(traffic.webhooks) == set(copies)
            bounced = {tid for tid, hook in traffic.webhooks.items() if hook.kind == "bounce"}
            expected = {
                "sent_count": len(copies),
                "failed_count": 0,
                "delivered_count": len(copies) - len(bounced),
                "bounced_count": len(bounced),
                "total_opens": sum(traffic.opens.values()),
                "unique_opens": len(traffic.opens),
                "total_clicks": sum(traffic.clicks.values()),
                "unique_clicks": len(traffic.clicks),
            }
            statistics = f"{processes.aggregator}/api/campaigns/{CAMPAIGN}/statistics"

            async def counted() -> dict[str, Any]:
                async with http.get(statistics) as response:
                    stats = dict(await response.json())
                assert {key: stats.get(key) for key in expected} == expected
                return stats

            await eventually(counted, within=120, interval=0.5)
            phases["counted"] = time.monotonic() - started
            async with http.post(f"{processes.aggregator}/api/campaigns/{CAMPAIGN}/refresh") as response:
                assert response.status == 200
                recount = dict(await response.json())
            assert {key: recount[key] for key in expected} == expected

            # Per copy: one sent, and each open, click and webhook that was answered stored once.
            stored = Counter(
                (e["type"], e["tracking_id"]) for e in await stored_events(http, processes.aggregator)
            )
            assert {tid for (kind, tid) in stored if kind == "sent"} == set(copies)
            assert {stored["sent", tid] for tid in copies} == {1}
            assert {tid: stored["opened", tid] for tid in copies} == {
                tid: traffic.opens[tid] for tid in copies
            }
            assert {tid: stored["clicked", tid] for tid in copies} == {
                tid: traffic.clicks[tid] for tid in copies
            }
            for tid, hook in traffic.webhooks.items():
                assert stored["bounced" if hook.kind == "bounce" else "delivered", tid] == 1
    finally:
        await nc.close()
    # While the consumer had no leader the aggregator asked again with a pause, not
    # thousands of times a second, each with a warning.
    aggregator_log = (tmp_path / "aggregator.log").read_text()
    assert aggregator_log.count("refused a pull request") <= 10, aggregator_log[-3000:]
    report = ", ".join(f"{f.role} {f.killed}: {f.seconds:.1f} s, {f.refused} webhooks 503" for f in failovers)
    print(
        f"\n{len(copies)} copies, {traffic.retries} webhook retries; failover {report}; "
        f"{time.monotonic() - started:.0f} s in all ({', '.join(f'{k} at {v:.0f} s' for k, v in phases.items())})"
    )
