"""A three-node nats-server cluster on loopback, from the pinned wheel, for failover tests.

Each node has its own client, route and monitoring port and its own store directory; a node
is killed by its PID (SIGKILL, as a crashed machine) and started again on the same ports
and store, as a restarted pod with its persistent volume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailbeacon.app.embedded_nats import _die_with_parent, nats_server_binary
from tests.support import free_port


@dataclass
class Node:
    name: str
    port: int
    route_port: int
    monitor_port: int
    store_dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def monitor(self, path: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON (``/jsz``, ``/connz``, ...)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=2) as response:
            return dict(json.load(response))


class NatsCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; every process is ours, ended by PID."""

    def __init__(self, base_dir: Path, size: int = 3, name: str = "mailbeacon-test") -> None:
        self.name = name
        self.nodes = [
            Node(f"n{n}", free_port(), free_port(), free_port(), base_dir / f"n{n}")
            for n in range(1, size + 1)
        ]

    @property
    def url(self) -> str:
        """All servers, comma-separated, as MAILBEACON_NATS_URL takes them."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def start(self, timeout: float = 20.0) -> None:
        for node in self.nodes:
            self.start_node(node, wait=False)
        self.wait_ready(timeout)

    def start_node(self, node: Node, *, wait: bool = True, timeout: float = 20.0) -> None:
        node.store_dir.mkdir(parents=True, exist_ok=True)
        routes = ",".join(f"nats://127.0.0.1:{other.route_port}" for other in self.nodes if other is not node)
        args = [
            str(nats_server_binary()),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(node.port),
            "-m",
            str(node.monitor_port),
            "--server_name",
            node.name,
            "--cluster_name",
            self.name,
            "--cluster",
            f"nats://127.0.0.1:{node.route_port}",
            "--routes",
            routes,
            "-sd",
            str(node.store_dir / "jetstream"),
            "-l",
            str(node.store_dir / "nats-server.log"),
        ]
        node.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent
        )
        if wait:
            self.wait_ready(timeout)

    def kill(self, node: Node) -> None:
        """SIGKILL: no lame-duck mode, no leadership hand-over, as when a machine dies."""
        process, node.process = node.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        for node in self.nodes:
            process, node.process = node.process, None
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every running node agrees on, once they all know one."""
        leaders = set()
        for node in self.nodes:
            if not node.running:
                continue
            try:
                leaders.add((node.monitor("/jsz").get("meta_cluster") or {}).get("leader"))
            except OSError:
                return None
        return leaders.pop() if len(leaders) == 1 else None

    def wait_ready(self, timeout: float = 20.0) -> str:
        """Wait until every running node serves and agrees on a JetStream meta leader."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(
                        f"nats-server {node.name} exited; see {node.store_dir}/nats-server.log"
                    )
            leader = self.meta_leader()
            if leader:
                return leader
            time.sleep(0.05)
        raise TimeoutError(f"no JetStream meta leader within {timeout} s")

    def holding(self, connection_name: str) -> Node | None:
        """The running node a client connection of that name is connected to (``/connz``)."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                connections = node.monitor("/connz?limit=1024").get("connections") or []
            except OSError:
                continue
            if any(c.get("name") == connection_name for c in connections):
                return node
        return None

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
