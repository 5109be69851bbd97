"""The aiosmtpd handler: campaign assignment, per-recipient copies, relay, events, reply.

The reply to the app is decided only after the upstream answered for every copy, so
the proxy never acknowledges mail the upstream did not take.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailbeacon.campaign_store import CampaignStore
from mailbeacon.campaigns import CampaignKey, CampaignSpec, InvalidCampaign, match_campaign
from mailbeacon.events import Event, EventType
from mailbeacon.jetstream import EventPublisher
from mailbeacon.settings import Settings
from smtp_proxy import metrics
from smtp_proxy.mime import Part
from smtp_proxy.rewrite import CopyTracking, rewrite_copy
from smtp_proxy.upstream import CopyResult, Upstream

log = logging.getLogger(__name__)


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
    refused while others were accepted are recorded as ``failed``: nothing is silent.
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


class ProxyHandler:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        publisher: EventPublisher,
        campaigns: CampaignStore | None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.publisher = publisher
        self.campaigns = campaigns
        self.keys = settings.signing_keys()
        self.default_campaign = (
            CampaignKey.parse(settings.default_campaign) if settings.default_campaign else None
        )

    async def _campaign_for(self, message: Part, sender: str) -> tuple[CampaignKey | None, CampaignSpec]:
        specs = self.campaigns.specs if self.campaigns else {}
        headers: list[tuple[str, Any]] = list(message.parsed.items())
        try:
            key = match_campaign(specs, [(n, str(v)) for n, v in headers], sender, self.default_campaign)
        except InvalidCampaign as exc:
            log.warning("unusable campaign header (%s); relaying untracked", exc)
            return None, CampaignSpec()
        if key is None:
            return None, CampaignSpec()
        spec = specs.get(key)
        if spec is None:
            spec = CampaignSpec()
            if self.settings.auto_create_campaigns and self.campaigns is not None:
                try:
                    await self.campaigns.create_if_missing(key, spec)
                except Exception as exc:  # the KV write is a convenience; never fail mail for it
                    log.warning("could not record new campaign %s: %s", key, exc)
        return key, spec

    def _copy(self, raw: bytes, recipient: str, spec: CampaignSpec) -> tuple[str, bytes]:
        tracking_id = str(uuid.uuid4())
        tracking = CopyTracking(
            site_url=self.settings.site_url,
            keys=self.keys,
            tracking_id=tracking_id,
            track_opens=spec.tracking.opens,
            track_clicks=spec.tracking.clicks,
            skip_links=spec.tracking.skip_links,
            unsubscribe_header=spec.tracking.unsubscribe_header,
        )
        try:
            return tracking_id, rewrite_copy(raw, tracking).content
        except Exception as exc:
            # Deliver the mail even when we cannot track it; one log line per message is enough.
            metrics.REWRITE_FAILURES.inc()
            log.warning("relaying copy for %s unchanged, rewrite failed: %s", recipient, exc)
            return tracking_id, raw

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        sender = envelope.mail_from or ""
        recipients = list(envelope.rcpt_tos)
        message = Part.parse(raw)
        key, spec = await self._campaign_for(message, sender)
        if key is not None and spec.paused:
            metrics.MESSAGES.labels("paused").inc()
            return f"451 4.7.1 campaign {key} is paused, try again later"
        tracking_ids: list[str | None]
        if key is None:
            metrics.UNTRACKED.labels("no_campaign").inc()
            copies = [(rcpt, raw) for rcpt in recipients]
            tracking_ids = [None] * len(recipients)
        else:
            made = [self._copy(raw, rcpt, spec) for rcpt in recipients]
            copies = [(rcpt, content) for rcpt, (_, content) in zip(recipients, made, strict=True)]
            tracking_ids = [tid for tid, _ in made]
        started = time.perf_counter()
        results = await self.upstream.deliver(sender, copies, envelope.mail_options)
        metrics.RELAY_SECONDS.observe(time.perf_counter() - started)
        message_id = str(message.parsed.get("Message-ID", "")).strip()
        outcome = decide(results, str(key) if key else None, tracking_ids, message_id)
        for result in results:
            if not result.accepted:
                metrics.UPSTREAM_ERRORS.labels(f"{result.code // 100}xx").inc()
            copy_result = "sent" if result.accepted else ("deferred" if result.transient else "failed")
            metrics.COPIES.labels(copy_result).inc()
        for event in outcome.events:
            await self.publisher.publish_or_buffer(event)
        metrics.MESSAGES.labels(outcome.result).inc()
        return outcome.reply
