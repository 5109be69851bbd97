"""Which copies of a campaign's message are not relayed: their recipient unsubscribed or complained.

Pure policy; the lookup is :meth:`mailbeacon.bus.suppressions.SuppressionList.reason` (or
None when ``HONOUR_UNSUBSCRIBES`` is off). RFC 8058 one-click unsubscribes and spam
complaints must stop that campaign's mail to the recipient (the large mailbox providers
ask bulk senders to honour them within two days); this is where the proxy does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailbeacon.bus.suppressions import COMPLAINED, UNSUBSCRIBED

Lookup = Callable[[str, str], str | None]

REASON_TEXT = {
    UNSUBSCRIBED: "recipient unsubscribed from this campaign",
    COMPLAINED: "recipient complained about this campaign (spam report)",
}


@dataclass(frozen=True)
class Suppressed:
    """One copy not relayed, recorded as ``failed`` with the reason."""

    recipient: str
    tracking_id: str
    reason: str  # unsubscribed or complained

    @property
    def text(self) -> str:
        return REASON_TEXT.get(self.reason, REASON_TEXT[UNSUBSCRIBED])


def suppression_reasons(
    campaign: str | None, recipients: Sequence[str], lookup: Lookup | None
) -> list[str | None]:
    """Per recipient, why its copy must not be relayed, or None to relay it.

    Mail of no campaign (untracked) is never suppressed: a suppression is per campaign.
    """
    if campaign is None or lookup is None:
        return [None] * len(recipients)
    return [lookup(campaign, recipient) for recipient in recipients]


def all_suppressed_reply(suppressed: Sequence[Suppressed], campaign: str | None) -> str:
    """The permanent refusal when no recipient is left: the app must not retry."""
    if len(suppressed) == 1:
        return f"550 5.7.1 Not sent: {suppressed[0].text} ({campaign})"
    reasons = {s.reason for s in suppressed}
    if reasons == {UNSUBSCRIBED}:
        why = "unsubscribed from"
    elif reasons == {COMPLAINED}:
        why = "complained about"
    else:
        why = "unsubscribed from or complained about"
    return f"550 5.7.1 Not sent: all {len(suppressed)} recipients {why} this campaign ({campaign})"
