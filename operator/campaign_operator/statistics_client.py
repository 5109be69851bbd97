"""Reading a campaign's statistics from the aggregator's API (docs/architecture.md "Interfaces")."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp

from mailbeacon.contract.campaigns import CampaignKey


class StatisticsUnavailable(RuntimeError):
    """The aggregator could not be asked or did not answer usefully; the message says why."""


class StatisticsClient:
    """``token`` (when the aggregator requires one; a read-only token is enough) is sent as
    ``Authorization: Bearer``."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        timeout: float = 10.0,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._has_token = bool(token)

    def url(self, key: CampaignKey) -> str:
        return f"{self.base_url}/api/campaigns/{quote(key.namespace)}/{quote(key.name)}/statistics"

    async def fetch(self, key: CampaignKey) -> dict[str, Any] | None:
        """The statistics object, or None while the aggregator has no record of the campaign."""
        try:
            async with self._session.get(
                self.url(key), timeout=self._timeout, headers=self._headers
            ) as response:
                if response.status == 404:
                    return None
                if response.status in (401, 403):
                    raise StatisticsUnavailable(self._refused(response.status))
                if response.status != 200:
                    text = (await response.text())[:200]
                    raise StatisticsUnavailable(f"aggregator answered {response.status}: {text}")
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StatisticsUnavailable(f"aggregator not reachable at {self.base_url}: {exc!r}") from exc
        if not isinstance(body, dict):
            raise StatisticsUnavailable("aggregator answered with something other than a JSON object")
        return body

    def _refused(self, status: int) -> str:
        if not self._has_token:
            return (
                f"aggregator answered {status}: it requires a token; set MAILBEACON_API_TOKEN "
                "(or MAILBEACON_API_READ_TOKENS) for the operator"
            )
        return f"aggregator answered {status}: it does not accept the operator's token (MAILBEACON_API_TOKEN)"
