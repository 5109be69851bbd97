"""The aiosmtpd handler: relay policy, campaign assignment, per-recipient copies, relay, events, reply.

The reply to the app is decided only after the upstream answered for every copy, so
the proxy never acknowledges mail the upstream did not take.
"""

from __future__ import annotations

import asyncio
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
from smtp_proxy import esp, metrics, mime
from smtp_proxy.auth import Networks
from smtp_proxy.dkim_sign import DkimSigner, without_signatures
from smtp_proxy.mime import Buffer, Part
from smtp_proxy.optout import TRACK_HEADER, RecipientOptOuts, TrackSwitches, switches_from_header
from smtp_proxy.rewrite import (
    CONTROL_HEADERS,
    CONTROL_PREFIXES,
    TRACKING_HEADER,
    CopyTracking,
    PreparedMessage,
    prepare,
)
from smtp_proxy.upstream import CopyResult, OutgoingCopy, Upstream

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


@dataclass(frozen=True)
class ProxyOptions:
    """The handler's slice of the settings, resolved at start-up."""

    site_url: str
    keys: Sequence[bytes]
    relay_networks: Networks
    max_recipients: int = 100
    provider: str = "generic"
    ses_configuration_set: str | None = None
    default_campaign: CampaignKey | None = None
    auto_create_campaigns: bool = False
    honeypot: bool = True


class _MessageCopies:
    """Builds each recipient's copy of one message from a single preparation."""

    def __init__(
        self,
        handler: ProxyHandler,
        raw: bytes,
        prepared: PreparedMessage | None,
        spec: CampaignSpec,
        switches: TrackSwitches,
    ) -> None:
        self.handler, self.raw, self.prepared, self.spec, self.switches = (
            handler,
            raw,
            prepared,
            spec,
            switches,
        )
        self.failed_once = False

    def _fallback(self, exc: Exception) -> Sequence[Buffer]:
        if not self.failed_once:  # one count and one log line per message, however many copies
            self.failed_once = True
            metrics.REWRITE_FAILURES.inc()
            log.warning("relaying message unchanged, rewrite failed: %s: %s", type(exc).__name__, exc)
        return [self.raw]

    def content(self, recipient: str, tracking_id: str) -> Sequence[Buffer]:
        prepared = self.prepared
        if prepared is None:
            return [self.raw]
        handler, options = self.handler, self.handler.options
        try:
            signer = handler.dkim_signer
            resign = prepared.dkim_signed and signer is not None
            switches = self.switches
            if recipient.lower() in handler.optouts:
                switches = TrackSwitches(False, False)
            tracking = CopyTracking(
                site_url=options.site_url,
                keys=options.keys,
                tracking_id=tracking_id,
                track_opens=switches.opens,
                track_clicks=switches.clicks,
                unsubscribe_header=self.spec.tracking.unsubscribe_header,
                honeypot=options.honeypot,
            )
            if prepared.dkim_signed and not resign:
                headers, body = prepared.untouched()  # rewriting would break the signature
                headers += f"{TRACKING_HEADER}: {tracking_id}".encode() + prepared.eol
            else:
                headers, body = prepared.render(tracking)
            protected = frozenset() if resign else prepared.protected
            headers = esp.add_correlation(
                headers,
                options.provider,
                tracking_id,
                prepared.eol,
                protected=protected,
                ses_configuration_set=options.ses_configuration_set,
            )
            if resign and signer is not None:
                message = b"".join([without_signatures(headers), prepared.separator, *map(bytes, body)])
                return [signer.sign(message), message]
            return [headers, prepared.separator, *body]
        except Exception as exc:  # deliver the mail even when we cannot track it
            return self._fallback(exc)


