"""The aiosmtpd handler: relay policy, campaign assignment, per-recipient copies, relay, events, reply.

The reply to the app is decided only after the upstream answered for every copy, so
the proxy never acknowledges mail the upstream did not take. Once relaying has begun it
runs as its own task, apart from the SMTP session: an app that hangs up (or times out
during the retry window) cannot cut it short, so every copy the upstream accepted is
still recorded, and a stopping proxy waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailbeacon.bus.campaign_store import CampaignStore
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.bus.suppressions import SuppressionList
from mailbeacon.contract.campaigns import CampaignKey, TrackingSwitches
from smtp_proxy import metrics
from smtp_proxy.campaign_choice import CampaignChoice, choose_campaign
from smtp_proxy.relay.outcome import decide
from smtp_proxy.relay.suppress import Suppressed, suppression_reasons
from smtp_proxy.relay.upstream import CopyResult, OutgoingCopy, Upstream
from smtp_proxy.rewrite.copies import CopyOptions, MessageCopies, untracked_content
from smtp_proxy.rewrite.mime import Buffer, Part
from smtp_proxy.rewrite.optout import TRACK_HEADER, RecipientOptOuts, TrackSwitches, switches_from_header
from smtp_proxy.rewrite.submission import added_message_id, missing_headers
from smtp_proxy.session.auth import Networks

log = logging.getLogger(__name__)

_SHUTTING_DOWN = "451 4.3.2 The proxy is shutting down, please try again later"
# A message this large is prepared, and each copy rendered, in a worker thread, so the
# event loop keeps greeting and serving other sessions (docs/proxy.md "Limits"): rewriting
# costs up to ~150 ms per MB of dense HTML, held in one piece. Below it the work takes a
# few milliseconds and stays inline (a thread hop costs more than that for small mail).
OFFLOAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class ProxyOptions:
    """The handler's slice of the settings, resolved at start-up."""

    copies: CopyOptions
    relay_networks: Networks
    max_recipients: int = 100
    default_campaign: CampaignKey | None = None
    auto_create_campaigns: bool = False


@dataclass(frozen=True)
class _Relay:
    """One message on its way upstream: everything the relay task needs, nothing of the session."""

    sender: str
    copies: list[OutgoingCopy]
    tracking_ids: list[str | None]
    campaign: str | None
    message_id: str
    mail_options: list[str]
    suppressed: list[Suppressed]


# RFC 5321 4.5.3.1.3: a path is at most 256 octets with its angle brackets.
MAX_ADDRESS_OCTETS = 254


def _too_long(address: str) -> bool:
    return len(address.encode("utf-8", "surrogateescape")) > MAX_ADDRESS_OCTETS


