"""ESP correlation (DESIGN.md "ESP correlation"): hand each copy's tracking id to the provider.

Every provider gets the id under the key ``tracking_id`` in its own metadata mechanism,
so its webhooks name the copy, and has its own open/click tracking switched off for the
copy, so links are never wrapped twice. Headers the app already set for the provider
(its own unique args or variables) are merged, never dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from smtp_proxy import mime

log = logging.getLogger(__name__)

_MAX_HEADER_LINE = 900  # below the 998-octet limit, with room for folding


def _existing(headers: bytes, name: str) -> str | None:
    for field in mime.header_lines(headers):
        if mime.field_name(field) == name.lower():
            return mime.field_value(field)
    return None


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


def _sendgrid(headers: bytes, tracking_id: str, options: dict[str, str]) -> list[tuple[str, str]]:
    smtpapi = _json_object(_existing(headers, "X-SMTPAPI"), "X-SMTPAPI")
    unique_args = _as_dict(smtpapi.get("unique_args"))
    smtpapi["unique_args"] = {**unique_args, "tracking_id": tracking_id}
    filters = _as_dict(smtpapi.get("filters"))
    for name in ("clicktrack", "opentrack"):
        filters[name] = {"settings": {"enable": 0}}
    smtpapi["filters"] = filters
    return [("X-SMTPAPI", _fold(json.dumps(smtpapi, separators=(", ", ": ")), options["eol"]))]


def _mailgun(headers: bytes, tracking_id: str, options: dict[str, str]) -> list[tuple[str, str]]:
    variables = _json_object(_existing(headers, "X-Mailgun-Variables"), "X-Mailgun-Variables")
    variables["tracking_id"] = tracking_id
    return [
        ("X-Mailgun-Variables", json.dumps(variables)),
        ("X-Mailgun-Track", "no"),
        ("X-Mailgun-Track-Clicks", "no"),
        ("X-Mailgun-Track-Opens", "no"),
    ]


def _ses(headers: bytes, tracking_id: str, options: dict[str, str]) -> list[tuple[str, str]]:
    tags = [
        tag.strip()
        for tag in (_existing(headers, "X-SES-MESSAGE-TAGS") or "").split(",")
        if tag.strip() and tag.split("=", 1)[0].strip() != "tracking_id"
    ]
    added = [("X-SES-MESSAGE-TAGS", ", ".join([*tags, f"tracking_id={tracking_id}"]))]
    # SES switches engagement tracking per configuration set: name one without it.
    configuration_set = _existing(headers, "X-SES-CONFIGURATION-SET") or options.get("ses_configuration_set")
    if configuration_set:
        added.append(("X-SES-CONFIGURATION-SET", configuration_set))
    return added


def _postmark(headers: bytes, tracking_id: str, options: dict[str, str]) -> list[tuple[str, str]]:
    return [
        ("X-PM-Metadata-tracking_id", tracking_id),
        ("X-PM-TrackOpens", "false"),
        ("X-PM-TrackLinks", "None"),
    ]


_PROVIDERS: dict[str, Callable[[bytes, str, dict[str, str]], list[tuple[str, str]]]] = {
    "sendgrid": _sendgrid,
    "mailgun": _mailgun,
    "ses": _ses,
    "postmark": _postmark,
}


def add_correlation(
    headers: bytes,
    provider: str,
    tracking_id: str,
    eol: bytes,
    *,
    protected: frozenset[str] = frozenset(),
    ses_configuration_set: str | None = None,
) -> bytes:
    """The header block with the provider's correlation headers set for this copy.

    ``protected`` names headers a DKIM signature covers; those are left as they are.
    """
    make = _PROVIDERS.get(provider)
    if make is None:
        return headers  # generic: the X-Mailbeacon-Tracking-ID header is all there is
    options = {"eol": eol.decode()}
    if ses_configuration_set:
        options["ses_configuration_set"] = ses_configuration_set
    for name, value in make(headers, tracking_id, options):
        if name.lower() in protected:
            log.warning("%s is covered by the DKIM signature; left as the app wrote it", name)
            continue
        headers = mime.remove_headers(headers, {name.lower()}) + f"{name}: {value}".encode() + eol
    return headers
