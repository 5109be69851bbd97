"""Every insight figure end to end, on SQLite and PostgreSQL: mail through the proxy to Gmail,
Outlook, Yahoo, iCloud and a company's domain; opens with real mail clients' user agents and
the providers' proxies; clicks; deliveries, a bounce and a complaint by webhook; a provider's
open and click dated days back. Each figure is derived here from what the test did, and
checked in the API, the Prometheus gauge, and again after ``refresh``."""

from __future__ import annotations

import asyncio
import email
import re
import smtplib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from mailbeacon.app.runner import Addresses, AllInOne
from tests.support import SmtpSink, eventually, make_settings, metric_value

CAMPAIGN = "default/insights"
LINKS = ["https://shop.example.com/sale", "https://shop.example.com/blog"]
IPHONE_MAIL = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"
OUTLOOK_DESKTOP = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)"
ANDROID_WEBMAIL = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.6478.71 Mobile Safari/537.36"
)
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
APPLE_PRIVACY_PROXY = "Mozilla/5.0"
RECIPIENTS = {
    "ann": "ann@gmail.com",
    "bob": "bob@outlook.com",
    "cat": "cat@yahoo.com",
    "dan": "dan@icloud.com",
    "eve": "eve@corp.example",
    "fay": "fay@corp.example",
    "gus": "gus@hotmail.co.uk",
}
ZONES = ("UTC", "Asia/Tokyo", "America/New_York")


def message() -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "Shop <news@shop.example.com>"
    mail["To"] = "customers@shop.example.com"
    mail["Subject"] = "Winter sale"
    mail["X-Campaign"] = "insights"
    mail.set_content("Winter sale")
    mail.add_alternative(
        f'<html><body><a href="{LINKS[0]}">Shop</a> <a href="{LINKS[1]}">Blog</a></body></html>',
        subtype="html",
    )
    return mail


class Copy:
    """One recipient's relayed copy: its tracking id, pixel, links and the hidden honeypot link."""

    def __init__(self, content: bytes) -> None:
        relayed = email.message_from_bytes(content, policy=default_policy)
        self.tracking_id = str(relayed["X-Mailbeacon-Tracking-ID"])
        text = relayed.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
        self.pixel = re.findall(r'<img src="([^"]+/track/pixel/[^"]+)"', text)[0]
        clicks = [u.replace("&amp;", "&") for u in re.findall(r'href="([^"]+/track/click/[^"]+)"', text)]
        self.honeypot = next(u for u in clicks if "mailbeacon%3Ahoneypot" in u)
        self.links = [u for u in clicks if u != self.honeypot]


@pytest.fixture
async def system(
    tmp_path: Path, nats_url: str, sink: SmtpSink, database_url: str
) -> AsyncIterator[Addresses]:
    settings = make_settings(tmp_path, nats_url=nats_url, upstream_smtp=sink.url, database_url=database_url)
    running = AllInOne(settings)
    addresses = await running.start()
    try:
        yield addresses
    finally:
        await running.stop()


def rate(n: int, d: int) -> float:
    return round(100.0 * n / d, 2) if d else 0.0


def domain(
    name: str, kind: str, sent: int, delivered: int, bounced: int, complained: int, opened: int, people: int
) -> dict[str, Any]:
    return {
        "domain": name,
        "kind": kind,
        "sent": sent,
        "delivered": delivered,
        "bounced": bounced,
        "complained": complained,
        "unique_opens": opened,
        "human_unique_opens": people,
        "delivery_rate": rate(delivered, sent),
        "bounce_rate": rate(bounced, sent),
        "open_rate": rate(opened, delivered),
        "human_open_rate": rate(people, delivered),
    }


