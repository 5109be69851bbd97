"""Tracker throughput: pixel and click redirect under 64 connections, against a bare aiohttp handler.

Both servers run as separate processes started the way operators start them (the tracker
through ``mailbeacon tracker [--workers N]``), the tracker publishing every event to a real
embedded JetStream. Load comes from ``wrk`` when installed (``apt-get install wrk``), else
from the small aiohttp load generator below. Each request names another recipient copy, and
clicks carry valid signatures, so the tracker does all of its real work. After each run the
stream is checked: every request answered must have become a stored event.

Then the tracker's own NATS path against nats-py's public API (:mod:`bench.publish_paths`):
publishing alone, and a tracker worker per path loaded in alternation (docs/performance.md
"The NATS paths, measured").

``python -m bench tracker``; ``python -m bench.bench_tracker --paths`` runs only the comparison
of the NATS paths; ``python -m bench.bench_tracker --bare PORT WORKERS`` serves the baseline on
its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from bench.publish_paths import stream_count
from mailbeacon.app.embedded_nats import EmbeddedNats
from mailbeacon.contract.signing import click_url, pixel_url

CONNECTIONS = 64
DURATION = int(os.environ.get("BENCH_SECONDS", "5"))  # seconds per run
WARMUP = 2
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
# Distinct tracking ids cycled through: at the rates measured here a copy comes round again
# only after a few seconds, as a person's second click would, and not within the click
# burst window (1 s), where its clicks would pile up in one held group as a scanner's do.
COPIES = 100_000
SECRET = "bench-signing-key-0123456789abcdefghij"
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
NO_STORE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}


# --- the baseline: the same answers with no work behind them -----------------------------------


def bare_app() -> web.Application:
    async def pixel(_: web.Request) -> web.Response:
        return web.Response(body=GIF, content_type="image/gif", headers=NO_STORE)

    async def click(request: web.Request) -> web.Response:
        location = request.query.get("url", "/")
        return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/track/pixel/{tracking_id}/", pixel)
    app.router.add_get("/track/click/{tracking_id}/", click)
    app.router.add_get("/healthz", healthz)
    return app


def _serve_bare(port: int) -> None:
    web.run_app(bare_app(), host="127.0.0.1", port=port, access_log=None, reuse_port=True, print=None)


def serve_bare(port: int, workers: int) -> None:
    if workers <= 1:
        _serve_bare(port)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_serve_bare, args=(port,)) for _ in range(workers)]
    for process in processes:
        process.start()

    def stop(*_: object) -> None:
        for process in processes:
            if process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    for process in processes:
        process.join()


# --- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    child = subprocess.Popen(args, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{args[:3]} did not start") from None
                time.sleep(0.1)
        yield child
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def tracker_process(port: int, nats_url: str, workers: int, publisher: str = "custom"):  # type: ignore[no-untyped-def]
    env = {
        "MAILBEACON_NATS_URL": nats_url,
        "MAILBEACON_SECRET_KEYS": SECRET,
        "MAILBEACON_TRACKER_LISTEN": f"127.0.0.1:{port}",
        "MAILBEACON_SITE_URL": f"http://127.0.0.1:{port}",
        "MAILBEACON_LOG_LEVEL": "WARNING",
    }
    if publisher != "custom":  # bench.publish_paths: the same tracker with another publish path
        return process([sys.executable, "-m", "bench.publish_paths", "--tracker", publisher], port, env)
    mailbeacon = Path(sys.executable).parent / "mailbeacon"
    return process([str(mailbeacon), "tracker", "--workers", str(workers)], port, env)


def bare_process(port: int, workers: int):  # type: ignore[no-untyped-def]
    return process([sys.executable, "-m", "bench.bench_tracker", "--bare", str(port), str(workers)], port)


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Result:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float = 0.0  # server CPU time (all its processes) per request


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (the workers), from /proc."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += tree_cpu_seconds(int(child))
    except (OSError, ValueError, IndexError):
        pass
    return total


def measured(pid: int, port: int, kind: str, duration: int, work: Path) -> Result:
    before = tree_cpu_seconds(pid)
    result = load(port, kind, duration, work)
    result.cpu_us = (tree_cpu_seconds(pid) - before) / max(result.requests, 1) * 1e6
    return result


@functools.cache
def paths(kind: str) -> list[str]:
    site = "http://127.0.0.1"
    keys = [SECRET.encode()]
    ids = [str(uuid.UUID(int=i + 1)) for i in range(COPIES)]
    if kind == "pixel":
        urls = [pixel_url(site, tid) for tid in ids]
    else:
        urls = [
            click_url(site, keys, tid, f"https://shop.example.com/item/{i % 7}") for i, tid in enumerate(ids)
        ]
    return [url.removeprefix(site) for url in urls]


_WRK_SCRIPT = """
local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
local i = math.random(#paths)
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i], {["User-Agent"] = os.getenv("BENCH_UA")})
end
"""


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(port: int, kind: str, duration: int, work: Path) -> Result:
    listing = work / f"{kind}-paths.txt"
    if not listing.exists():
        listing.write_text("\n".join(paths(kind)) + "\n")
    (work / "script.lua").write_text(_WRK_SCRIPT)
    env = {**os.environ, "BENCH_PATHS": str(listing), "BENCH_UA": BROWSER_UA}
    args = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency", "-s", str(work / "script.lua")]
    output = subprocess.run(
        [*args, f"http://127.0.0.1:{port}"], env=env, capture_output=True, text=True, check=True
    ).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return Result(
        requests=int(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(latency["50"]),
        p99_ms=_ms(latency["99"]),
        errors=(int(errors.group(1)) if errors else 0)
        + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
    )


async def _python_load(port: int, kind: str, duration: int) -> Result:
    import aiohttp

    urls = [f"http://127.0.0.1:{port}{path}" for path in paths(kind)]
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": BROWSER_UA}) as http:

        async def client(offset: int) -> None:
            nonlocal errors
            index = offset
            while time.monotonic() < deadline:
                index = (index + CONNECTIONS) % len(urls)
                started = time.perf_counter()
                async with http.get(urls[index], allow_redirects=False) as response:
                    await response.read()
                    errors += response.status >= 400
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(CONNECTIONS)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return Result(
        len(latencies),
        len(latencies) / elapsed,
        latencies[len(latencies) // 2] * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
        errors,
    )


def load(port: int, kind: str, duration: int, work: Path) -> Result:
    if shutil.which("wrk"):
        return wrk(port, kind, duration, work)
    return asyncio.run(_python_load(port, kind, duration))


def wait_stored(nats_url: str, expected: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    count = asyncio.run(stream_count(nats_url))
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        count = asyncio.run(stream_count(nats_url))
    return count


# --- the table -----------------------------------------------------------------------------------


def median(results: list[Result]) -> Result:
    """The middle run by throughput: the machine is shared, so one slow run should not decide."""
    ordered = sorted(results, key=lambda r: r.rps)
    middle = ordered[len(ordered) // 2]
    return Result(
        sum(r.requests for r in results),
        middle.rps,
        middle.p50_ms,
        middle.p99_ms,
        sum(r.errors for r in results),
        sorted(r.cpu_us for r in results)[len(results) // 2],
    )


def compare(kind: str, workers: int, nats_url: str, work: Path) -> str:
    """Bare and tracker served side by side and loaded in alternation, ROUNDS times each."""
    bare_port, tracker_port = free_port(), free_port()
    with (
        bare_process(bare_port, workers) as bare_server,
        tracker_process(tracker_port, nats_url, workers) as ours_server,
    ):
        before = asyncio.run(stream_count(nats_url))
        answered = load(tracker_port, kind, WARMUP, work).requests
        load(bare_port, kind, WARMUP, work)
        bare_runs, our_runs = [], []
        for _ in range(ROUNDS):
            bare_runs.append(measured(bare_server.pid, bare_port, kind, DURATION, work))
            our_runs.append(measured(ours_server.pid, tracker_port, kind, DURATION, work))
        answered += sum(r.requests for r in our_runs)
        stored = wait_stored(nats_url, before + answered) - before
    bare, ours = median(bare_runs), median(our_runs)
    ratio = ours.rps / bare.rps if bare.rps else 0.0
    verdict = "ok" if ratio >= 0.7 and ours.p99_ms < 20 and stored >= answered else "below goal"
    return (
        f"| {kind} | {workers} | {bare.rps:,.0f} | {bare.p50_ms:.2f} / {bare.p99_ms:.2f} "
        f"| {ours.rps:,.0f} | {ours.p50_ms:.2f} / {ours.p99_ms:.2f} | {ratio:.2f} "
        f"| {bare.cpu_us:.0f} / {ours.cpu_us:.0f} | {stored:,} / {answered:,} | {ours.errors + bare.errors} | {verdict} |"
    )


def compare_publishers(kind: str, nats_url: str, work: Path) -> list[str]:
    """One tracker worker per publish path (bench.publish_paths.PATHS), loaded in alternation;
    a row per path with its figures against the tracker's own (``custom``)."""
    from bench.publish_paths import PATHS

    ports = {path: free_port() for path in PATHS}
    with contextlib.ExitStack() as servers:
        pids = {
            path: servers.enter_context(tracker_process(port, nats_url, 1, publisher=path)).pid
            for path, port in ports.items()
        }
        before = asyncio.run(stream_count(nats_url))
        answered = sum(load(port, kind, WARMUP, work).requests for port in ports.values())
        runs: dict[str, list[Result]] = {path: [] for path in PATHS}
        for _ in range(ROUNDS):
            for path, port in ports.items():
                runs[path].append(measured(pids[path], port, kind, DURATION, work))
        answered += sum(r.requests for results in runs.values() for r in results)
        stored = wait_stored(nats_url, before + answered) - before
    medians = {path: median(results) for path, results in runs.items()}
    base = medians["custom"]
    return [
        f"| {kind} | {path} | {m.rps:,.0f} | {m.rps / base.rps if base.rps else 0:.2f} | {m.p50_ms:.2f} / {m.p99_ms:.2f} "
        f"| {m.cpu_us:.0f} | {m.cpu_us / base.cpu_us if base.cpu_us else 0:.2f} | {m.errors} "
        f"| {stored:,} / {answered:,} |"
        for path, m in medians.items()
    ]


