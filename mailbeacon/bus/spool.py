"""Events a stopping process could not publish, kept on disk for its next start (docs/tracker.md "Never down").

One file per stop, ``DATA_DIR/spool/<time>-<host>-<pid>-<random>.jsonl``: one JSON object per
line, the frame the publisher would have sent, ``{"subject": ..., "msg_id": ..., "payload":
...}`` (the payload is the event's JSON as text). A file is written under a temporary name,
fsynced, renamed and its directory fsynced, so a file with its final name is complete.

Several processes may share the directory (``tracker --workers N``, replicas on one volume).
A process takes a file by renaming it to a name of its own (``....jsonl.<token>.claimed``)
while it holds an exclusive ``flock`` on it, and keeps the lock until every frame of the
file is acknowledged (then it deletes the file) or has been written to its own new file.
Only one rename of a name can succeed, so two processes never publish the same file. A lock
is released when its process dies: a file claimed, or left half written, by a process that
crashed is taken over at the next start, its unreadable lines (a crash mid-write) skipped
and counted. Should a frame be published twice after all (a crash between writing a new file
and deleting the old one), JetStream drops the repeat inside its duplicate window
(``Nats-Msg-Id``) and the aggregator's unique ``event_id`` after it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mailbeacon.bus.fast_batch import Outgoing, outgoing

log = logging.getLogger(__name__)

_READY = ".jsonl"
_WRITING = ".jsonl.tmp"
_CLAIMED = ".claimed"
_SUBJECT_PREFIX = "mailbeacon.events."


@dataclass
class Claim:
    """A spool file this process took: renamed to its own name and locked until settled."""

    path: Path
    fd: int
    frames: list[Outgoing] = field(default_factory=list)
    skipped: int = 0  # lines that could not be read
    remaining: int = 0  # frames not acknowledged yet


def encode_frame(message: Outgoing) -> bytes:
    subject, msg_id, frame, header_size = message
    # surrogateescape: bytes that are not UTF-8 survive the round trip as JSON \udcXX escapes.
    payload = frame[header_size:].decode("utf-8", "surrogateescape")
    line = {"subject": subject.decode(), "msg_id": msg_id, "payload": payload}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def decode_frame(line: bytes) -> Outgoing | None:
    """The frame of one spool line, or None when the line is not one (cut short, garbled)."""
    try:
        value = json.loads(line)
        subject, msg_id, payload = value["subject"], value["msg_id"], value["payload"]
    except (ValueError, TypeError, KeyError):
        return None
    if not (isinstance(subject, str) and isinstance(msg_id, str) and isinstance(payload, str)):
        return None
    if not subject.startswith(_SUBJECT_PREFIX) or not msg_id or not line.endswith(b"\n"):
        return None
    try:
        return outgoing(subject.encode(), msg_id, payload.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._token = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"

    @classmethod
    def under(cls, data_dir: Path) -> Spool:
        return cls(data_dir / "spool")

    def write(self, frames: Iterable[Outgoing]) -> Path:
        """Keep ``frames`` in a new file, durably; its path. Raises OSError."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")  # names sort oldest first
        path = self.directory / f"{stamp}-{self._token}-{secrets.token_hex(4)}{_READY}"
        writing = path.with_name(path.name + ".tmp")
        fd = os.open(writing, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Blocking: a starting process may be looking at the empty file this instant; it
            # leaves empty files alone, and lets go at once.
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "wb") as handle:
                for frame in frames:
                    handle.write(encode_frame(frame))
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(writing, path)
            _fsync_directory(self.directory)
        finally:
            # Failed half-way (a full disk): what was written stays, and the next start reads it.
            os.close(fd)
        return path

    def claim_all(self) -> list[Claim]:
        """Take every file nobody holds: complete ones, and those of processes that died while
        writing or publishing them. Oldest first."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        claims = []
        for name in names:
            if name.endswith((_READY, _WRITING, _CLAIMED)):
                claim = self._claim(self.directory / name)
                if claim is not None:
                    claims.append(claim)
        return claims

    def _claim(self, path: Path) -> Claim | None:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None  # taken meanwhile
        try:
            if not _lock(fd):
                os.close(fd)
                return None  # its writer or claimer is alive
            if path.name.endswith(_WRITING) and os.fstat(fd).st_size == 0:
                os.close(fd)  # a writer that has not taken its lock yet (or died before a line)
                return None
            base = path.name.split(_READY, 1)[0]
            claimed = path.with_name(f"{base}{_READY}.{self._token}{_CLAIMED}")
            os.rename(path, claimed)
        except FileNotFoundError:
            os.close(fd)  # settled by another process between our open and our lock
            return None
        except BaseException:
            os.close(fd)
            raise
        claim = Claim(claimed, fd)
        with os.fdopen(os.dup(fd), "rb") as handle:
            for line in handle:
                frame = decode_frame(line)
                if frame is None:
                    claim.skipped += 1
                else:
                    claim.frames.append(frame)
        claim.remaining = len(claim.frames)
        if claim.skipped:
            log.warning(
                "spool file %s: %d unreadable lines skipped (a stop cut short?)", path.name, claim.skipped
            )
        return claim

    def keep(self, unpublished: Sequence[Outgoing], ledger: SpoolLedger | None) -> bool:
        """A closing publisher's frames NATS did not take: in a new file, and the files it took
        at start (``ledger``) done with; False, and logged, when they could not be written."""
        try:
            path = self.write(unpublished) if unpublished else None
        except OSError as exc:
            log.error("%d unpublished events could not be spooled (%s) and are lost", len(unpublished), exc)
            if ledger is not None:
                ledger.close(kept_elsewhere=False)
            return False
        if path is not None:
            log.warning(
                "NATS did not take %d events before the drain deadline; kept in %s for the next start",
                len(unpublished),
                path,
            )
        if ledger is not None:
            # Their unacknowledged frames were among the unpublished ones, now in the new file.
            ledger.close(kept_elsewhere=path is not None)
        return True

    def settle(self, claim: Claim) -> None:
        """Every frame of the claim is stored (or kept in a newer file): delete it, let go."""
        claim.path.unlink(missing_ok=True)
        self.release(claim)

    def release(self, claim: Claim) -> None:
        """Let go of a claim without deleting it: the next start takes it again."""
        if claim.fd >= 0:
            os.close(claim.fd)
            claim.fd = -1


class SpoolLedger:
    """The files a publisher took from the spool at start, until each of their frames is
    acknowledged: a file is deleted once all of its frames are."""

    def __init__(self, spool: Spool, claims: list[Claim]) -> None:
        self.spool = spool
        self.claims: list[Claim] = []
        self.skipped = sum(claim.skipped for claim in claims)
        self._by_id: dict[str, list[Claim]] = {}
        self._frames: list[Outgoing] = []
        for claim in claims:
            if not claim.frames:
                spool.settle(claim)  # nothing readable in it
                continue
            self.claims.append(claim)
            self._frames += claim.frames
            for message in claim.frames:
                self._by_id.setdefault(message[1], []).append(claim)
            claim.frames = []  # the publisher's buffer holds them from now on

    def take_frames(self) -> list[Outgoing]:
        """Every frame of the claimed files, oldest file first (once)."""
        frames, self._frames = self._frames, []
        return frames

    @property
    def remaining(self) -> int:
        return sum(claim.remaining for claim in self.claims)

    def stored(self, message: Outgoing) -> bool:
        """JetStream acknowledged ``message``; True once every claimed frame is."""
        claims = self._by_id.get(message[1])
        if claims:
            claim = claims.pop()
            if not claims:
                del self._by_id[message[1]]
            claim.remaining -= 1
            if claim.remaining == 0:
                self.claims.remove(claim)
                self.spool.settle(claim)
        return not self.claims

    def close(self, *, kept_elsewhere: bool) -> None:
        """At the publisher's close: delete the files whose unacknowledged frames were kept in
        a new file (``kept_elsewhere``); otherwise let go of them, for the next start."""
        for claim in self.claims:
            if kept_elsewhere or not claim.remaining:
                self.spool.settle(claim)
            else:
                self.spool.release(claim)
        self.claims.clear()
        self._by_id.clear()
