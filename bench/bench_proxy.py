"""SMTP proxy throughput, rewrite latency and peak memory, each next to a same-run baseline.

Messages: 20 KB of HTML with 10 links plus a 100 KB attachment, one recipient each.
  (a) load generator -> SMTP sink
  (b) load generator -> pass-through relay: stock aiosmtpd with the same upstream pool,
      no campaigns, no rewriting, no events -> sink
  (b') the same pass-through on the proxy's own server class (its faster DATA reception),
      so (c)/(b') is the cost of tracking alone
  (c) load generator -> mailbeacon proxy (tracking, events to a real embedded nats-server) -> sink
Sink, relay and proxy each run in their own process; the load generator is asyncio +
aiosmtplib with several connections in flight (Postfix smtp-source as well when installed).
"""

from __future__ import annotations

import asyncio
import email
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

MESSAGES = int(os.environ.get("BENCH_PROXY_MESSAGES", "400"))
CONCURRENCY = 8
ROUNDS = 3
SECRET = "bench-signing-key-0123456789abcdefghij"
BENCH_CAMPAIGN = "default/bench"  # what the messages' X-Campaign: bench names


def build_message(html_bytes: int = 20_000, attachment_bytes: int = 100_000) -> bytes:
    links = "".join(
        f'<tr><td><a href="https://shop.example.com/product/{i}?utm_source=mail&amp;id={i}">Product {i}</a></td></tr>\n'
        for i in range(10)
    )
    filler = "<p>" + "Spring offers for you and your family, this week only. " * 9 + "</p>\n"
    body = "<html><body><table>" + links + "</table>\n"
    while len(body) < html_bytes - 20:
        body += filler
    body = body[: html_bytes - 16] + "</body></html>\n"
    message = EmailMessage()
    message["From"] = "Shop <news@shop.example.com>"
    message["To"] = "ann@example.com"
    message["Subject"] = "Spring sale"
    # As the mail libraries of web frameworks write them (the proxy adds them when absent).
    message["Message-ID"] = make_msgid(domain="shop.example.com")
    message["Date"] = formatdate(usegmt=True)
    message["X-Campaign"] = "bench"
    message.set_content("Spring sale, see https://shop.example.com/")
    message.add_alternative(body, subtype="html")
    message.add_attachment(
        os.urandom(attachment_bytes), maintype="application", subtype="pdf", filename="c.pdf"
    )
    return message.as_bytes().replace(b"\n", b"\r\n")


# -- the processes -----------------------------------------------------------------------


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        return "250 2.0.0 OK"


class PassThrough:
    """The baseline relay: what the proxy does minus campaigns, rewriting and events."""

    def __init__(self, upstream: object) -> None:
        self.upstream = upstream

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        from smtp_proxy.relay.upstream import OutgoingCopy, Upstream

        assert isinstance(self.upstream, Upstream)
        raw = envelope.original_content or b""
        copies = [OutgoingCopy(rcpt, lambda: [raw]) for rcpt in envelope.rcpt_tos]
        results = await self.upstream.deliver(envelope.mail_from or "", copies, envelope.mail_options)
        return "250 OK" if all(r.accepted for r in results) else results[0].reply


