"""ESP correlation (docs/architecture.md "Tracking URLs and signing"): hand each copy's tracking id to the provider.

Every provider gets the id under the key ``tracking_id`` in its own metadata mechanism,
so its webhooks name the copy, and has its own open/click tracking switched off for the
copy, so links are never wrapped twice. Headers the app already set for the provider
(its own unique args or variables) are merged, never dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from smtp_proxy.rewrite import mime

log = logging.getLogger(__name__)

_MAX_HEADER_LINE = 900  # below the 998-octet limit, with room for folding


# Per provider: read the app's own headers once per message, and give back what makes
# each copy's fields from its tracking id.
CopyFields = Callable[[str], list[tuple[str, str]]]
_Existing = Mapping[str, str]


def _first_values(headers: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    for field in mime.header_lines(headers):
        found.setdefault(mime.field_name(field), mime.field_value(field))
    return found


def _json_object(value: str | None, name: str) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError:
        log.warning("replacing unparsable %s header from the app", name)
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _fold(value: str, eol: str) -> str:
    """Fold a long JSON value at its item separators, as SendGrid asks for X-SMTPAPI."""
    if len(value) <= _MAX_HEADER_LINE:
        return value
    out, line = [], ""
    for token in value.split(", "):
        if line and len(line) + len(token) > _MAX_HEADER_LINE:
            out.append(line + ",")
            line = token
        else:
            line = f"{line}, {token}" if line else token
    out.append(line)
    return (eol + " ").join(out)


def _sendgrid(existing: _Existing, options: dict[str, str]) -> CopyFields:
    smtpapi = _json_object(existing.get("x-smtpapi"), "X-SMTPAPI")
    unique_args = _as_dict(smtpapi.get("unique_args"))
    filters = _as_dict(smtpapi.get("filters"))
    for name in ("clicktrack", "opentrack"):
        filters[name] = {"settings": {"enable": 0}}
    eol = options["eol"]

    def fields(tracking_id: str) -> list[tuple[str, str]]:
        value = {**smtpapi, "unique_args": {**unique_args, "tracking_id": tracking_id}, "filters": filters}
        return [("X-SMTPAPI", _fold(json.dumps(value, separators=(", ", ": ")), eol))]

    return fields


def _mailgun(existing: _Existing, options: dict[str, str]) -> CopyFields:
    variables = _json_object(existing.get("x-mailgun-variables"), "X-Mailgun-Variables")

    def fields(tracking_id: str) -> list[tuple[str, str]]:
        return [
            ("X-Mailgun-Variables", json.dumps({**variables, "tracking_id": tracking_id})),
            ("X-Mailgun-Track", "no"),
            ("X-Mailgun-Track-Clicks", "no"),
            ("X-Mailgun-Track-Opens", "no"),
        ]

    return fields


def _ses(existing: _Existing, options: dict[str, str]) -> CopyFields:
    tags = [
        tag.strip()
        for tag in existing.get("x-ses-message-tags", "").split(",")
        if tag.strip() and tag.split("=", 1)[0].strip() != "tracking_id"
    ]
    # SES switches engagement tracking per configuration set: name one without it.
    configuration_set = existing.get("x-ses-configuration-set") or options.get("ses_configuration_set")

    def fields(tracking_id: str) -> list[tuple[str, str]]:
        added = [("X-SES-MESSAGE-TAGS", ", ".join([*tags, f"tracking_id={tracking_id}"]))]
        if configuration_set:
            added.append(("X-SES-CONFIGURATION-SET", configuration_set))
        return added

    return fields


def _postmark(existing: _Existing, options: dict[str, str]) -> CopyFields:
    def fields(tracking_id: str) -> list[tuple[str, str]]:
        return [
            ("X-PM-Metadata-tracking_id", tracking_id),
            ("X-PM-TrackOpens", "false"),
            ("X-PM-TrackLinks", "None"),
        ]

    return fields


_PROVIDERS: dict[str, Callable[[_Existing, dict[str, str]], CopyFields]] = {
    "sendgrid": _sendgrid,
    "mailgun": _mailgun,
    "ses": _ses,
    "postmark": _postmark,
}


class Correlation:
    """The provider's correlation fields for every copy of one message.

    The app's header block is read once: :attr:`replaces` names the fields the caller
    removes from it once, and :meth:`fields` gives each copy its own, so no copy scans
    the message's headers again. ``protected`` names headers a DKIM signature covers;
    those are left as the app wrote them.
    """

    def __init__(
        self,
        headers: bytes,
        provider: str,
        eol: bytes,
        *,
        protected: frozenset[str] = frozenset(),
        ses_configuration_set: str | None = None,
    ) -> None:
        self._eol = eol
        self._make: CopyFields | None = None
        self.replaces: frozenset[str] = frozenset()
        make = _PROVIDERS.get(provider)
        if make is None:
            return  # generic: the X-Mailbeacon-Tracking-ID header is all there is
        options = {"eol": eol.decode()}
        if ses_configuration_set:
            options["ses_configuration_set"] = ses_configuration_set
        self._make = make(_first_values(headers), options)
        names = {name.lower() for name, _ in self._make("")}
        for name in sorted(names & protected):
            log.warning("%s is covered by the DKIM signature; left as the app wrote it", name)
        self.replaces = frozenset(names - protected)

    def fields(self, tracking_id: str) -> bytes:
        """This copy's correlation header fields, each with its line break."""
        if self._make is None:
            return b""
        return b"".join(
            f"{name}: {value}".encode() + self._eol
            for name, value in self._make(tracking_id)
            if name.lower() in self.replaces
        )