def publish_paths(nats_url: str, nats_pid: int, work: Path) -> None:
    """Issue 17's question for the tracker: is its own NATS path worth its code (at least 1.3 times faster)?"""
    from bench import publish_paths

    print("\nThe tracker's NATS paths against nats-py's public API (publishing alone, no HTTP)", flush=True)
    rows = publish_paths.compare(nats_url, nats_pid)
    print(publish_paths.HEADER)
    for row in rows:
        print(row)
    print()
    print(publish_paths.frame_cost(nats_url), flush=True)
    print("\nThe same, end to end: one tracker worker per publish path, loaded in alternation", flush=True)
    rows = compare_publishers("pixel", nats_url, work)
    print(
        "| endpoint | path | req/s | vs custom | p50 / p99 ms | CPU µs/request | vs custom "
        "| errors | events stored / requests (all paths) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for row in rows:
        print(row)


def main(only_paths: bool = False) -> None:
    workers_n = max(2, os.cpu_count() or 1)
    generator = "wrk -t1" if shutil.which("wrk") else "aiohttp load generator"
    print(
        f"{CONNECTIONS} connections, {ROUNDS} alternating rounds of {DURATION}s per server (median shown), "
        f"{generator}, {os.cpu_count()} cores",
        flush=True,
    )
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-tracker-") as tmp:
        work = Path(tmp)
        nats = EmbeddedNats(work / "nats")
        nats_url = nats.start()
        try:
            asyncio.run(stream_count(nats_url, create=True))
            if not only_paths:
                for workers in (1, workers_n):
                    for kind in ("pixel", "click"):
                        rows.append(compare(kind, workers, nats_url, work))
                        print(rows[-1], flush=True)
                print()
                print(
                    "| endpoint | workers | bare req/s | bare p50 / p99 ms | tracker req/s | tracker p50 / p99 ms "
                    "| ratio | CPU µs/request bare / tracker | events stored / requests | errors | goal (≥0.7, p99<20ms) |"
                )
                print("|---|---|---|---|---|---|---|---|---|---|---|")
                for row in rows:
                    print(row)
            assert nats.process is not None
            publish_paths(nats_url, nats.process.pid, work)
        finally:
            nats.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        serve_bare(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1:] == ["--paths"]:
        main(only_paths=True)  # only the comparison of the two NATS paths
    else:
        main()