def _plausible_recipient(address: str) -> bool:
    """local@domain without blanks, or the bare ``postmaster`` RFC 5321 4.5.1 allows; in
    UTF-8 (SMTPUTF8 hands us other bytes as lone surrogates, which no upstream can take)."""
    if address.lower() == "postmaster":
        return True
    local, at, domain = address.rpartition("@")
    if not (at and local and domain) or any(c.isspace() for c in address):
        return False
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ProxyHandler:
    def __init__(
        self,
        options: ProxyOptions,
        upstream: Upstream,
        publisher: EventPublisher,
        campaigns: CampaignStore | None,
        *,
        optouts: RecipientOptOuts | None = None,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self.options = options
        self.upstream = upstream
        self.publisher = publisher
        self.campaigns = campaigns
        self.optouts = optouts or RecipientOptOuts(None)
        self.suppressions = suppressions  # None: HONOUR_UNSUBSCRIBES is off
        self.closing = False
        self._relays: set[asyncio.Task[str]] = set()
        self._unknown_logged: set[str] = set()
        # One thread: rewrites of large messages take turns rather than compete with the
        # event loop (and each other) for the GIL.
        self._rewriter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailbeacon-rewrite")

    # -- relay policy -------------------------------------------------------------------

    def _may_relay(self, session: Session) -> bool:
        return bool(session.authenticated) or session.peer in self.options.relay_networks

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # this hook's duty in aiosmtpd's five-argument form
        if getattr(server, "offers_auth", True):
            return responses
        return [line for line in responses if not line[4:].upper().startswith("AUTH")]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if not self._may_relay(session):
            metrics.REFUSED.labels("relay_denied").inc()
            return "530 5.7.0 Authentication required"
        if _too_long(address):
            metrics.REFUSED.labels("path_too_long").inc()
            return "501 5.1.7 Sender address longer than 254 octets"
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
        if _too_long(address):
            # Upstream MTAs refuse these too (RFC 5321 4.5.3.1.3); saying so now beats a later bounce.
            metrics.REFUSED.labels("path_too_long").inc()
            return "501 5.1.3 Recipient address longer than 254 octets"
        if not _plausible_recipient(address):
            metrics.REFUSED.labels("bad_address").inc()
            return "501 5.1.3 Bad recipient address syntax"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_exception(self, error: Exception) -> str:
        # Never aiosmtpd's "500 Error: (ExceptionName) details": a temporary failure the app retries.
        metrics.HANDLER_ERRORS.inc()
        log.error("unexpected error in the SMTP session", exc_info=error)
        return "451 4.3.0 Temporary local problem, please try again later"

    # -- messages -----------------------------------------------------------------------

    async def _campaign_for(self, message: Part, sender: str) -> CampaignChoice:
        specs = self.campaigns.specs if self.campaigns else {}
        headers = [(name, str(value)) for name, value in message.parsed.items()]
        options = self.options
        choice = choose_campaign(
            specs, headers, sender, options.default_campaign, options.auto_create_campaigns
        )
        ignored = choice.ignored_header
        if ignored is not None and ignored not in self._unknown_logged and len(self._unknown_logged) < 1000:
            self._unknown_logged.add(ignored)  # one line per name, not one per message
            log.warning(
                "X-Campaign %r %s; tracking it %s",
                ignored[:200],
                choice.ignored_because,
                f"under {choice.key}" if choice.key else "not at all",
            )
        if choice.create and choice.key is not None and self.campaigns is not None:
            try:
                await self.campaigns.create_if_missing(choice.key, choice.spec)
            except Exception as exc:  # the KV write is a convenience; never fail mail for it
                log.warning("could not record new campaign %s: %s", choice.key, exc)
        return choice

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.closing:
            return _SHUTTING_DOWN
        raw = envelope.original_content or b""
        recipients = list(envelope.rcpt_tos)
        message = Part.parse(raw)
        added = missing_headers(raw, envelope.mail_from or "", datetime.now(UTC))
        choice = await self._campaign_for(message, envelope.mail_from or "")
        key, spec = choice.key, choice.spec
        if key is not None and spec.paused:
            metrics.MESSAGES.labels("paused").inc()
            return f"451 4.7.1 campaign {key} is paused, try again later"
        tracking_ids: list[str | None]
        suppressed: list[Suppressed] = []
        if key is None:
            metrics.UNTRACKED.labels(choice.untracked_why or "no_campaign").inc()
            untouched = untracked_content(raw, message, added)
            copies = [OutgoingCopy(rcpt, lambda: untouched) for rcpt in recipients]
            tracking_ids = [None] * len(recipients)
        else:
            lookup = self.suppressions.reason if self.suppressions is not None else None
            relayed: list[str] = []
            reasons = suppression_reasons(str(key), recipients, lookup)
            for rcpt, reason in zip(recipients, reasons, strict=True):
                if reason is None:
                    relayed.append(rcpt)
                else:
                    suppressed.append(Suppressed(rcpt, str(uuid.uuid4()), reason))
                    metrics.SUPPRESSED.labels(reason).inc()
            tracking_ids = [str(uuid.uuid4()) for _ in relayed]
            copies = (
                await self._tracked_copies(
                    raw, message, spec.tracking, relayed, tracking_ids, added, spec.display_name or key.name
                )
                if relayed
                else []
            )
        relay = _Relay(
            sender=envelope.mail_from or "",
            copies=copies,
            tracking_ids=tracking_ids,
            campaign=str(key) if key else None,
            message_id=added_message_id(added) or str(message.parsed.get("Message-ID", "")).strip(),
            mail_options=list(envelope.mail_options),
            suppressed=suppressed,
        )
        task = asyncio.create_task(self._relay(relay), name="smtp-relay")
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                log.info("the app hung up during the relay; the relay goes on and records every copy")
            raise

    async def _relay(self, relay: _Relay) -> str:
        """Deliver every copy, record each, and give the reply (whether or not anyone still listens)."""
        answered: dict[int, CopyResult] = {}
        started = time.perf_counter()
        try:
            results = (
                await self.upstream.deliver(
                    relay.sender, relay.copies, relay.mail_options, answered.__setitem__
                )
                if relay.copies
                else []  # every recipient suppressed: nothing goes upstream
            )
        except asyncio.CancelledError:
            # Only a shutdown past its grace period gets here: keep what the upstream
            # already answered (the rest has no reply to record).
            known = sorted(answered)
            if known:
                outcome = decide(
                    [answered[i] for i in known],
                    relay.campaign,
                    [relay.tracking_ids[i] for i in known],
                    relay.message_id,
                    (),  # the app got no answer and sends again: its retry records them
                )
                for event in outcome.events:
                    self.publisher.publish_later(event)  # flushed when the publisher closes
            log.error("relay cut short at shutdown; %d of %d copies answered", len(known), len(relay.copies))
            raise
        except Exception as exc:
            return await self.handle_exception(exc)
        if relay.copies:
            metrics.RELAY_SECONDS.observe(time.perf_counter() - started)
        outcome = decide(results, relay.campaign, relay.tracking_ids, relay.message_id, relay.suppressed)
        for result in results:
            if not result.accepted:
                metrics.UPSTREAM_ERRORS.labels(f"{result.code // 100}xx").inc()
            copy_result = "sent" if result.accepted else ("deferred" if result.transient else "failed")
            metrics.COPIES.labels(copy_result).inc()
        await asyncio.gather(*(self.publisher.publish_or_buffer(event) for event in outcome.events))
        metrics.MESSAGES.labels(outcome.result).inc()
        return outcome.reply

    async def finish(self, grace: float) -> None:
        """Stop taking messages and let the relays in flight end, within ``grace`` seconds.

        The first half lets them run as usual; then temporary refusals are no longer
        retried (those copies end as ``failed``); what still runs at the end is cut
        short, keeping the events of the copies the upstream already answered for.
        Every event is with the publisher when this returns.
        """
        self.closing = True
        pending = set(self._relays)
        if pending:
            log.info("waiting up to %.0f s for %d relays in flight", grace, len(pending))
            _, pending = await asyncio.wait(pending, timeout=grace / 2)
        if pending:
            self.upstream.stop_retrying()
            _, pending = await asyncio.wait(pending, timeout=grace / 2)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._rewriter.shutdown(wait=False)  # a rewrite cut short above may still finish its turn

    async def _tracked_copies(
        self,
        raw: bytes,
        message: Part,
        tracking: TrackingSwitches,
        recipients: Sequence[str],
        tracking_ids: Sequence[str | None],
        added: bytes,
        list_name: str | None = None,
    ) -> list[OutgoingCopy]:
        switches = switches_from_header(message.parsed.get(TRACK_HEADER))
        switches &= TrackSwitches(tracking.opens, tracking.clicks)
        options, optouts = self.options.copies, self.optouts

        def prepare() -> MessageCopies:
            return MessageCopies(
                raw, message, options, tracking, switches, optouts, added_headers=added, list_name=list_name
            )

        if len(raw) < OFFLOAD_BYTES:
            builder = prepare()
            render: Callable[[str, str], Sequence[Buffer] | asyncio.Future[Sequence[Buffer]]]
            render = builder.content
        else:
            loop = asyncio.get_running_loop()
            builder = await loop.run_in_executor(self._rewriter, prepare)
            render = lambda rcpt, tid: loop.run_in_executor(self._rewriter, builder.content, rcpt, tid)  # noqa: E731
        self._count_untracked(builder, switches, recipients)
        return [
            OutgoingCopy(rcpt, lambda rcpt=rcpt, tid=tid: render(rcpt, tid))  # type: ignore[misc]
            for rcpt, tid in zip(recipients, tracking_ids, strict=True)
        ]

    def _count_untracked(
        self, builder: MessageCopies, switches: TrackSwitches, recipients: Sequence[str]
    ) -> None:
        if builder.left_untracked_signed:
            metrics.UNTRACKED.labels("signed").inc()
        elif builder.left_untracked_for_dkim:
            metrics.UNTRACKED.labels("dkim_signed").inc()
        elif not (switches.opens or switches.clicks):
            metrics.UNTRACKED.labels("tracking_off").inc()
        opted_out = sum(1 for rcpt in recipients if rcpt.lower() in self.optouts)
        if opted_out:
            metrics.UNTRACKED.labels("recipient_opt_out").inc(opted_out)
