"""Prometheus metrics of the operator: what only the operator knows about a campaign.

The campaign statistics themselves (``mailbeacon_campaign_messages``, ``_rate_percent``,
opens, clicks...) are the aggregator's: it reads them from the database, the source of
truth, every few seconds. The operator exports what it alone holds, each campaign's
guardrails (thresholds from the Campaign's spec, its verdicts) and its pause, so that
the alert rules can judge the aggregator's numbers against each campaign's own limits.
Labels: ``campaign`` is ``namespace/name`` as in the aggregator's series.

A campaign's series stay while the aggregator cannot be read: the thresholds and the pause
come from the spec, the ratios and verdicts from the numbers its ``.status`` last showed (so
an operator restarted during an aggregator outage exports them too). They live in the
operator's own registry, :data:`REGISTRY`, which its health port serves.
"""

from __future__ import annotations

import contextlib
import math

from prometheus_client import CollectorRegistry, Counter, Gauge

from campaign_operator.guardrails import Judgement
from campaign_operator.resource import BOUNCE_RATE_HIGH
from mailbeacon.contract.build_info import register_build_info
from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec

GUARDRAILS = ("bounce_rate", "complaint_rate")
REGISTRY = CollectorRegistry(auto_describe=True)
BUILD_INFO = register_build_info(REGISTRY, "operator")

THRESHOLD = Gauge(
    "mailbeacon_campaign_guardrail_threshold_percent",
    "A campaign's guardrail thresholds from its spec",
    ["campaign", "guardrail"],
    registry=REGISTRY,
)
MIN_VOLUME = Gauge(
    "mailbeacon_campaign_guardrail_min_volume",
    "Copies a campaign needs (sent for bounces, delivered for complaints) before its rates are judged",
    ["campaign"],
    registry=REGISTRY,
)
RATIO = Gauge(
    "mailbeacon_campaign_guardrail_ratio",
    "Rate divided by its threshold once the campaign has enough volume to judge it (else 0); 1 trips",
    ["campaign", "guardrail"],
    registry=REGISTRY,
)
BREACHED = Gauge(
    "mailbeacon_campaign_guardrail_breached",
    "1 while the guardrail's condition is True",
    ["campaign", "guardrail"],
    registry=REGISTRY,
)
PAUSED = Gauge(
    "mailbeacon_campaign_paused", "1 while the campaign is paused", ["campaign"], registry=REGISTRY
)
AUTO_PAUSES = Counter(
    "mailbeacon_operator_auto_pauses_total", "Campaigns paused by their guardrails", registry=REGISTRY
)
STATISTICS_ERRORS = Counter(
    "mailbeacon_operator_statistics_errors_total",
    "Failed reads of campaign statistics from the aggregator",
    registry=REGISTRY,
)

# Pods seen by the injection webhook. Every outcome exists from the start, at 0, so a rare
# one (an invalid annotation, an error) shows in rate() from its first occurrence.
INJECTION_OUTCOMES = (
    "injected",
    "completed",
    "already_injected",
    "not_requested",
    "invalid_annotation",
    "error",
)
INJECTIONS = Counter(
    "mailbeacon_operator_injections_total",
    "Pods seen by the injection webhook, by outcome (" + ", ".join(INJECTION_OUTCOMES) + ")",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in INJECTION_OUTCOMES:
    INJECTIONS.labels(_outcome)


def guardrail_label(condition_type: str) -> str:
    return "bounce_rate" if condition_type == BOUNCE_RATE_HIGH else "complaint_rate"


def export(key: CampaignKey, spec: CampaignSpec, judgements: list[Judgement] | None) -> None:
    """A campaign's series; ``judgements`` None (no numbers known yet) exports the spec's alone."""
    campaign = str(key)
    THRESHOLD.labels(campaign, "bounce_rate").set(spec.guardrails.bounce_rate_percent)
    THRESHOLD.labels(campaign, "complaint_rate").set(spec.guardrails.complaint_rate_percent)
    MIN_VOLUME.labels(campaign).set(spec.guardrails.min_delivered)
    for judgement in judgements or ():
        guardrail = guardrail_label(judgement.type)
        RATIO.labels(campaign, guardrail).set(judgement.ratio if math.isfinite(judgement.ratio) else 1e9)
        BREACHED.labels(campaign, guardrail).set(1 if judgement.status == "True" else 0)
    PAUSED.labels(campaign).set(1 if spec.paused else 0)


def forget(key: CampaignKey) -> None:
    """Drop a deleted campaign's series (its statistics stay in the aggregator)."""
    campaign = str(key)
    for gauge in (THRESHOLD, RATIO, BREACHED):
        for guardrail in GUARDRAILS:
            with contextlib.suppress(KeyError):
                gauge.remove(campaign, guardrail)
    for single in (MIN_VOLUME, PAUSED):
        with contextlib.suppress(KeyError):
            single.remove(campaign)
