"""Stopping without dropping a request: the shutdown delay every component serves through.

The runner waits here for each component it runs, and the tracker's standalone workers for
themselves (``mailbeacon tracker --workers N``), so it lives with the HTTP plumbing they share
rather than in the app shell (docs/kubernetes.md "Zero-drop rollouts").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)


async def wait_for_signal(delay: float = 0.0, stopping: Callable[[], None] | None = None) -> None:
    """Return once SIGTERM or SIGINT arrives; with a ``delay`` (SHUTDOWN_DELAY_SECONDS), first call
    ``stopping`` (readiness turns 503) and keep serving for ``delay`` seconds, or until a second
    signal: Service endpoints and load balancers take a moment to stop sending requests to a
    terminating pod, and a listener closed at once would refuse them (docs/kubernetes.md "Zero-drop rollouts")."""
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    await signalled.wait()
    if delay <= 0:
        return
    signalled.clear()
    if stopping is not None:
        stopping()
    log.info("stopping: /readyz answers 503; still serving for %g s (SHUTDOWN_DELAY_SECONDS)", delay)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(signalled.wait(), delay)