class ProxyHandler:
    def __init__(
        self,
        options: ProxyOptions,
        upstream: Upstream,
        publisher: EventPublisher,
        campaigns: CampaignStore | None,
        *,
        optouts: RecipientOptOuts | None = None,
        dkim_signer: DkimSigner | None = None,
    ) -> None:
        self.options = options
        self.upstream = upstream
        self.publisher = publisher
        self.campaigns = campaigns
        self.optouts = optouts or RecipientOptOuts(None)
        self.dkim_signer = dkim_signer

    # -- relay policy -------------------------------------------------------------------

    def _may_relay(self, session: Session) -> bool:
        return bool(session.authenticated) or session.peer in self.options.relay_networks

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if not self._may_relay(session):
            metrics.REFUSED.labels("relay_denied").inc()
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if not self._may_relay(session):
            metrics.REFUSED.labels("relay_denied").inc()
            return "530 5.7.0 Authentication required"
        if len(envelope.rcpt_tos) >= self.options.max_recipients:
            metrics.REFUSED.labels("too_many_recipients").inc()
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_exception(self, error: Exception) -> str:
        # Never aiosmtpd's "500 Error: (ExceptionName) details": a temporary failure the app retries.
        metrics.HANDLER_ERRORS.inc()
        log.error("unexpected error in the SMTP session", exc_info=error)
        return "451 4.3.0 Temporary local problem, please try again later"

    # -- messages -----------------------------------------------------------------------

    async def _campaign_for(self, message: Part, sender: str) -> tuple[CampaignKey | None, CampaignSpec]:
        specs = self.campaigns.specs if self.campaigns else {}
        headers: list[tuple[str, Any]] = list(message.parsed.items())
        try:
            key = match_campaign(
                specs, [(n, str(v)) for n, v in headers], sender, self.options.default_campaign
            )
        except InvalidCampaign as exc:
            log.warning("unusable campaign header (%s); relaying untracked", exc)
            return None, CampaignSpec()
        if key is None:
            return None, CampaignSpec()
        spec = specs.get(key)
        if spec is None:
            spec = CampaignSpec()
            if self.options.auto_create_campaigns and self.campaigns is not None:
                try:
                    await self.campaigns.create_if_missing(key, spec)
                except Exception as exc:  # the KV write is a convenience; never fail mail for it
                    log.warning("could not record new campaign %s: %s", key, exc)
        return key, spec

    def _prepare(self, message: Part, spec: CampaignSpec) -> PreparedMessage | None:
        try:
            return prepare(message, self.options.site_url, spec.tracking.skip_links)
        except Exception as exc:
            metrics.REWRITE_FAILURES.inc()
            log.warning("relaying message unchanged, cannot parse it: %s: %s", type(exc).__name__, exc)
            return None

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
            untouched = self._untracked_content(raw, message)
            copies = [OutgoingCopy(rcpt, lambda: untouched) for rcpt in recipients]
            tracking_ids = [None] * len(recipients)
        else:
            switches = switches_from_header(message.parsed.get(TRACK_HEADER))
            switches &= TrackSwitches(spec.tracking.opens, spec.tracking.clicks)
            prepared = self._prepare(message, spec)
            self._count_untracked(prepared, switches, recipients)
            builder = _MessageCopies(self, raw, prepared, spec, switches)
            tracking_ids = [str(uuid.uuid4()) for _ in recipients]
            copies = [
                OutgoingCopy(rcpt, lambda rcpt=rcpt, tid=tid: builder.content(rcpt, tid))  # type: ignore[misc]
                for rcpt, tid in zip(recipients, tracking_ids, strict=True)
            ]
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
        await asyncio.gather(*(self.publisher.publish_or_buffer(event) for event in outcome.events))
        metrics.MESSAGES.labels(outcome.result).inc()
        return outcome.reply

    def _untracked_content(self, raw: bytes, message: Part) -> Sequence[Buffer]:
        """Mail of no campaign: as received, less the proxy's own control headers."""
        if not message.separator:
            return [raw]
        headers = mime.remove_headers(message.headers, set(CONTROL_HEADERS), CONTROL_PREFIXES)
        if len(headers) == len(message.headers):
            return [raw]
        return [headers, message.separator, message.body]

    def _count_untracked(
        self, prepared: PreparedMessage | None, switches: TrackSwitches, recipients: Sequence[str]
    ) -> None:
        if prepared is not None and prepared.dkim_signed and self.dkim_signer is None:
            metrics.UNTRACKED.labels("dkim_signed").inc()
        elif not (switches.opens or switches.clicks):
            metrics.UNTRACKED.labels("tracking_off").inc()
        opted_out = sum(1 for rcpt in recipients if rcpt.lower() in self.optouts)
        if opted_out:
            metrics.UNTRACKED.labels("recipient_opt_out").inc(opted_out)
