"""What the app is told once the upstream answered for every copy, and the events that record each copy.

Pure policy (docs/proxy.md "What the app is told (SMTP replies)"): the proxy answers 250 only when the upstream
accepted some copy, and every copy the upstream answered for ends as ``sent`` or ``failed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailbeacon.contract.events import Event, EventType
from smtp_proxy.relay.suppress import Suppressed, all_suppressed_reply
from smtp_proxy.relay.upstream import CopyResult


@dataclass(frozen=True)
class Outcome:
    """What the app is told, and the events that record each copy."""

    reply: str
    events: list[Event]
    result: str


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def _copy_event(
    kind: EventType,
    tracking_id: str,
    campaign: str | None,
    recipient: str,
    reason: str | None,
    **metadata: object,
) -> Event:
    """The proxy's record of one copy; its id makes a republished event count once."""
    return Event(
        event_id=f"proxy:{kind.value}:{tracking_id}",
        type=kind,
        tracking_id=tracking_id,
        campaign=campaign,
        recipient=recipient,
        reason=reason,
        source="proxy",
        metadata=metadata,
    )


def _suppressed_event(copy: Suppressed, campaign: str | None, message_id: str) -> Event:
    return _copy_event(
        EventType.FAILED, copy.tracking_id, campaign, copy.recipient, copy.text,
        message_id=message_id, suppressed=copy.reason,
    )  # fmt: skip


def decide(
    results: Sequence[CopyResult],
    campaign: str | None,
    tracking_ids: Sequence[str | None],
    message_id: str,
    suppressed: Sequence[Suppressed] = (),
) -> Outcome:
    """Pure reply policy: 250 only if some copy was accepted; all-refused passes the upstream's code on.

    When nothing was accepted, a transient refusal wins over a permanent one so the app
    retries (the copies that would fail permanently fail again and then bounce). Copies
    refused while others were accepted (after their bounded retry) are recorded as
    ``failed``: nothing is silent.

    ``suppressed`` copies were never relayed (their recipient unsubscribed or complained):
    each is ``failed`` with the reason once the message's answer is final (2xx or 5xx);
    when the app is told to retry (4xx), the retry records them. With no copy relayed at
    all the answer is a permanent ``550 5.7.1``.
    """
    if suppressed and not results:
        reply = all_suppressed_reply(suppressed, campaign)
        return Outcome(reply, [_suppressed_event(s, campaign, message_id) for s in suppressed], "suppressed")
    outcome = _decide_relayed(results, campaign, tracking_ids, message_id)
    if not suppressed or outcome.reply.startswith("4"):
        return outcome
    events = outcome.events + [_suppressed_event(s, campaign, message_id) for s in suppressed]
    total = len(results) + len(suppressed)
    accepted = sum(1 for r in results if r.accepted)
    if not accepted:
        return Outcome(outcome.reply, events, outcome.result)
    if accepted < len(results):
        rest = "the rest failed"
    else:
        rest = f"{len(suppressed)} not sent (unsubscribed or complained)"
    return Outcome(f"250 2.0.0 OK: {accepted} of {total} copies accepted, {rest}", events, "partial")


def _decide_relayed(
    results: Sequence[CopyResult], campaign: str | None, tracking_ids: Sequence[str | None], message_id: str
) -> Outcome:
    accepted = [r for r in results if r.accepted]
    # Told to retry (nothing accepted, some refusal temporary), the app sends every copy
    # again under new tracking ids: a failed event now would count its recipient twice.
    final = bool(accepted) or not any(r.transient for r in results)
    events: list[Event] = []
    for result, tracking_id in zip(results, tracking_ids, strict=True):
        if tracking_id is None:
            continue
        if result.accepted:
            events.append(
                _copy_event(
                    EventType.SENT,
                    tracking_id,
                    campaign,
                    result.recipient,
                    None,
                    message_id=message_id,
                    upstream_reply=_one_line(result.reply),
                )
            )
        elif final:
            events.append(
                _copy_event(
                    EventType.FAILED,
                    tracking_id,
                    campaign,
                    result.recipient,
                    _one_line(result.reply),
                    message_id=message_id,
                    smtp_code=result.code,
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
