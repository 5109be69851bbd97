"""Tracking opt-outs: per message (a control header from the app) and per recipient (a list)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TRACK_HEADER = "X-Mailbeacon-Track"
_OFF = {"off", "no", "none", "false", "0"}
_ON = {"on", "yes", "all", "true", "1"}


@dataclass(frozen=True)
class TrackSwitches:
    opens: bool = True
    clicks: bool = True

    def __and__(self, other: TrackSwitches) -> TrackSwitches:
        return TrackSwitches(self.opens and other.opens, self.clicks and other.clicks)


ALL = TrackSwitches()
NOTHING = TrackSwitches(False, False)


def switches_from_header(value: str | None) -> TrackSwitches:
    """``X-Mailbeacon-Track: off`` tracks nothing; ``opens`` or ``clicks`` (comma-separated) only those.

    The header can only narrow what the campaign tracks, never widen it. An unreadable
    value is taken as ``off``: when in doubt, do not track.
    """
    if value is None:
        return ALL
    tokens = {token.strip().lower() for token in value.replace(";", ",").split(",") if token.strip()}
    if not tokens or tokens <= _ON:
        return ALL
    if tokens & _OFF or not tokens <= {"opens", "clicks"}:
        return NOTHING
    return TrackSwitches("opens" in tokens, "clicks" in tokens)


class RecipientOptOuts:
    """Addresses (``ann@example.com``) or whole domains (``@example.com``) never tracked.

    Read from a file, one entry per line (``#`` starts a comment), and re-read when the
    file changes, so a mounted ConfigMap or Secret can be updated without a restart.
    """

    def __init__(self, path: Path | None, check_every: float = 5.0) -> None:
        self.path = path
        self._check_every = check_every
        self._checked = 0.0
        self._mtime: float | None = None
        self._entries: frozenset[str] = frozenset()
        self._reload()

    def _reload(self) -> None:
        if self.path is None:
            return
        self._checked = time.monotonic()
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as exc:
            if self._mtime is not None or exc.errno != 2:
                log.warning("cannot read tracking opt-out list %s: %s", self.path, exc.strerror)
            return
        if mtime == self._mtime:
            return
        entries = set()
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            entry = line.split("#", 1)[0].strip().lower()
            if entry:
                entries.add(entry[1:] if entry.startswith("*@") else entry)
        self._entries, self._mtime = frozenset(entries), mtime
        log.info("tracking opt-out list: %d entries", len(entries))

    def __contains__(self, address: object) -> bool:
        if self.path is None or not isinstance(address, str):
            return False
        if time.monotonic() - self._checked > self._check_every:
            self._reload()
        address = address.strip().lower()
        domain = address.rpartition("@")[2]
        return address in self._entries or f"@{domain}" in self._entries
