"""Scanner bursts: clicks on several links of one message within about a second.

A person clicks one link, reads the page, maybe comes back for another; a mail security
gateway follows every link of the message at once. To flag the *first* click of a burst
too, a click event is held for the burst window before it is published: a later click
on a different link of the same message (or on the hidden honeypot link) within the
window marks the whole group. The redirect itself never waits; only the event does.

:class:`BurstWindow` is the pure bookkeeping (time is passed in); :class:`ClickHold`
drives it from the event loop and hands released events to the publisher.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from mailbeacon.events import Event
from mailbeacon.signing import HONEYPOT_URL
from tracker import classify


@dataclass
class _Group:
    first_at: float
    last_at: float
    events: list[Event] = field(default_factory=list)
    urls: set[str] = field(default_factory=set)


def _mark(event: Event, verdict: classify.Verdict) -> Event:
    if event.machine:
        return event  # the request's own evidence (HEAD, scanner agent, honeypot) is more specific
    metadata = {**event.metadata, "machine_evidence": verdict.evidence}
    return event.model_copy(
        update={"machine": True, "machine_kind": verdict.machine_kind, "metadata": metadata}
    )


class BurstWindow:
    """Groups the clicks of one message that follow each other within ``window`` seconds."""

    def __init__(self, window: float = 1.0, max_hold: float = 10.0, max_pending: int = 100_000) -> None:
        self.window = window
        self.max_hold = max_hold
        self.max_pending = max_pending
        self._groups: OrderedDict[str, _Group] = OrderedDict()  # least recently clicked first
        self.pending = 0

    def add(self, event: Event, now: float) -> list[Event]:
        """Hold ``event``; returns events that had to be released at once (limits reached)."""
        released: list[Event] = []
        key = event.tracking_id or event.event_id
        group = self._groups.get(key)
        if group is not None and (now - group.last_at > self.window or now - group.first_at > self.max_hold):
            released += self._release(key)
            group = None
        if group is None:
            group = self._groups[key] = _Group(first_at=now, last_at=now)
        group.last_at = now
        group.events.append(event)
        group.urls.add(event.url or "")
        self._groups.move_to_end(key)
        self.pending += 1
        while self.pending > self.max_pending and self._groups:
            released += self._release(next(iter(self._groups)))
        return released

    def due(self, now: float) -> list[Event]:
        """Events whose group saw no further click within the window, classified."""
        released: list[Event] = []
        while self._groups:
            key, group = next(iter(self._groups.items()))
            if now - group.last_at < self.window and now - group.first_at < self.max_hold:
                break
            released += self._release(key)
        return released

    def drain(self) -> list[Event]:
        released: list[Event] = []
        while self._groups:
            released += self._release(next(iter(self._groups)))
        return released

    def _release(self, key: str) -> list[Event]:
        group = self._groups.pop(key)
        self.pending -= len(group.events)
        if HONEYPOT_URL in group.urls:
            verdict = classify.Verdict("honeypot", "clicked together with the hidden honeypot link")
        elif len(group.urls) >= 2:
            verdict = classify.burst(len(group.urls), group.last_at - group.first_at)
        else:
            return group.events
        return [_mark(event, verdict) for event in group.events]


class ClickHold:
    """Holds click events for the burst window, then passes them to ``sink``."""

    def __init__(
        self,
        sink: Callable[[Event], object],
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self.bursts = BurstWindow(window)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        return self.bursts.pending

    def add(self, event: Event) -> None:
        for released in self.bursts.add(event, self._clock()):
            self._sink(released)
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.bursts.window / 4, self._tick)

    def _tick(self) -> None:
        self._timer = None
        for event in self.bursts.due(self._clock()):
            self._sink(event)
        if self.bursts.pending:
            self._schedule()

    def flush(self) -> None:
        """Release everything now (shutdown): groups are judged on what was seen so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for event in self.bursts.drain():
            self._sink(event)
