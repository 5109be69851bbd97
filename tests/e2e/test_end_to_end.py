"""The whole slice over real sockets: smtplib → proxy → sink, tracker over HTTP, NATS, SQL, API."""

from __future__ import annotations

import asyncio
import email
import re
import smtplib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from mailbeacon.app.runner import Addresses, AllInOne
from mailbeacon.bus.jetstream import CONSUMER, STREAM, connect
from mailbeacon.contract.events import Event, EventType, new_event_id
from tests.support import SmtpSink, eventually, make_settings, metric_value

CAMPAIGN = "default/spring-sale"
LINKS = ["https://shop.example.com/spring?utm_source=mail&id=1", "https://blog.example.com/post"]
# Recipients open mail in a browser or mail client; a library's own user agent counts as a machine.
BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"}


def html_message(recipients: list[str]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Shop <news@shop.example.com>"
    message["To"] = ", ".join(recipients)
    message["Subject"] = "Spring sale"
    message["X-Campaign"] = "Spring Sale"
    message.set_content("Spring sale! " + " ".join(LINKS))
    message.add_alternative(
        f"""<html><body><p>Spring sale!</p>
<a href="{LINKS[0].replace("&", "&amp;")}">Shop now</a>
<a href='{LINKS[1]}'>Read the blog</a>
<a href="mailto:help@shop.example.com">Help</a>
</body></html>""",
        subtype="html",
    )
    return message


def text_message(recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "news@shop.example.com"
    message["To"] = recipient
    message["Subject"] = "Plain news"
    message["X-Campaign"] = "spring-sale"
    message.set_content("Hello,\nour news: https://blog.example.com/post\nBye")
    return message


def send(port: int, message: EmailMessage, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(message, to_addrs=recipients)


class Running:
    def __init__(self, system: AllInOne, addresses: Addresses, http: aiohttp.ClientSession) -> None:
        self.system, self.addresses, self.http = system, addresses, http

    @property
    def smtp_port(self) -> int:
        return int(self.addresses.smtp.rsplit(":", 1)[1])

    async def statistics(self, refresh: bool = False) -> dict[str, Any]:
        url = f"{self.addresses.aggregator}/api/campaigns/{CAMPAIGN}/statistics"
        async with self.http.get(url, params={"refresh": "true"} if refresh else {}) as response:
            assert response.status == 200, await response.text()
            return dict(await response.json())


@pytest.fixture
async def running(tmp_path: Path, nats_url: str, sink: SmtpSink, database_url: str) -> AsyncIterator[Running]:
    settings = make_settings(
        tmp_path, nats_url=nats_url, upstream_smtp=sink.url, database_url=database_url, upstream_timeout=5
    )
    system = AllInOne(settings)
    addresses = await system.start()
    async with aiohttp.ClientSession(headers=BROWSER) as http:
        try:
            yield Running(system, addresses, http)
        finally:
            await system.stop()


def tracking_urls(content: bytes) -> tuple[str, list[str], list[str]]:
    """The tracking id, pixel URLs and click URLs of one relayed copy."""
    message = email.message_from_bytes(content, policy=default_policy)
    tracking_id = str(message["X-Mailbeacon-Tracking-ID"])
    html = message.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    pixels = re.findall(r'<img src="([^"]+/track/pixel/[^"]+)"', html)
    clicks = [
        url.replace("&amp;", "&")
        for url in re.findall(r'href=["\']([^"\']+/track/click/[^"\']+)', html)
        if "url=mailbeacon%3Ahoneypot" not in url  # the hidden honeypot link is not a real link
    ]
    return tracking_id, pixels, clicks


async def metrics_text(running: Running) -> str:
    async with running.http.get(f"{running.addresses.aggregator}/metrics") as response:
        return await response.text()


@pytest.mark.slow
async def test_mail_to_statistics_end_to_end(running: Running, sink: SmtpSink) -> None:
    sent_metric = ("mailbeacon_events_total", {"campaign": CAMPAIGN, "type": "sent"})
    sent_before = metric_value(await metrics_text(running), sent_metric[0], **sent_metric[1])
    recipients = ["ann@example.com", "ben@example.com", "cy@example.com"]
    await asyncio.to_thread(send, running.smtp_port, html_message(recipients), recipients)
    await asyncio.to_thread(send, running.smtp_port, text_message("dee@example.com"), ["dee@example.com"])

    # One rewritten copy per recipient, each with its own tracking id and exactly one pixel.
    assert [m.recipients for m in sink.messages] == [[r] for r in [*recipients, "dee@example.com"]]
    copies = {m.recipients[0]: tracking_urls(m.content) for m in sink.messages}
    ids = [tid for tid, _, _ in copies.values()]
    assert len(set(ids)) == 4
    for tid, pixels, clicks in copies.values():
        assert len(pixels) == 1 and tid in pixels[0]
        assert all(tid in url for url in clicks)
    assert len(copies["ann@example.com"][2]) == 2  # both web links wrapped, mailto left alone
    assert b"mailto:help@shop.example.com" in sink.messages[0].content
    assert b"X-Campaign" not in sink.messages[0].content
    assert len(copies["dee@example.com"][2]) == 1  # the text-only mail got an HTML part

    ann, ben, cy = (copies[r][0] for r in recipients)
    http = running.http
    for _ in range(2):  # two opens by the same recipient: one unique, two total
        async with http.get(copies["ann@example.com"][1][0]) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/gif"
            assert len(await response.read()) == 43
    async with http.get(copies["ann@example.com"][2][0], allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == LINKS[0]
    tracker = running.addresses.tracker
    bounce = {"tracking_id": ben, "bounce_type": "hard", "reason": "550 5.1.1 user unknown"}
    async with http.post(f"{tracker}/track/bounce/", json=bounce) as response:
        assert response.status == 200
        assert await response.json() == {"status": "success", "message": "Event recorded"}
    for delivered in ({"tracking_id": ann}, {"email": "cy@example.com"}):
        async with http.post(f"{tracker}/track/delivery/", json=delivered) as response:
            assert await response.json() == {"status": "success", "message": "Delivery recorded"}

    async def settled() -> dict[str, Any]:
        stats = await running.statistics()
        assert stats["delivered_count"] == 2 and stats["total_opens"] == 2 and stats["bounced_count"] == 1
        assert stats["total_clicks"] == 1
        return stats

    stats = await eventually(settled)
    expected = {
        "campaign": CAMPAIGN,
        "total_recipients": 4,
        "sent_count": 4,
        "failed_count": 0,
        "delivered_count": 2,
        "bounced_count": 1,
        "hard_bounced_count": 1,
        "soft_bounced_count": 0,
        "complained_count": 0,
        "unsubscribed_count": 0,
        "unique_opens": 1,
        "total_opens": 2,
        "unique_clicks": 1,
        "total_clicks": 1,
        "human_unique_opens": 1,
        "human_unique_clicks": 1,
        "delivery_rate": 50.0,
        "open_rate": 50.0,
        "click_rate": 50.0,
        "bounce_rate": 25.0,
        "complaint_rate": 0.0,
        "top_links": [{"url": LINKS[0], "total_clicks": 1, "unique_clicks": 1}],
        "opens_over_time": [{"date": datetime.now(UTC).strftime("%Y-%m-%d"), "opens": 2, "human_opens": 2}],
    }
    assert {key: stats[key] for key in expected} == expected
    recent = stats["recent_events"]
    assert len(recent) == 10
    assert [e["occurred_at"] for e in recent] == sorted((e["occurred_at"] for e in recent), reverse=True)
    assert {e["type"] for e in recent} == {"sent", "opened", "clicked", "bounced", "delivered"}
    cy_delivery = next(e for e in recent if e["type"] == "delivered" and e["recipient"] == "cy@example.com")
    assert cy_delivery["tracking_id"] == cy  # an address-only webhook lands on that recipient's message

    refreshed = await running.statistics(refresh=True)
    assert {key: refreshed[key] for key in expected} == expected

    async with http.get(f"{running.addresses.aggregator}/api/campaigns") as response:
        listed = (await response.json())["campaigns"]
    assert [(c["campaign"], c["sent_count"], c["open_rate"]) for c in listed] == [(CAMPAIGN, 4, 50.0)]
    sent_after = metric_value(await metrics_text(running), sent_metric[0], **sent_metric[1])
    assert sent_after - sent_before == 4


async def stream_counts(nats_url: str) -> dict[str, int]:
    nc = await connect(nats_url, "test")
    try:
        js = nc.jetstream()
        counts: dict[str, int] = {}
        for event_type in EventType:
            info = await js.stream_info(STREAM, subjects_filter=f"mailbeacon.events.{event_type.value}")
            counts[event_type.value] = sum((info.state.subjects or {}).values())
        return counts
    finally:
        await nc.close()


async def test_upstream_down_defers_and_records_nothing(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    closed_port = SmtpSink()  # bound then closed: nothing listens on that port
    await closed_port.start()
    await closed_port.stop()
    settings = make_settings(
        tmp_path,
        nats_url=nats_url,
        upstream_smtp=closed_port.url,
        database_url=database_url,
        upstream_timeout=2,
    )
    system = AllInOne(settings)
    addresses = await system.start()
    try:
        port = int(addresses.smtp.rsplit(":", 1)[1])
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await asyncio.to_thread(send, port, html_message(["ann@example.com"]), ["ann@example.com"])
        assert 400 <= refused.value.smtp_code < 500
        assert b"upstream unavailable" in refused.value.smtp_error
    finally:
        await system.stop()
    counts = await stream_counts(nats_url)
    assert counts["sent"] == 0 and counts["failed"] == 0


async def test_forged_click_signature_is_refused(running: Running, sink: SmtpSink) -> None:
    await asyncio.to_thread(send, running.smtp_port, html_message(["ann@example.com"]), ["ann@example.com"])
    _, _, clicks = tracking_urls(sink.messages[0].content)
    forged = re.sub(r"url=[^&]+", "url=https%3A%2F%2Fevil.example.net%2F", clicks[0])
    unsigned = clicks[0].split("&sig=")[0]
    for url in (forged, unsigned):
        async with running.http.get(url, allow_redirects=False) as response:
            assert response.status == 400
            assert "Location" not in response.headers
            assert "not valid" in await response.text()
    await asyncio.sleep(0.3)
    assert (await stream_counts(running.system.settings.nats.url or ""))["clicked"] == 0


@pytest.mark.slow
async def test_replay_into_fresh_database_and_duplicates(
    tmp_path: Path, nats_url: str, sink: SmtpSink, new_database: Callable[[], str]
) -> None:
    settings = make_settings(tmp_path, nats_url=nats_url, upstream_smtp=sink.url, database_url=new_database())
    system = AllInOne(settings)
    addresses = await system.start()
    port = int(addresses.smtp.rsplit(":", 1)[1])
    recipients = ["ann@example.com", "ben@example.com"]
    await asyncio.to_thread(send, port, html_message(recipients), recipients)
    ann = tracking_urls(sink.messages[0].content)[0]
    nc = await connect(nats_url, "test")
    js = nc.jetstream()
    opened = Event(event_id=new_event_id(), type=EventType.OPENED, tracking_id=ann, source="pixel")
    # Twice through JetStream's dedup window (stored once), and twice more with no
    # Nats-Msg-Id at all (stored twice): the aggregator must still count one open.
    await js.publish(opened.subject, opened.to_json(), headers={"Nats-Msg-Id": opened.event_id})
    await js.publish(opened.subject, opened.to_json(), headers={"Nats-Msg-Id": opened.event_id})
    await js.publish(opened.subject, opened.to_json())
    await js.publish(opened.subject, opened.to_json())
    http = aiohttp.ClientSession()
    url = f"{addresses.aggregator}/api/campaigns/{CAMPAIGN}/statistics"

    async def read() -> dict[str, Any]:
        async with http.get(url) as response:
            stats = dict(await response.json())
        assert stats["sent_count"] == 2 and stats["total_opens"] == 1
        info = await js.consumer_info(STREAM, CONSUMER)
        assert info.num_ack_pending == 0 and info.num_pending == 0
        return stats

    before = await eventually(read)
    assert before["unique_opens"] == 1
    await system.stop()
    await http.close()

    # Replay: a fresh database and the durable consumer recreated from the stream's start.
    await js.delete_consumer(STREAM, CONSUMER)
    fresh = await asyncio.to_thread(new_database)
    system = AllInOne(settings.model_copy(update={"database_url": SecretStr(fresh)}))
    addresses = await system.start()
    http = aiohttp.ClientSession()
    url = f"{addresses.aggregator}/api/campaigns/{CAMPAIGN}/statistics"
    try:
        after = await eventually(read)
    finally:
        await http.close()
        await system.stop()
        await nc.close()
    volatile = {"updated_at", "recent_events"}
    assert {k: v for k, v in after.items() if k not in volatile} == {
        k: v for k, v in before.items() if k not in volatile
    }
    assert [e["event_id"] for e in after["recent_events"]] == [e["event_id"] for e in before["recent_events"]]
