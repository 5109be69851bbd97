"""Which campaign a message is tracked under: an X-Campaign header counts only for campaigns that exist.

Outside `mailbeacon up` nobody creates campaigns but the operator (or `campaign apply`):
an app naming an unknown campaign must not get numbers recorded under that name, in its
own namespace or anyone else's.
"""

from __future__ import annotations

import asyncio
import email
import smtplib
from email.policy import default as default_policy
from pathlib import Path

from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec, MatchRules
from smtp_proxy.campaign_choice import CampaignChoice, choose_campaign
from tests.proxy.test_proxy_relay import metrics
from tests.proxy.test_proxy_smtp import html_message, proxy_running, read_events
from tests.support import SmtpSink, metric_value

NEWSLETTER = CampaignKey("marketing", "newsletter")
DEFAULT = CampaignKey("default", "everything")
SPECS = {
    NEWSLETTER: CampaignSpec(),
    CampaignKey("billing", "invoices"): CampaignSpec(match=MatchRules(senders=["billing@shop.example.com"])),
}


def choose(
    header: str | None,
    *,
    default: CampaignKey | None = None,
    auto_create: bool = False,
    sender: str = "news@shop.example.com",
) -> CampaignChoice:
    headers = [("From", sender)] + ([("X-Campaign", header)] if header is not None else [])
    return choose_campaign(SPECS, headers, sender, default, auto_create)


def test_a_known_campaign_named_in_the_header_is_used() -> None:
    choice = choose("marketing/newsletter", default=DEFAULT)
    assert (choice.key, choice.create, choice.ignored_header) == (NEWSLETTER, False, None)


def test_an_unknown_campaign_falls_back_to_the_default_or_to_no_tracking() -> None:
    fallback = choose("marketing/spring-sale", default=DEFAULT)
    assert (fallback.key, fallback.create, fallback.ignored_header) == (
        DEFAULT,
        False,
        "marketing/spring-sale",
    )
    untracked = choose("someone-else/their-campaign")
    assert (untracked.key, untracked.untracked_why) == (None, "unknown_campaign")
    # The header is ignored, not the message: the campaigns' own rules still apply.
    by_sender = choose("nonsense", sender="billing@shop.example.com")
    assert by_sender.key == CampaignKey("billing", "invoices")
    unusable = choose("!!!", default=DEFAULT)  # no usable name at all
    assert (unusable.key, unusable.ignored_header) == (DEFAULT, "!!!")
    assert unusable.ignored_because.startswith("is no usable campaign name")  # what the log says
    assert fallback.ignored_because == "names no known campaign"


def test_only_the_embedded_default_creates_campaigns() -> None:
    created = choose("Spring Sale", auto_create=True)
    assert (created.key, created.create) == (CampaignKey("default", "spring-sale"), True)
    assert choose("default/everything", default=DEFAULT).key == DEFAULT  # the proxy's own default
    assert choose(None).untracked_why == "no_campaign"


async def test_unknown_campaign_mail_is_relayed_untracked(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    before = metrics()
    async with proxy_running(tmp_path, nats_url, sink, campaigns=["marketing/newsletter"]) as proxy:

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                smtp.send_message(html_message(["ann@example.com"], campaign="marketing/spring-sale"))
                smtp.send_message(html_message(["ben@example.com"], campaign="marketing/newsletter"))

        await asyncio.to_thread(conversation)
        assert CampaignKey("marketing", "spring-sale") not in proxy.store.specs  # nothing was created
    copies = {
        m.recipients[0]: email.message_from_bytes(m.content, policy=default_policy) for m in sink.messages
    }
    untracked = copies["ann@example.com"]
    assert untracked["X-Campaign"] is None and untracked["X-Mailbeacon-Tracking-ID"] is None
    assert "/track/" not in str(untracked.get_body(("html",)).get_content())  # type: ignore[union-attr]
    sent = await read_events(nats_url, "sent")
    assert [(e.recipient, e.campaign) for e in sent] == [("ben@example.com", "marketing/newsletter")]
    assert (
        metric_value(metrics(), "mailbeacon_proxy_untracked_messages_total", why="unknown_campaign")
        - (metric_value(before, "mailbeacon_proxy_untracked_messages_total", why="unknown_campaign"))
        == 1
    )


async def test_unknown_campaign_mail_goes_to_the_default_campaign(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    async with proxy_running(tmp_path, nats_url, sink, default_campaign="default/everything") as proxy:
        message = html_message(["ann@example.com"], campaign="other-team/their-campaign")

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                smtp.send_message(message)

        await asyncio.to_thread(conversation)
    sent = await read_events(nats_url, "sent")
    assert [(e.recipient, e.campaign) for e in sent] == [("ann@example.com", "default/everything")]
    assert b"/track/click/" in sink.messages[0].content
