"""``mailbeacon operator``: the Campaign operator as its container runs it."""

from __future__ import annotations

import kopf

from campaign_operator.wiring import register
from mailbeacon.contract.settings import Settings


async def run(settings: Settings) -> None:
    """Serve Campaigns until SIGTERM; one replica (kopf runs standalone, no peering)."""
    if not settings.nats.url:
        raise SystemExit("mailbeacon operator: MAILBEACON_NATS_URL is required")
    registry = kopf.OperatorRegistry()
    register(registry, settings)
    namespaces = settings.operator.namespaces
    await kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
    )
