"""What the app is told once the upstream answered for every copy, and the events that record each copy.

Pure policy (README "What the app is told"): the proxy answers 250 only when the upstream
accepted some copy, and every copy the upstream answered for ends as ``sent`` or ``failed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailbeacon.events import Event, EventType
from smtp_proxy.upstream import CopyResult


@dataclass(frozen=True)
class Outcome:
    """What the app is told, and the events that record each copy."""

    reply: str
    events: list[Event]
    result: str


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def decide(
    results: Sequence[CopyResult], campaign: str | None, tracking_ids: Sequence[str | None], message_id: str
) -> Outcome:
    """Pure reply policy: 250 only if some copy was accepted; all-refused passes the upstream's code on.

    When nothing was accepted, a transient refusal wins over a permanent one so the app
    retries (the copies that would fail permanently fail again and then bounce). Copies
    refused while others were accepted (after their bounded retry) are recorded as
    ``failed``: nothing is silent.
    """
    accepted = [r for r in results if r.accepted]
    events: list[Event] = []
    for result, tracking_id in zip(results, tracking_ids, strict=True):
        if tracking_id is None:
            continue
        if result.accepted:
            events.append(
                Event(
                    event_id=f"proxy:sent:{tracking_id}",
                    type=EventType.SENT,
                    tracking_id=tracking_id,
                    campaign=campaign,
                    recipient=result.recipient,
                    source="proxy",
                    metadata={"message_id": message_id, "upstream_reply": _one_line(result.reply)},
                )
            )
        elif accepted or not result.transient:
            events.append(
                Event(
                    event_id=f"proxy:failed:{tracking_id}",
                    type=EventType.FAILED,
                    tracking_id=tracking_id,
                    campaign=campaign,
                    recipient=result.recipient,
                    reason=_one_line(result.reply),
                    source="proxy",
                    metadata={"message_id": message_id, "smtp_code": result.code},
                )
            )
    if len(accepted) == len(results):
        return Outcome(f"250 2.0.0 OK: {len(results)} copies accepted", events, "accepted")
    if accepted:
        return Outcome(
            f"250 2.0.0 OK: {len(accepted)} of {len(results)} copies accepted, the rest failed",
            events,
            "partial",
        )
    refused = next((r for r in results if r.transient), results[0])
    code = refused.code if 400 <= refused.code < 600 else 451
    return Outcome(f"{code} {_one_line(refused.text)}", events, "deferred" if code < 500 else "rejected")
