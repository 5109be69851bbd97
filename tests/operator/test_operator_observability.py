"""What the operator shows while the aggregator is down: `kubectl get campaigns` says the
statistics are stale and since when, and its metrics keep every campaign's guardrails.

kopf's real runtime against the Kubernetes API test server (tests/kube_api.py), real NATS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.kube_api import FakeKubernetes
from tests.operator.test_operator_crd import VERSION_ENTRY, jsonpath
from tests.operator.test_operator_runtime import KEY, Kubectl, campaign_manifest, kube, operator_running
from tests.support import eventually, free_port, make_settings, metric_value

__all__ = ["kube"]  # the fixture


async def test_a_down_aggregator_keeps_guardrail_series_and_shows_stale_statistics(
    tmp_path: Path, nats_url: str, kube: FakeKubernetes, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        tmp_path,
        nats_url=nats_url,
        aggregator_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        operator_listen="127.0.0.1:0",
        operator_status_interval=0.3,
    )
    columns = {c["name"]: c["jsonPath"] for c in VERSION_ENTRY["additionalPrinterColumns"]}
    async with aiohttp.ClientSession() as http:
        kubectl = Kubectl(kube, http)
        with operator_running(kube, settings, tmp_path, monkeypatch) as operator:
            await kubectl.apply(campaign_manifest(bounceRatePercent=8, minDelivered=10))

            async def exported() -> str:
                assert operator.health_port is not None  # started
                async with http.get(f"http://127.0.0.1:{operator.health_port}/metrics") as response:
                    text = await response.text()
                # The alert rules judge the aggregator's numbers by these: they must not vanish
                # (or never appear, for an operator started during the outage).
                labels = {"campaign": str(KEY)}
                assert metric_value(text, "mailbeacon_operator_statistics_errors_total") > 0
                guardrail = "mailbeacon_campaign_guardrail_threshold_percent"
                assert metric_value(text, guardrail, guardrail="bounce_rate", **labels) == 8
                assert metric_value(text, guardrail, guardrail="complaint_rate", **labels) == 0.3
                assert f'mailbeacon_campaign_guardrail_min_volume{{campaign="{KEY}"}} 10.0' in text
                assert f'mailbeacon_campaign_paused{{campaign="{KEY}"}} 0.0' in text
                # Only the operator's own series on its port.
                assert "mailbeacon_tracker_" not in text and "mailbeacon_events_total" not in text
                return text

            await eventually(exported)

            async def stale() -> dict[str, Any]:
                campaign = await kubectl.get(KEY.namespace, KEY.name)
                assert campaign is not None
                assert jsonpath(campaign, columns["Statistics"]) == ["AggregatorUnavailable"]
                return campaign

            campaign = await eventually(stale)
            (since,) = jsonpath(campaign, columns["Since"])
            assert since.endswith("Z") and since >= campaign["metadata"]["creationTimestamp"][:19]