async def test_every_insight_figure(system: Addresses, sink: SmtpSink) -> None:
    # Today's opens take a few seconds: start them at least a minute before the hour ends,
    # so they all land in one hour of the heatmap.
    now = datetime.now(UTC)
    if now.minute == 59:
        await asyncio.sleep(61 - now.second)
    port = int(system.smtp.rsplit(":", 1)[1])
    addresses = list(RECIPIENTS.values())
    await asyncio.to_thread(_send, port, message(), addresses)
    copies = {name: Copy(m.content) for name, m in zip(RECIPIENTS, sink.messages, strict=True)}
    assert [m.recipients for m in sink.messages] == [[a] for a in addresses]
    tracker, aggregator = system.tracker, system.aggregator
    today_opens: list[tuple[str, str]] = [  # (copy, user agent), in the order they happen
        ("ann", GMAIL_PROXY),  # Gmail's image proxy: automated (image_proxy)
        ("bob", OUTLOOK_DESKTOP),
        ("bob", OUTLOOK_DESKTOP),
        ("cat", ANDROID_WEBMAIL),
        ("dan", APPLE_PRIVACY_PROXY),  # Mail Privacy Protection's preload: automated
        ("dan", IPHONE_MAIL),
        ("eve", IPHONE_MAIL),
        ("eve", OUTLOOK_DESKTOP),  # eve's first open was on the iPhone: her client is Apple Mail
    ]
    async with aiohttp.ClientSession() as http:
        for name, agent in today_opens:
            async with http.get(copies[name].pixel, headers={"User-Agent": agent}) as response:
                assert response.status == 200
        opened_at = datetime.now(UTC)
        assert opened_at.hour == now.hour or opened_at - now > timedelta(seconds=60), "opens took a minute"
        async with http.get(
            copies["cat"].links[1], headers={"User-Agent": ANDROID_WEBMAIL}, allow_redirects=False
        ) as response:
            assert response.status == 302 and response.headers["Location"] == LINKS[1]
        async with http.get(copies["bob"].honeypot, headers={"User-Agent": OUTLOOK_DESKTOP}) as response:
            assert response.status == 200  # the hidden link: answered, counted as a machine's click
        for name in ("ann", "bob", "cat", "dan", "eve", "gus"):
            await _post(http, f"{tracker}/track/delivery/", {"tracking_id": copies[name].tracking_id})
        await _post(http, f"{tracker}/track/bounce/", {"email": RECIPIENTS["fay"], "bounce_type": "hard"})
        await _post(http, f"{tracker}/track/complaint/", {"tracking_id": copies["cat"].tracking_id})
        # A provider reports an open three days back and a click two days back (Postmark's records).
        three_days = (opened_at - timedelta(days=3)).replace(hour=10, minute=0, second=0, microsecond=0)
        two_days = (opened_at - timedelta(days=2)).replace(hour=15, minute=30, second=0, microsecond=0)
        await _post(
            http,
            f"{tracker}/webhooks/postmark",
            {
                "RecordType": "Open",
                "Recipient": RECIPIENTS["gus"],
                "ReceivedAt": three_days.isoformat(),
                "UserAgent": OUTLOOK_DESKTOP,
                "Metadata": {"tracking_id": copies["gus"].tracking_id},
            },
        )
        await _post(
            http,
            f"{tracker}/webhooks/postmark",
            {
                "RecordType": "Click",
                "Recipient": RECIPIENTS["ann"],
                "ReceivedAt": two_days.isoformat(),
                "UserAgent": ANDROID_WEBMAIL,
                "OriginalLink": LINKS[0],
                "Metadata": {"tracking_id": copies["ann"].tracking_id},
            },
        )

        async def statistics(**params: str) -> dict[str, Any]:
            url = f"{aggregator}/api/campaigns/{CAMPAIGN}/statistics"
            async with http.get(url, params=params) as response:
                assert response.status == 200, await response.text()
                return dict(await response.json())

        async def settled() -> dict[str, Any]:
            stats = await statistics()
            assert (stats["total_opens"], stats["total_clicks"], stats["delivered_count"]) == (9, 3, 6)
            assert (stats["bounced_count"], stats["complained_count"]) == (1, 1)
            return stats

        await eventually(settled, within=30)
        expected = _expected(opened_at, three_days, two_days)
        for tz in ZONES:
            want = {**expected, "engagement_heatmap": _heatmap(tz, opened_at, three_days), "timezone": tz}
            stats = await statistics(tz=tz)
            assert {k: stats[k] for k in want} == want
        bad = await http.get(
            f"{aggregator}/api/campaigns/{CAMPAIGN}/statistics", params={"tz": "Mars/Olympus"}
        )
        assert bad.status == 400 and "IANA time zone" in (await bad.json())["error"]

        async def gauges() -> bool:
            async with http.get(f"{aggregator}/metrics") as response:
                text = await response.text()
            for row in expected["domains"][:5]:
                for state in ("sent", "delivered", "bounced", "complained", "unique_opens"):
                    value = metric_value(
                        text,
                        "mailbeacon_campaign_domain_messages",
                        campaign=CAMPAIGN,
                        domain=row["domain"],
                        state=state,
                    )
                    assert value == row[state], (row["domain"], state, value)
            assert "corp.example" not in text  # the label names providers only
            return True

        await eventually(gauges, within=30, interval=0.5)
        async with http.post(f"{aggregator}/api/campaigns/{CAMPAIGN}/refresh") as response:
            refreshed = await response.json()
        want = {**expected, "engagement_heatmap": _heatmap("UTC", opened_at, three_days)}
        assert {k: refreshed[k] for k in want} == want


