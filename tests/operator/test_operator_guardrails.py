"""Guardrails and status as plain functions: thresholds, volume gates, flips, Events, auto-pause."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaign_operator.guardrails import conditions_changed, decide, judge, statistics_condition
from campaign_operator.status import Headline, InvalidStatistics, numbers_changed
from mailbeacon.contract.campaigns import CampaignSpec, Guardrails

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def spec(**guardrails: Any) -> CampaignSpec:
    return CampaignSpec.model_validate({"guardrails": guardrails})


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


def test_defaults_follow_the_bulk_sender_rules() -> None:
    guardrails = Guardrails()
    assert (guardrails.complaint_rate_percent, guardrails.bounce_rate_percent) == (0.3, 5.0)
    assert guardrails.min_delivered == 100 and not guardrails.auto_pause


def test_rates_are_not_judged_before_the_minimum_volume() -> None:
    # 1 complaint in 50 deliveries is 2 %, far above 0.3 %, but 50 < 100 deliveries.
    verdicts = judge(Guardrails(), Headline(sent=60, delivered=50, complained=1, bounced=10))
    assert [(v.type, v.status, v.reason) for v in verdicts] == [
        ("BounceRateHigh", "False", "InsufficientVolume"),
        ("ComplaintRateHigh", "False", "InsufficientVolume"),
    ]
    assert "after 100 deliveries; 50 so far" in verdicts[1].message
    assert all(v.ratio == 0 for v in verdicts)


@pytest.mark.parametrize(
    ("complained", "delivered", "high"),
    [(2, 1000, False), (3, 1000, True), (299, 100000, False), (300, 100000, True), (0, 1000, False)],
)
def test_complaint_rate_trips_at_its_threshold(complained: int, delivered: int, high: bool) -> None:
    (_, complaint) = judge(Guardrails(), Headline(sent=delivered, delivered=delivered, complained=complained))
    assert complaint.status == ("True" if high else "False")
    assert complaint.reason == ("AboveThreshold" if high else "BelowThreshold")
    assert complaint.ratio == pytest.approx(complained * 100 / delivered / 0.3)


def test_a_list_too_bad_to_deliver_still_trips_the_bounce_guardrail() -> None:
    # Everything bounced, nothing delivered: the bounce rate is judged on sent copies.
    (bounce, complaint) = judge(Guardrails(), Headline(sent=200, bounced=200))
    assert bounce.status == "True" and "100.00% (200 of 200 sent copies)" in bounce.message
    assert complaint.reason == "InsufficientVolume"


def test_a_zero_threshold_means_any_at_all() -> None:
    guardrails = Guardrails(complaint_rate_percent=0, min_delivered=0)
    assert judge(guardrails, Headline(sent=5, delivered=5))[1].status == "False"
    assert judge(guardrails, Headline(sent=5, delivered=5, complained=1))[1].status == "True"


def test_a_flip_posts_one_warning_and_pauses_when_asked() -> None:
    campaign = spec(minDelivered=10, autoPause=True)
    numbers = Headline(sent=20, delivered=20, complained=1)
    first = decide(campaign, numbers, [], T0, generation=4)
    assert [(n.type, n.reason) for n in first.notes] == [
        ("Warning", "ComplaintRateHigh"),
        ("Warning", "AutoPaused"),
    ]
    assert first.pause
    high = by_type(first.conditions)["ComplaintRateHigh"]
    assert high["status"] == "True" and high["observedGeneration"] == 4
    assert high["lastTransitionTime"] == "2026-11-27T10:00:00Z"

    # The next tick with the same numbers: no flip, no Event, the transition time stays.
    again = decide(
        campaign.model_copy(update={"paused": True}), numbers, first.conditions, T0 + timedelta(minutes=1), 4
    )
    assert again.notes == [] and not again.pause
    assert by_type(again.conditions)["ComplaintRateHigh"]["lastTransitionTime"] == "2026-11-27T10:00:00Z"
    assert not conditions_changed(first.conditions, again.conditions)


def test_no_pause_unless_asked_and_none_for_a_resumed_campaign() -> None:
    numbers = Headline(sent=200, delivered=200, complained=5)
    assert not decide(spec(autoPause=False), numbers, [], T0).pause
    tripped = decide(spec(autoPause=True), numbers, [], T0)
    # Someone set paused back to false while the rate is still high: respected.
    resumed = decide(spec(autoPause=True), numbers, tripped.conditions, T0)  # paused: false
    assert not resumed.pause and resumed.notes == []


def test_recovery_posts_a_normal_event() -> None:
    campaign = spec(minDelivered=10)
    high = decide(campaign, Headline(sent=20, delivered=20, complained=1), [], T0)
    later = T0 + timedelta(hours=1)
    normal = decide(campaign, Headline(sent=1000, delivered=1000, complained=1), high.conditions, later)
    assert [(n.type, n.reason) for n in normal.notes] == [("Normal", "ComplaintRateNormal")]
    condition = by_type(normal.conditions)["ComplaintRateHigh"]
    assert condition["status"] == "False" and condition["lastTransitionTime"] == "2026-11-27T11:00:00Z"


def test_unavailable_statistics_touch_only_their_condition() -> None:
    tripped = decide(spec(minDelivered=10), Headline(sent=20, delivered=20, complained=1), [], T0)
    down = statistics_condition(tripped.conditions, False, "connection refused", T0, 2)
    assert by_type(down)["ComplaintRateHigh"] == by_type(tripped.conditions)["ComplaintRateHigh"]
    assert by_type(down)["StatisticsAvailable"]["status"] == "False"
    assert by_type(down)["StatisticsAvailable"]["reason"] == "AggregatorUnavailable"


counts = st.integers(min_value=0, max_value=10**6)


@given(
    delivered=counts,
    complained=counts,
    threshold=st.floats(min_value=0, max_value=100),
    minimum=st.integers(min_value=0, max_value=10**4),
    auto_pause=st.booleans(),
)
def test_complaint_condition_is_exactly_the_rule(
    delivered: int, complained: int, threshold: float, minimum: int, auto_pause: bool
) -> None:
    complained = min(complained, delivered)
    campaign = spec(complaintRatePercent=threshold, minDelivered=minimum, autoPause=auto_pause)
    numbers = Headline(sent=delivered, delivered=delivered, complained=complained)
    decision = decide(campaign, numbers, [], T0)
    expected = (
        delivered > 0
        and delivered >= minimum
        and complained > 0
        and complained * 100.0 / delivered >= threshold
    )
    assert (by_type(decision.conditions)["ComplaintRateHigh"]["status"] == "True") == expected
    # Deciding again on its own output changes nothing and posts nothing: ticks are idempotent.
    again = decide(campaign.model_copy(update={"paused": decision.pause}), numbers, decision.conditions, T0)
    assert (
        again.notes == []
        and not again.pause
        and not conditions_changed(decision.conditions, again.conditions)
    )


def test_headline_from_the_aggregators_statistics() -> None:
    statistics = {
        "campaign": "marketing/newsletter",
        "total_recipients": 9,
        "sent_count": 10,
        "failed_count": 1,
        "delivered_count": 8,
        "bounced_count": 2,
        "complained_count": 1,
        "unsubscribed_count": 1,
        "unique_opens": 4,
        "human_unique_opens": 3,
        "unique_clicks": 2,
        "human_unique_clicks": 2,
        "delivery_rate": 80.0,
        "open_rate": 50.0,
        "click_rate": 25.0,
        "bounce_rate": 20.0,
        "complaint_rate": 12.5,
        "top_links": [],
    }
    status = Headline.from_statistics(statistics).as_status()
    assert status == {
        "totalRecipients": 9,
        "sent": 10,
        "failed": 1,
        "delivered": 8,
        "bounced": 2,
        "complained": 1,
        "unsubscribed": 1,
        "uniqueOpens": 4,
        "humanUniqueOpens": 3,
        "uniqueClicks": 2,
        "humanUniqueClicks": 2,
        "deliveryRate": 80.0,
        "openRate": 50.0,
        "clickRate": 25.0,
        "bounceRate": 20.0,
        "complaintRate": 12.5,
    }
    assert not numbers_changed(status, Headline.from_statistics(statistics))
    assert numbers_changed(status | {"sent": 9}, Headline.from_statistics(statistics))
    assert Headline.from_statistics({}) == Headline()


@pytest.mark.parametrize(
    "bad", [{"sent_count": "ten"}, {"sent_count": -1}, {"open_rate": "high"}, {"sent_count": True}]
)
def test_headline_refuses_what_is_not_statistics(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidStatistics):
        Headline.from_statistics(bad)
