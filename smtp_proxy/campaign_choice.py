"""Which campaign a message is tracked under (docs/architecture.md "Campaigns"), as a pure decision.

An ``X-Campaign`` header is the app's word, but only for campaigns that exist: in the
embedded default (``AUTO_CREATE_CAMPAIGNS``) an unknown name creates the campaign; anywhere
else it is treated as if the header were absent, so an app can neither invent campaigns
nor put numbers into one by guessing its name. Then the campaigns' match rules decide,
then the proxy's default campaign; mail that matches nothing is relayed untracked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mailbeacon.contract.campaigns import (
    CAMPAIGN_HEADER,
    CampaignKey,
    CampaignSpec,
    InvalidCampaign,
    match_campaign,
)


@dataclass(frozen=True)
class CampaignChoice:
    key: CampaignKey | None
    spec: CampaignSpec
    create: bool = False  # record the new campaign in the KV bucket (embedded default only)
    untracked_why: str | None = None  # set when key is None: the metric label
    ignored_header: str | None = None  # an X-Campaign value that named no usable campaign
    ignored_because: str = "names no known campaign"


def choose_campaign(
    specs: Mapping[CampaignKey, CampaignSpec],
    headers: Sequence[tuple[str, str]],
    sender: str,
    default: CampaignKey | None,
    auto_create: bool,
) -> CampaignChoice:
    ignored: str | None = None
    because = "names no known campaign"
    try:
        key = match_campaign(specs, headers, sender, default)
    except InvalidCampaign as exc:
        key, ignored, because = None, _header(headers), f"is no usable campaign name ({exc})"
    if key is not None:
        spec = specs.get(key)
        if spec is not None:
            return CampaignChoice(key, spec)
        if key == default:
            return CampaignChoice(key, CampaignSpec())  # the proxy's own default needs no resource
        if auto_create:
            return CampaignChoice(key, CampaignSpec(), create=True)
        ignored = _header(headers)
    if ignored is None:
        return CampaignChoice(None, CampaignSpec(), untracked_why="no_campaign")
    # The header named no campaign we know: decide as if it were not there.
    others = [(name, value) for name, value in headers if name.lower() != CAMPAIGN_HEADER.lower()]
    key = match_campaign(specs, others, sender, default)
    if key is None:
        return CampaignChoice(
            None,
            CampaignSpec(),
            untracked_why="unknown_campaign",
            ignored_header=ignored,
            ignored_because=because,
        )
    return CampaignChoice(
        key, specs.get(key) or CampaignSpec(), ignored_header=ignored, ignored_because=because
    )


def _header(headers: Sequence[tuple[str, str]]) -> str:
    return next((value for name, value in headers if name.lower() == CAMPAIGN_HEADER.lower()), "")
