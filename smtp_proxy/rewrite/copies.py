"""Each recipient's copy of one message, exactly as it is relayed.

One :class:`MessageCopies` per message: the message is prepared once (split, links
found, the provider's fields read, the headers every copy shares settled), then
:meth:`MessageCopies.content` gives each recipient's copy as a few header pieces plus
slices of the received bytes. Whatever goes wrong while tracking a copy, the mail still
goes out: unchanged, counted and logged once per message.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from dataclasses import dataclass

from mailbeacon.contract.campaigns import TrackingSwitches
from smtp_proxy import metrics
from smtp_proxy.rewrite.dkim_sign import DkimSigner
from smtp_proxy.rewrite.esp import Correlation
from smtp_proxy.rewrite.mime import Buffer, Part, remove_headers
from smtp_proxy.rewrite.optout import TrackSwitches
from smtp_proxy.rewrite.rewrite import (
    CONTROL_HEADERS,
    CONTROL_PREFIXES,
    CopyTracking,
    PreparedMessage,
    dkim_signed_headers,
)

log = logging.getLogger(__name__)

_NOTHING = TrackSwitches(False, False)


@dataclass(frozen=True)
class CopyOptions:
    """The proxy's settings that shape every copy."""

    site_url: str
    keys: Sequence[bytes]
    provider: str = "generic"
    ses_configuration_set: str | None = None
    honeypot: bool = True
    dkim_signer: DkimSigner | None = None


class MessageCopies:
    """Builds each recipient's copy of one message of a campaign from a single preparation."""

    def __init__(
        self,
        raw: Buffer,
        message: Part,
        options: CopyOptions,
        campaign: TrackingSwitches,
        switches: TrackSwitches,
        optouts: Container[str] = (),
        added_headers: bytes = b"",
        list_name: str | None = None,
    ) -> None:
        self.raw, self.options, self.switches, self.optouts = raw, options, switches, optouts
        self.added_headers = added_headers  # Message-ID/Date the app left out (submission.py)
        self.dkim_signed = self.resign = False
        self.prepared: PreparedMessage | None = None
        # Why the message, or a copy, went out unchanged (kept for tests and debugging).
        self.prepare_error: Exception | None = None
        self.render_error: Exception | None = None
        try:
            self.dkim_signed = message.parsed.get("DKIM-Signature") is not None
            self.resign = self.dkim_signed and options.dkim_signer is not None
            # Rewriting breaks the app's signature: without our own key the body stays as
            # it is, and so does every header the signature covers.
            protected = dkim_signed_headers(message) if self.dkim_signed and not self.resign else frozenset()
            self.correlation = Correlation(
                message.headers,
                options.provider,
                message.eol,
                protected=protected,
                ses_configuration_set=options.ses_configuration_set,
            )
            self.prepared = PreparedMessage(
                message,
                options.site_url,
                skip_links=campaign.skip_links,
                protected=protected,
                drop=self.correlation.replaces | ({"dkim-signature"} if self.resign else set()),
                unsubscribe_header=campaign.unsubscribe_header,
                list_name=list_name,
            )
        except Exception as exc:
            self.prepare_error = exc
            metrics.REWRITE_FAILURES.inc()
            log.warning("relaying message unchanged, cannot parse it: %s: %s", type(exc).__name__, exc)

    @property
    def left_untracked_for_dkim(self) -> bool:
        return self.prepared is not None and self.dkim_signed and not self.resign

    @property
    def left_untracked_signed(self) -> bool:
        """S/MIME or PGP/MIME signed or encrypted: the body goes out as it came."""
        return self.prepared is not None and self.prepared.signed

    def _fallback(self, exc: Exception) -> Sequence[Buffer]:
        if self.render_error is None:  # one count and one log line per message, however many copies
            self.render_error = exc
            metrics.REWRITE_FAILURES.inc()
            log.warning("relaying message unchanged, rewrite failed: %s: %s", type(exc).__name__, exc)
        return self._as_received()

    def _as_received(self) -> Sequence[Buffer]:
        """Unchanged, but for the Message-ID/Date every copy of the message carries alike."""
        return [self.added_headers, self.raw] if self.added_headers else [self.raw]

    def content(self, recipient: str, tracking_id: str) -> Sequence[Buffer]:
        """The copy for one recipient, as pieces to be sent in order."""
        prepared = self.prepared
        if prepared is None:
            return self._as_received()
        options = self.options
        try:
            fields = self.correlation.fields(tracking_id)
            if self.left_untracked_for_dkim:
                headers, body = prepared.untouched(tracking_id, fields)
            else:
                switches = _NOTHING if recipient.lower() in self.optouts else self.switches
                tracking = CopyTracking(
                    site_url=options.site_url,
                    keys=options.keys,
                    tracking_id=tracking_id,
                    track_opens=switches.opens,
                    track_clicks=switches.clicks,
                    honeypot=options.honeypot,
                )
                headers, body = prepared.render(tracking, fields)
            if self.added_headers:
                headers.insert(0, self.added_headers)
            if self.resign and options.dkim_signer is not None:
                message = b"".join([*headers, prepared.separator, *map(bytes, body)])
                return [options.dkim_signer.sign(message), message]
            return [*headers, prepared.separator, *body]
        except Exception as exc:  # deliver the mail even when we cannot track it
            return self._fallback(exc)


def untracked_content(raw: Buffer, message: Part, added_headers: bytes = b"") -> Sequence[Buffer]:
    """Mail of no campaign: as received, less the proxy's own control headers, plus the
    Message-ID/Date it lacked."""
    if not message.separator:
        return [raw]
    headers = remove_headers(message.headers, set(CONTROL_HEADERS), CONTROL_PREFIXES)
    if len(headers) == len(message.headers):
        return [added_headers, raw] if added_headers else [raw]
    return [added_headers, headers, message.separator, message.body]
