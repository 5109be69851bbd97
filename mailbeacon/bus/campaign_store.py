"""The campaign specs in the NATS KV bucket, mirrored in memory and kept current by a watch.

The operator (from ``Campaign`` resources) and the command line write specs; proxies and
aggregators read them from their local mirror, so a lookup never waits on the network.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mailbeacon.bus.kv_mirror import BucketMirror
from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec, InvalidCampaign

log = logging.getLogger(__name__)


OnChange = Callable[[CampaignKey, CampaignSpec | None], Awaitable[None]]


class CampaignStore(BucketMirror):
    task_name = "campaign-store"
    load_timeout = 10.0

    def __init__(self, kv: KeyValue, on_change: OnChange | None = None) -> None:
        super().__init__(kv)
        self._on_change = on_change
        self.specs: dict[CampaignKey, CampaignSpec] = {}

    def get(self, key: CampaignKey) -> CampaignSpec | None:
        return self.specs.get(key)

    async def _apply(self, entry: KeyValue.Entry) -> None:
        try:
            key = CampaignKey.parse(entry.key)
        except InvalidCampaign:
            log.warning("ignoring campaign KV key %r", entry.key)
            return
        spec: CampaignSpec | None = None
        if entry.operation in (KV_DEL, KV_PURGE):
            self.specs.pop(key, None)
        else:
            try:
                spec = self.specs[key] = CampaignSpec.from_json(entry.value or b"{}")
            except ValueError as exc:
                log.warning("ignoring invalid spec for campaign %s: %s", key, exc)
                return
        if self._on_change is not None:
            try:
                await self._on_change(key, spec)
            except Exception:
                log.exception("campaign change handler failed for %s", key)

    async def put(self, key: CampaignKey, spec: CampaignSpec) -> None:
        await self._kv.put(key.kv_key, spec.to_json())
        self.specs[key] = spec

    async def create_if_missing(self, key: CampaignKey, spec: CampaignSpec) -> bool:
        """Create the campaign unless someone already has; True when this call created it."""
        if key in self.specs:
            return False
        try:
            await self._kv.create(key.kv_key, spec.to_json())
        except KeyWrongLastSequenceError:
            return False
        self.specs[key] = spec
        return True

    async def delete(self, key: CampaignKey) -> None:
        await self._kv.delete(key.kv_key)
        self.specs.pop(key, None)
