"""Where a running `mailbeacon up` is, for the other commands run from any directory.

`up` writes its addresses to ``up.json`` in a per-user runtime directory
(:meth:`mailbeacon.contract.settings.Settings.up_state_dir`: ``RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/mailbeacon``, else ``/tmp/mailbeacon-<uid>``), made readable by the
user only, and removes it when it stops. ``campaign apply``, ``stats`` and the others read
it when their own settings do not say where NATS or the aggregator is. A file left by an
``up`` that died (its process is gone) is ignored. The NATS URL is written only when it
holds no credentials (the embedded nats-server's never does): a command that needs a
NATS with credentials is told to set ``MAILBEACON_NATS_URL``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mailbeacon.contract.settings import Settings

STATE_FILE = "up.json"


@dataclass(frozen=True)
class UpState:
    pid: int
    smtp: str
    tracker: str
    aggregator: str
    nats: str | None


def _path(settings: Settings) -> Path:
    return settings.up_state_dir() / STATE_FILE


def _has_credentials(url: str) -> bool:
    return "@" in url  # user:password@ or token@, in any of a cluster's URLs


def _ours(directory: Path) -> bool:
    """The directory belongs to this user and nobody else may write to it (in /tmp, another
    user could have made it first)."""
    info = directory.lstat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022 and directory.is_dir()


def write_state(settings: Settings, state: UpState) -> Path:
    """Record a running ``up`` (atomically, mode 0600 in a 0700 directory)."""
    path = _path(settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _ours(path.parent):
        raise PermissionError(f"{path.parent} belongs to another user or is writable by others")
    if state.nats is not None and _has_credentials(state.nats):
        state = UpState(state.pid, state.smtp, state.tracker, state.aggregator, None)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".up-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(state), handle)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has this id
        return True
    return True


def read_state(settings: Settings) -> UpState | None:
    """The running ``up`` recorded for this user, or None (no file, unreadable, or its process gone)."""
    path = _path(settings)
    try:
        if not _ours(path.parent):
            return None
        data = json.loads(path.read_text())
        state = UpState(
            pid=int(data["pid"]),
            smtp=str(data["smtp"]),
            tracker=str(data["tracker"]),
            aggregator=str(data["aggregator"]),
            nats=str(data["nats"]) if data.get("nats") else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if _alive(state.pid) else None


def remove_state(settings: Settings, pid: int) -> None:
    """Remove the record, if it is the one process ``pid`` wrote (a later ``up`` may have replaced it)."""
    path = _path(settings)
    try:
        if int(json.loads(path.read_text())["pid"]) == pid:
            path.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass
