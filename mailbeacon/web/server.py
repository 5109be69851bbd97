"""HTTP plumbing every component shares: health, readiness, metrics, JSON errors, serving."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from mailbeacon.contract.settings import parse_listen
from mailbeacon.web.http_guard import ConnectionLimits, GuardedAppRunner

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, reason: str, **extra: Any) -> web.Response:
    return web.json_response({"status": "error", "error": reason, **extra}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn routing errors into JSON and unexpected failures into a logged 503.

    A 503 tells a provider's webhook to retry, where a 500 with a traceback would leak
    internals; the request is logged so the cause is not lost.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return json_error(exc.status, exc.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(503, "temporarily unavailable, retry later")


def add_health_routes(
    app: web.Application,
    ready: Callable[[], bool] = lambda: True,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"status": "ready" if ok else "not ready"}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        # The component's own registry, then prometheus_client's default one, which holds
        # only the process's own collectors (CPU, memory, file descriptors, GC): components
        # never register there, so in `mailbeacon up` no component's series shows on another's
        # port (docs/architecture.md "Metrics: one registry per component").
        body = generate_latest(registry)
        if registry is not REGISTRY:
            body += generate_latest(REGISTRY)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


class _ClientMistakes(logging.Filter):
    """Keep malformed requests (a 9 KB header, a broken request line) out of the error log.

    aiohttp answers them with 400 itself but logs each with a traceback at ERROR: on a
    public tracker anyone could fill the log with them. They stay visible at DEBUG.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BadHttpMessage):
            log.debug("refused a malformed HTTP request: %s", error)
            return False
        return True


_CLIENT_MISTAKES = _ClientMistakes()


async def serve(
    app: web.Application, listen: str, *, reuse_port: bool = False, limits: ConnectionLimits | None = None
) -> web.AppRunner:
    """Start serving ``app`` on ``host:port``; the caller stops it with ``runner.cleanup()``.
    With ``limits``, slow headers and connections above the cap are refused (``http_guard``)."""
    logging.getLogger("aiohttp.server").addFilter(_CLIENT_MISTAKES)  # once: filters are a set
    host, port = parse_listen(listen)
    options: dict[str, Any] = {"access_log": None, "handle_signals": False, "shutdown_timeout": 5}
    runner = (
        web.AppRunner(app, **options) if limits is None else GuardedAppRunner(app, limits=limits, **options)
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful with port 0 in tests)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the app is not listening on TCP")