def _expected(opened_at: datetime, three_days: datetime, two_days: datetime) -> dict[str, Any]:
    """The figures, from what the test did above."""
    days = [(opened_at - timedelta(days=n)).strftime("%Y-%m-%d") for n in (3, 2, 1, 0)]
    assert three_days.strftime("%Y-%m-%d") == days[0] and two_days.strftime("%Y-%m-%d") == days[1]
    people = 5  # bob, cat, dan, eve, and gus (the provider's open)
    return {
        "human_unique_opens": people,
        "unique_opens": 6,  # and ann, through Gmail's proxy
        "clients": [
            # bob and gus opened first in Outlook; eve later too (her fourth open counts in total)
            {"client": "Outlook", "unique_opens": 2, "total_opens": 4, "share": rate(2, people)},
            {"client": "Apple Mail", "unique_opens": 2, "total_opens": 2, "share": rate(2, people)},
            {
                "client": "Webmail (Chrome Mobile)",
                "unique_opens": 1,
                "total_opens": 1,
                "share": rate(1, people),
            },
        ],
        "devices": {"desktop": 2, "mobile": 2, "tablet": 0, "webmail": 1, "unknown": 0},
        "machines": {
            "apple_privacy_proxy": {"opens": 1, "clicks": 0},
            "honeypot": {"opens": 0, "clicks": 1},
            "image_proxy": {"opens": 1, "clicks": 0},
        },
        "domains": [
            domain("gmail", "provider", 1, 1, 0, 0, 1, 0),
            domain("outlook", "provider", 2, 2, 0, 0, 2, 2),
            domain("yahoo", "provider", 1, 1, 0, 1, 1, 1),
            domain("apple", "provider", 1, 1, 0, 0, 1, 1),
            domain("other", "provider", 2, 1, 1, 0, 1, 1),
            domain("corp.example", "domain", 2, 1, 1, 0, 1, 1),
        ],
        "opens_over_time": [
            {"date": days[0], "opens": 1, "human_opens": 1},
            {"date": days[1], "opens": 0, "human_opens": 0},
            {"date": days[2], "opens": 0, "human_opens": 0},
            {"date": days[3], "opens": 8, "human_opens": 6},
        ],
        "clicks_over_time": [
            {"date": days[0], "clicks": 0, "human_clicks": 0},
            {"date": days[1], "clicks": 1, "human_clicks": 1},
            {"date": days[2], "clicks": 0, "human_clicks": 0},
            {"date": days[3], "clicks": 2, "human_clicks": 1},
        ],
        "delivery_rate": rate(6, 7),
        "human_open_rate": rate(people, 6),
    }


def _heatmap(tz: str, opened_at: datetime, three_days: datetime) -> list[list[int]]:
    """People's opens: six today (all in one hour), gus's three days back."""
    grid = [[0] * 24 for _ in range(7)]
    for moment, n in ((opened_at, 6), (three_days, 1)):
        local = moment.astimezone(ZoneInfo(tz))
        grid[local.weekday()][local.hour] += n
    return grid


def _send(port: int, mail: EmailMessage, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(mail, to_addrs=recipients)


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with http.post(url, json=body) as response:
        assert response.status == 200, await response.text()
