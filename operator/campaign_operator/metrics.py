"""Prometheus metrics of the operator: each campaign's headline statistics as gauges.

The operator already reads every campaign's statistics on its timer; exporting them here
gives Grafana and the alert rules per-campaign rates and guardrail state (including the
campaign's own thresholds) without another scrape of the aggregator's database.
Labels: ``campaign`` is ``namespace/name`` as in ``mailbeacon_events_total``.
"""

from __future__ import annotations

import contextlib
import math

from prometheus_client import Counter, Gauge

from campaign_operator.guardrails import Judgement
from campaign_operator.resource import BOUNCE_RATE_HIGH
from campaign_operator.status import Headline
from mailbeacon.campaigns import CampaignKey, CampaignSpec

MESSAGE_STATES = {
    "sent": "sent",
    "failed": "failed",
    "delivered": "delivered",
    "bounced": "bounced",
    "complained": "complained",
    "unsubscribed": "unsubscribed",
    "opened": "unique_opens",
    "human_opened": "human_unique_opens",
    "clicked": "unique_clicks",
    "human_clicked": "human_unique_clicks",
}
RATES = {
    "delivery": "delivery_rate",
    "open": "open_rate",
    "click": "click_rate",
    "bounce": "bounce_rate",
    "complaint": "complaint_rate",
}

MESSAGES = Gauge(
    "mailbeacon_campaign_messages",
    "Copies of a campaign's mail with at least one event of the state (opened: unique opens)",
    ["campaign", "state"],
)
RATE = Gauge("mailbeacon_campaign_rate_percent", "A campaign's rates, in percent", ["campaign", "rate"])
THRESHOLD = Gauge(
    "mailbeacon_campaign_guardrail_threshold_percent",
    "A campaign's guardrail thresholds",
    ["campaign", "guardrail"],
)
RATIO = Gauge(
    "mailbeacon_campaign_guardrail_ratio",
    "Rate divided by its threshold once the campaign has enough volume to judge it (else 0); 1 trips",
    ["campaign", "guardrail"],
)
BREACHED = Gauge(
    "mailbeacon_campaign_guardrail_breached",
    "1 while the guardrail's condition is True",
    ["campaign", "guardrail"],
)
PAUSED = Gauge("mailbeacon_campaign_paused", "1 while the campaign is paused", ["campaign"])
AUTO_PAUSES = Counter("mailbeacon_operator_auto_pauses_total", "Campaigns paused by their guardrails")
STATISTICS_ERRORS = Counter(
    "mailbeacon_operator_statistics_errors_total", "Failed reads of campaign statistics from the aggregator"
)


def guardrail_label(condition_type: str) -> str:
    return "bounce_rate" if condition_type == BOUNCE_RATE_HIGH else "complaint_rate"


def export(key: CampaignKey, spec: CampaignSpec, headline: Headline, judgements: list[Judgement]) -> None:
    campaign = str(key)
    for state, attribute in MESSAGE_STATES.items():
        MESSAGES.labels(campaign, state).set(getattr(headline, attribute))
    for rate, attribute in RATES.items():
        RATE.labels(campaign, rate).set(getattr(headline, attribute))
    THRESHOLD.labels(campaign, "bounce_rate").set(spec.guardrails.bounce_rate_percent)
    THRESHOLD.labels(campaign, "complaint_rate").set(spec.guardrails.complaint_rate_percent)
    for judgement in judgements:
        guardrail = guardrail_label(judgement.type)
        RATIO.labels(campaign, guardrail).set(judgement.ratio if math.isfinite(judgement.ratio) else 1e9)
        BREACHED.labels(campaign, guardrail).set(1 if judgement.status == "True" else 0)
    PAUSED.labels(campaign).set(1 if spec.paused else 0)


def forget(key: CampaignKey) -> None:
    """Drop a deleted campaign's series (its statistics stay in the aggregator)."""
    campaign = str(key)
    for gauge, values in (
        (MESSAGES, MESSAGE_STATES),
        (RATE, RATES),
        (THRESHOLD, ("bounce_rate", "complaint_rate")),
        (RATIO, ("bounce_rate", "complaint_rate")),
        (BREACHED, ("bounce_rate", "complaint_rate")),
    ):
        for value in values:
            with contextlib.suppress(KeyError):
                gauge.remove(campaign, value)
    with contextlib.suppress(KeyError):
        PAUSED.remove(campaign)