async def serve_role(role: str, port_file: Path, upstream_port: int, nats_url: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    closers = []
    from smtp_proxy.session.auth import Networks
    from smtp_proxy.session.server import ListenerPolicy, ProxySMTP

    # The sink and the baseline relay receive with the same server code as the proxy, so
    # the comparison measures what tracking costs, not two ways of reading DATA.
    policy = ListenerPolicy(Networks([]), command_timeout=300, data_timeout=600)
    if role == "sink":
        handler = CountingSink()
        server = await loop.create_server(
            lambda: ProxySMTP(handler, policy=policy, hostname="sink", data_size_limit=None), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        closers.append(server.close)
    elif role in ("relay", "relay-stock"):
        from smtp_proxy.relay.upstream import Upstream, UpstreamConfig

        upstream = Upstream(
            UpstreamConfig.from_url(f"smtp://127.0.0.1:{upstream_port}", pool_size=CONCURRENCY)
        )
        relay = PassThrough(upstream)
        if role == "relay":
            server = await loop.create_server(
                lambda: ProxySMTP(relay, policy=policy, hostname="relay", data_size_limit=None),
                "127.0.0.1",
                0,
            )
        else:
            server = await loop.create_server(
                lambda: SMTP(relay, hostname="relay", data_size_limit=None), "127.0.0.1", 0
            )
        port = server.sockets[0].getsockname()[1]
        closers.append(server.close)
    else:
        from mailbeacon.bus.jetstream import connect, provision
        from mailbeacon.bus.publisher import EventPublisher
        from mailbeacon.contract.settings import Settings
        from smtp_proxy.service import ProxyService

        settings = Settings(
            secret_keys=SECRET,  # type: ignore[arg-type]
            nats_url=nats_url,
            upstream_smtp=f"smtp://127.0.0.1:{upstream_port}",  # type: ignore[arg-type]
            upstream_pool_size=CONCURRENCY,
            smtp_listen="127.0.0.1:0",
            data_dir=port_file.parent / "proxy-data",
            default_campaign=BENCH_CAMPAIGN,  # the campaign X-Campaign names (no KV bucket here)
        )
        nc = await connect(nats_url, "bench-proxy")
        await provision(nc.jetstream(), settings)
        publisher = EventPublisher(nc.jetstream())
        service = ProxyService(settings, publisher, None, serve_http=False)
        await service.start()
        assert service.port is not None
        port = service.port
    await asyncio.to_thread(port_file.write_text, str(port))
    await stop.wait()
    for close in closers:
        close()


def start_role(
    role: str, workdir: Path, upstream_port: int = 0, nats_url: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    port_file = workdir / f"{role}.port"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_proxy", role, str(port_file), str(upstream_port), nats_url],
        cwd=Path(__file__).resolve().parent.parent,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text():
            return process, int(port_file.read_text())
        if process.poll() is not None:
            raise RuntimeError(f"{role} exited with {process.returncode}")
        time.sleep(0.02)
    stop(process)
    raise RuntimeError(f"{role} did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- measurements ------------------------------------------------------------------------


async def _reply(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    while line[3:4] == b"-":
        line = await reader.readline()
    if line[:1] not in (b"2", b"3"):
        raise RuntimeError(f"refused: {line!r}")
    return line


async def load(port: int, message: bytes, total: int, concurrency: int = CONCURRENCY) -> float:
    """Messages per second with ``concurrency`` connections, each reused for its share.

    A minimal client (the message dot-stuffed once, up front) so the load generator
    costs as little as possible and the server side is what is measured.
    """
    share = total // concurrency
    data = re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"

    async def client(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _reply(reader)
        for command in (b"EHLO load.example",):
            writer.write(command + b"\r\n")
            await _reply(reader)
        for n in range(share):
            for command in (
                b"MAIL FROM:<news@shop.example.com>",
                f"RCPT TO:<r{index}-{n}@example.com>".encode(),
                b"DATA",
            ):
                writer.write(command + b"\r\n")
                await _reply(reader)
            writer.write(data)
            await _reply(reader)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        writer.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))  # warm-up: connections and pools
    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return share * concurrency / (time.perf_counter() - started)


def smtp_source(port: int, total: int) -> float | None:
    binary = shutil.which("smtp-source")
    if binary is None:
        return None
    started = time.perf_counter()
    subprocess.run(
        [binary, "-s", str(CONCURRENCY), "-m", str(total), "-l", "120000", "-f", "news@shop.example.com",
         "-t", "ann@example.com", f"127.0.0.1:{port}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return total / (time.perf_counter() - started)


def rewrite_timings() -> list[tuple[str, float]]:
    from mailbeacon.contract.campaigns import TrackingSwitches
    from smtp_proxy.rewrite.copies import CopyOptions, MessageCopies
    from smtp_proxy.rewrite.mime import Part
    from smtp_proxy.rewrite.optout import TrackSwitches

    html_only = EmailMessage()
    html_only["Subject"] = "x"
    raw_full = build_message()
    html = email.message_from_bytes(raw_full).get_payload()[0].get_payload()[1].get_payload(decode=True)  # type: ignore[index, union-attr]
    html_only.set_content(html.decode(), subtype="html")  # type: ignore[union-attr]
    raw = html_only.as_bytes()
    options = CopyOptions("https://t.example.com", [SECRET.encode()])
    tracking_id = "7d0c2f0e-4a5e-4c39-9d7a-2f0e4a5e4c39"

    def median(action: object, rounds: int = 400) -> float:
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            action()  # type: ignore[operator]
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1000

    def prepared() -> MessageCopies:  # as the proxy's handler does, once per message
        return MessageCopies(raw, Part.parse(raw), options, TrackingSwitches(), TrackSwitches())

    def full() -> None:
        b"".join(map(bytes, prepared().content("ann@example.com", tracking_id)))

    copies = prepared()

    def per_recipient() -> None:
        b"".join(map(bytes, copies.content("ann@example.com", tracking_id)))

    return [
        ("baseline: bytes copy of the message", median(lambda: bytearray(raw))),
        ("baseline: email.message_from_bytes parse", median(lambda: email.message_from_bytes(raw))),
        ("mailbeacon: parse + rewrite one copy", median(full)),
        ("mailbeacon: each further recipient's copy", median(per_recipient)),
    ]


async def peak_memory(workdir: Path, sink_port: int, nats_url: str) -> tuple[int, int, int]:
    """Peak Python heap while the proxy (in this process) receives, rewrites and relays 25 MB."""
    from mailbeacon.bus.jetstream import connect, provision
    from mailbeacon.bus.publisher import EventPublisher
    from mailbeacon.contract.settings import Settings
    from smtp_proxy.service import ProxyService

    big = EmailMessage()
    big["From"], big["To"], big["Subject"], big["X-Campaign"] = (
        "a@shop.example.com",
        "b@example.com",
        "big",
        "bench",
    )
    big.set_content('<html><body><a href="https://shop.example.com/">x</a></body></html>', subtype="html")
    big.add_attachment(os.urandom(18_300_000), maintype="application", subtype="zip", filename="big.zip")
    message = big.as_bytes().replace(b"\n", b"\r\n")
    message_file = workdir / "big.eml"
    message_file.write_bytes(message)
    settings = Settings(
        secret_keys=SECRET,  # type: ignore[arg-type]
        nats_url=nats_url,
        upstream_smtp=f"smtp://127.0.0.1:{sink_port}",  # type: ignore[arg-type]
        smtp_listen="127.0.0.1:0",
        data_dir=workdir / "mem-data",
        default_campaign=BENCH_CAMPAIGN,
    )
    nc = await connect(nats_url, "bench-memory")
    await provision(nc.jetstream(), settings)
    publisher = EventPublisher(nc.jetstream())
    service = ProxyService(settings, publisher, None, serve_http=False)
    await service.start()
    size = len(message)
    del message, big
    sender = [
        sys.executable, "-c",
        "import smtplib,sys; s=smtplib.SMTP('127.0.0.1', int(sys.argv[1])); "
        "s.sendmail('a@shop.example.com', ['b@example.com'], open(sys.argv[2],'rb').read()); s.quit()",
        str(service.port), str(message_file),
    ]  # fmt: skip
    tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    process = await asyncio.create_subprocess_exec(*sender)
    await process.wait()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    await service.stop()
    await publisher.close()
    await nc.close()
    return size, peak - before, process.returncode or 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row(label: str, value: str) -> str:
    return f"{label:58} {value}"


def main() -> None:
    from mailbeacon.app.embedded_nats import EmbeddedNats

    logging.getLogger("mailbeacon.bus.jetstream").setLevel(logging.ERROR)  # "disconnected" on close

    message = build_message()
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        nats = EmbeddedNats(workdir / "nats")
        nats.start()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            sink, sink_port = start_role("sink", workdir)
            processes.append(sink)
            relay, relay_port = start_role("relay", workdir, sink_port)
            processes.append(relay)
            stock, stock_port = start_role("relay-stock", workdir, sink_port)
            processes.append(stock)
            proxy, proxy_port = start_role("proxy", workdir, sink_port, nats.url)
            processes.append(proxy)
            total = MESSAGES
            # Interleaved rounds, median per path: other load on the machine drifts over time.
            paths = {"a": sink_port, "b": stock_port, "b2": relay_port, "c": proxy_port}
            # CPU of the process in the middle (and of nats-server for the proxy's events):
            # steadier than throughput on a machine shared with other work.
            nats_pid = nats.process.pid  # type: ignore[union-attr]
            middle = {"b": [stock.pid], "b2": [relay.pid], "c": [proxy.pid], "nats": [nats_pid]}
            rates: dict[str, list[float]] = {name: [] for name in paths}
            cpu: dict[str, list[float]] = {name: [] for name in middle}
            for _ in range(ROUNDS):
                for name, port in paths.items():
                    measured = [n for n in middle if n == name or (name == "c" and n == "nats")]
                    before = {n: cpu_seconds(middle[n][0]) for n in measured}
                    rates[name].append(asyncio.run(load(port, message, total)))
                    for n in measured:  # load() sends its warm-up share too: 2 x total messages
                        cpu[n].append((cpu_seconds(middle[n][0]) - before[n]) / (2 * total) * 1000)
            a, b, b2, c = (statistics.median(rates[name]) for name in paths)
            cpu_b, cpu_b2, cpu_c, cpu_nats = (statistics.median(cpu[name]) for name in middle)
            print(f"messages: {len(message) // 1024} KB (20 KB HTML, 10 links, 100 KB attachment), "
                  f"{total} per run, {CONCURRENCY} connections, median of {ROUNDS} interleaved rounds")  # fmt: skip
            print(f"{'path':58} {'msg/s':>8}")
            print(f"{'(a) load generator -> SMTP sink':58} {a:8.0f}")
            print(f"{'(b) -> pass-through stock aiosmtpd relay (pooled) -> sink':58} {b:8.0f}")
            print(row("(b') -> pass-through on the proxy's server class -> sink", f"{b2:8.0f}"))
            print(f"{'(c) -> mailbeacon proxy (tracking + NATS events) -> sink':58} {c:8.0f}")
            print(f"{'ratio c/b (goal >= 0.80)':58} {c / b:8.2f}")
            print(row("ratio c/b' (tracking alone)", f"{c / b2:8.2f}"))
            print(f"\n{'CPU per message in the relay / proxy process':58} {'ms':>8}")
            print(row("(b) stock aiosmtpd pass-through relay", f"{cpu_b:8.2f}"))
            print(row("(b') pass-through on the proxy's server class", f"{cpu_b2:8.2f}"))
            print(row("(c) mailbeacon proxy", f"{cpu_c:8.2f}"))
            print(row("    plus nats-server storing the proxy's events", f"{cpu_nats:8.2f}"))
            for label, port in (("(b) relay", stock_port), ("(c) proxy", proxy_port)):
                rate = smtp_source(port, total)
                if rate is not None:
                    print(f"{'smtp-source -> ' + label:58} {rate:8.0f}")
            if shutil.which("smtp-source") is None:
                print("(Postfix smtp-source not installed: Python load generator only)")

            print(f"\n{'rewriting a 20 KB HTML body (median of 400)':58} {'ms':>8}")
            for label, ms in rewrite_timings():
                print(f"{label:58} {ms:8.3f}")

            size, peak, code = asyncio.run(peak_memory(workdir, sink_port, nats.url))
            print(f"\n{'one large message through the proxy':58} {'MB':>8}")
            print(f"{'message size':58} {size / 1e6:8.1f}")
            print(f"{'peak Python heap in the proxy (tracemalloc)':58} {peak / 1e6:8.1f}")
            print(
                f"{'peak / size (goal < 3.0)' + ('' if code == 0 else ' SEND FAILED'):58} {peak / size:8.2f}"
            )
        finally:
            for process in reversed(processes):
                stop(process)
            nats.stop()


if __name__ == "__main__":
    if len(sys.argv) == 5:
        asyncio.run(serve_role(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    else:
        main()
