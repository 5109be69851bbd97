"""Scanner bursts: clicks on several links of one message within about a second.

A person clicks one link, reads the page, maybe comes back for another; a mail security
gateway follows every link of the message at once. To flag the *first* click of a burst
too, a click event is held for the burst window before it is published: a later click
on a different link of the same message (or on the hidden honeypot link) within the
window marks the whole group. The redirect itself never waits; only the event does.

:class:`BurstWindow` is the pure bookkeeping (time is passed in); :class:`ClickHold`
drives it from the event loop and hands what it releases, with the group's verdict, to a
callback that publishes the events. What is held per click is up to the caller: a busy
tracker holds a second's worth of clicks, so it keeps a small tuple rather than an event.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from mailbeacon.contract.signing import HONEYPOT_URL
from tracker import classify

Held = TypeVar("Held")
# The items of one group, and the verdict on the group: None when it was no burst.
Released = tuple[list[Held], classify.Verdict | None]

# Groups released per event-loop turn: a second's worth of clicks on a busy tracker is
# thousands, and publishing them takes a few microseconds each.
_RELEASE_PER_TURN = 256
_HONEYPOT_GROUP = classify.Verdict("honeypot", "clicked together with the hidden honeypot link")


class _Group(Generic[Held]):
    """The clicks on one message's links so far (slotted: thousands are held at once).

    Nearly every group is one click on one link, so the links stay a plain string until a
    second, different one arrives.
    """

    __slots__ = ("first_at", "items", "last_at", "urls")

    def __init__(self, now: float, url: str, item: Held) -> None:
        self.first_at = self.last_at = now
        self.items = [item]
        self.urls: str | set[str] = url

    def add(self, now: float, url: str, item: Held) -> None:
        self.last_at = now
        self.items.append(item)
        urls = self.urls
        if isinstance(urls, str):
            if url != urls:
                self.urls = {urls, url}
        else:
            urls.add(url)


class BurstWindow(Generic[Held]):
    """Groups the clicks of one message (``key``) that follow each other within ``window`` seconds."""

    def __init__(self, window: float = 1.0, max_hold: float = 10.0, max_pending: int = 100_000) -> None:
        self.window = window
        self.max_hold = max_hold
        self.max_pending = max_pending
        self._groups: OrderedDict[str, _Group[Held]] = OrderedDict()  # least recently clicked first
        self.pending = 0

    def add(self, key: str, url: str, item: Held, now: float) -> Sequence[Released[Held]]:
        """Hold ``item``, a click on ``url``; returns groups that had to be released at once (limits reached)."""
        released: Sequence[Released[Held]] = ()  # nearly always: no list per click
        group = self._groups.get(key)
        if group is not None and (now - group.last_at > self.window or now - group.first_at > self.max_hold):
            released = [self._release(key)]
            group = None
        if group is None:
            self._groups[key] = _Group(now, url, item)
        else:
            group.add(now, url, item)
            self._groups.move_to_end(key)
        self.pending += 1
        if self.pending > self.max_pending:
            evicted = [*released]
            while self.pending > self.max_pending and self._groups:
                evicted.append(self._release(next(iter(self._groups))))
            return evicted
        return released

    def due(self, now: float, limit: int | None = None) -> list[Released[Held]]:
        """Groups that saw no further click within the window, with their verdicts (the
        ``limit`` oldest of them at most)."""
        released: list[Released[Held]] = []
        groups = self._groups
        window, max_hold = self.window, self.max_hold
        while groups and (limit is None or len(released) < limit):
            key = next(iter(groups))
            group = groups[key]
            if now - group.last_at < window and now - group.first_at < max_hold:
                break
            released.append(self._release(key))
        return released

    def drain(self) -> list[Released[Held]]:
        return [self._release(key) for key in list(self._groups)]

    def _release(self, key: str) -> Released[Held]:
        group = self._groups.pop(key)
        self.pending -= len(group.items)
        urls = group.urls
        if isinstance(urls, str):
            return group.items, None  # one link, however often: a person (or a double click)
        if HONEYPOT_URL in urls:
            return group.items, _HONEYPOT_GROUP
        return group.items, classify.burst(len(urls), group.last_at - group.first_at)


class ClickHold(Generic[Held]):
    """Holds clicks for the burst window, then passes each to ``release`` with its group's verdict."""

    def __init__(
        self,
        release: Callable[[Held, classify.Verdict | None], object],
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = 100_000,
    ) -> None:
        self._release = release
        self._clock = clock
        self.bursts: BurstWindow[Held] = BurstWindow(window, max_pending=max_pending)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        return self.bursts.pending

    def add(self, key: str, url: str, item: Held, now: float | None = None) -> None:
        """Hold ``item``, a click on ``url`` at ``now`` (the hold's clock; by default its current time)."""
        released = self.bursts.add(key, url, item, self._clock() if now is None else now)
        if released:
            self._hand_over(released)
        if self._timer is None:
            self._schedule()

    def _hand_over(self, released: Sequence[Released[Held]]) -> None:
        release = self._release
        for items, verdict in released:
            for item in items:
                release(item, verdict)

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.bursts.window / 4, self._tick)

    def _tick(self) -> None:
        self._timer = None
        released = self.bursts.due(self._clock(), _RELEASE_PER_TURN)
        self._hand_over(released)
        if len(released) == _RELEASE_PER_TURN:
            # More are due: release them in later turns of the loop, between requests, rather
            # than stall every connection for the whole second's worth of a busy tracker.
            self._timer = asyncio.get_running_loop().call_later(0, self._tick)
        elif self.bursts.pending:
            self._schedule()

    def flush(self) -> None:
        """Release everything now (shutdown): groups are judged on what was seen so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._hand_over(self.bursts.drain())
