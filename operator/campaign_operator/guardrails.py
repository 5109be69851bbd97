"""Reputation guardrails: judging a campaign's rates, its conditions, the Events and the auto-pause.

The defaults follow the large mailbox providers' bulk-sender rules (a complaint rate that
must stay below 0.3 %, bounces kept under a few percent). A rate is judged only once the
campaign has enough volume: one complaint in the first ten deliveries is noise, not a trend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from campaign_operator.resource import BOUNCE_RATE_HIGH, COMPLAINT_RATE_HIGH, STATISTICS_AVAILABLE
from campaign_operator.status import Headline
from mailbeacon.contract.campaigns import CampaignSpec, Guardrails

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Judgement:
    """One guardrail's verdict on the current numbers."""

    type: str
    status: ConditionStatus
    reason: str
    message: str
    ratio: float  # rate / threshold once judged (alerts warn before 1.0), else 0


@dataclass(frozen=True)
class Note:
    """A Kubernetes Event to post on the Campaign."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    conditions: list[dict[str, Any]]
    judgements: list[Judgement]
    notes: list[Note]
    pause: bool


@dataclass(frozen=True)
class _Rule:
    condition: str
    label: str
    count: str  # Headline attribute counted in the numerator
    volume: str  # Headline attribute that is the denominator and the volume gate
    volume_label: str

    def threshold(self, guardrails: Guardrails) -> float:
        if self.condition == BOUNCE_RATE_HIGH:
            return guardrails.bounce_rate_percent
        return guardrails.complaint_rate_percent


RULES = (
    _Rule(BOUNCE_RATE_HIGH, "bounce rate", "bounced", "sent", "sent copies"),
    _Rule(COMPLAINT_RATE_HIGH, "complaint rate", "complained", "delivered", "deliveries"),
)


def judge(guardrails: Guardrails, headline: Headline) -> list[Judgement]:
    """Each guardrail on the numbers, computed from the counts (not the rounded rates)."""
    judgements = []
    for rule in RULES:
        count, volume = getattr(headline, rule.count), getattr(headline, rule.volume)
        threshold = rule.threshold(guardrails)
        rate = count * 100.0 / volume if volume else 0.0
        if volume == 0 or volume < guardrails.min_delivered:
            judgements.append(
                Judgement(
                    rule.condition,
                    "False",
                    "InsufficientVolume",
                    f"{rule.label} is judged after {guardrails.min_delivered} {rule.volume_label}; "
                    f"{volume} so far",
                    0.0,
                )
            )
            continue
        ratio = rate / threshold if threshold > 0 else (float("inf") if count else 0.0)
        # A threshold of 0 means "any at all": a rate of 0 never trips it.
        high = count > 0 and rate >= threshold
        judgements.append(
            Judgement(
                rule.condition,
                "True" if high else "False",
                "AboveThreshold" if high else "BelowThreshold",
                f"{rule.label} {rate:.2f}% ({count} of {volume} {rule.volume_label}), "
                f"threshold {threshold:g}%",
                ratio,
            )
        )
    return judgements


def _by_type(conditions: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(c.get("type")): dict(c) for c in conditions if isinstance(c, Mapping)}


def merge_condition(
    previous: Mapping[str, Any] | None,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> dict[str, Any]:
    """A condition as Kubernetes conventions shape it; the transition time moves only on a flip."""
    unchanged = previous is not None and previous.get("status") == status
    condition: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": previous.get("lastTransitionTime")
        if unchanged and previous is not None
        else now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def statistics_condition(
    current: Sequence[Mapping[str, Any]], available: bool, message: str, now: datetime, generation: int | None
) -> list[dict[str, Any]]:
    """The conditions with StatisticsAvailable set, the others kept as they are."""
    by_type = _by_type(current)
    condition = merge_condition(
        by_type.get(STATISTICS_AVAILABLE),
        STATISTICS_AVAILABLE,
        "True" if available else "False",
        "AggregatorAnswered" if available else "AggregatorUnavailable",
        message,
        now,
        generation,
    )
    return [c for t, c in by_type.items() if t != STATISTICS_AVAILABLE] + [condition]


def decide(
    spec: CampaignSpec,
    headline: Headline,
    current: Sequence[Mapping[str, Any]],
    now: datetime,
    generation: int | None = None,
) -> Decision:
    """New conditions, the Events for every flip, and whether to pause the campaign now.

    The campaign is paused only when a guardrail trips in this very decision (a flip to
    True) and the spec asks for it: if someone sets ``paused: false`` while a rate is still
    high, that is a deliberate choice the operator respects until the guardrail trips anew.
    """
    by_type = _by_type(current)
    judgements = judge(spec.guardrails, headline)
    conditions: list[dict[str, Any]] = []
    notes: list[Note] = []
    tripped: list[Judgement] = []
    for judgement in judgements:
        before = by_type.get(judgement.type)
        was_high = before is not None and before.get("status") == "True"
        conditions.append(
            merge_condition(
                before, judgement.type, judgement.status, judgement.reason, judgement.message, now, generation
            )
        )
        if judgement.status == "True" and not was_high:
            tripped.append(judgement)
            notes.append(Note("Warning", judgement.type, judgement.message))
        elif judgement.status != "True" and was_high:
            normal = judgement.type.replace("High", "Normal")
            notes.append(Note("Normal", normal, judgement.message))
    available = by_type.get(STATISTICS_AVAILABLE)
    conditions.append(
        merge_condition(
            available,
            STATISTICS_AVAILABLE,
            "True",
            "AggregatorAnswered",
            "statistics are current",
            now,
            generation,
        )
    )
    pause = bool(tripped) and spec.guardrails.auto_pause and not spec.paused
    if pause:
        why = "; ".join(j.message for j in tripped)
        notes.append(
            Note(
                "Warning",
                "AutoPaused",
                f"campaign paused by its guardrails ({why}); set spec.paused to false to resume",
            )
        )
    return Decision(conditions, judgements, notes, pause)


def conditions_changed(current: Sequence[Mapping[str, Any]], wanted: Sequence[Mapping[str, Any]]) -> bool:
    return _by_type(current) != _by_type(wanted)
