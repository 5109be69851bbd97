"""A NATS KV bucket kept in memory: every entry loaded, then every change followed.

Proxies decide per message from their campaigns and suppressions without waiting on the
network; what they decide by is a mirror of a bucket that other components write.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.js.kv import KeyValue


class BucketMirror:
    """Subclasses say what an entry (or a delete marker) means in :meth:`_apply`."""

    task_name = "kv-mirror"
    load_timeout = 30.0  # seconds to wait for the next entry while loading

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None

    async def _apply(self, entry: KeyValue.Entry) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Load every entry, then keep following changes in the background."""
        self._watcher = await self._kv.watchall()
        while True:
            entry = await self._watcher.updates(timeout=self.load_timeout)
            if entry is None:  # the end-of-initial-values marker
                break
            await self._apply(entry)
        self._task = asyncio.create_task(self._follow(), name=self.task_name)

    async def _follow(self) -> None:
        assert self._watcher is not None
        async for entry in self._watcher:
            if entry is not None:
                await self._apply(entry)

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
