"""Unsubscribes and complaints stop a campaign's mail, over the whole pipeline: smtplib → proxy
→ sink, the recipient's one-click POST or a complaint webhook → tracker → NATS → aggregator →
suppression bucket → proxy. Real nats-server, SQL, SMTP and HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import email
import smtplib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

from aggregator import metrics as aggregator_metrics
from aggregator.ingest.suppressions import CHECK_PARKED_SECONDS
from aggregator.service import AggregatorService
from mailbeacon.app.runner import AllInOne
from mailbeacon.bus.campaign_store import CampaignStore
from mailbeacon.bus.jetstream import SUPPRESSIONS_BUCKET, connect, ensure_suppression_bucket, provision
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.bus.suppressions import SuppressionList, suppression_key
from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec, TrackingSwitches
from mailbeacon.contract.events import Event, EventType, utcnow
from mailbeacon.contract.settings import Settings
from smtp_proxy import metrics as proxy_metrics
from smtp_proxy.service import ProxyService
from tests.support import SmtpSink, eventually, make_settings, metric_value

NEWSLETTER = CampaignKey("default", "newsletter")
DIGEST = CampaignKey("default", "digest")
ANN, BEN = "ann@example.com", "ben@example.com"


def message(campaign: CampaignKey, recipients: list[str]) -> bytes:
    mail = EmailMessage()
    mail["From"] = "news@shop.example.com"
    mail["To"] = ", ".join(recipients)
    mail["Subject"] = f"{campaign.name} of the week"
    mail["Message-ID"] = f"<{uuid.uuid4()}@shop.example.com>"
    mail["X-Campaign"] = campaign.name
    mail.set_content("Hello!")
    mail.add_alternative(
        '<html><body><a href="https://shop.example.com/">Shop</a></body></html>', subtype="html"
    )
    return mail.as_bytes()


def _send(port: int, content: bytes, recipients: list[str]) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("news@shop.example.com")
        for rcpt in recipients:
            smtp.rcpt(rcpt)
        code, text = smtp.data(content)
        return code, text.decode()


async def send(port: int, campaign: CampaignKey, recipients: list[str]) -> tuple[int, str]:
    """What the app is told for one message (code, text)."""
    return await asyncio.to_thread(_send, port, message(campaign, recipients), recipients)


def parked_total() -> float:
    return metric_value(
        generate_latest(aggregator_metrics.REGISTRY).decode(), "mailbeacon_aggregator_events_parked_total"
    )


def suppressed_metric(reason: str) -> float:
    return metric_value(
        generate_latest(proxy_metrics.REGISTRY).decode(),
        "mailbeacon_proxy_copies_suppressed_total",
        reason=reason,
    )


class System:
    def __init__(self, settings: Settings, all_in_one: AllInOne, http: aiohttp.ClientSession) -> None:
        self.settings, self.all_in_one, self.http = settings, all_in_one, http
        self.smtp_port = 0
        self.tracker = self.aggregator = ""

    @property
    def proxy(self) -> ProxyService:
        proxy = self.all_in_one.components[-1]
        assert isinstance(proxy, ProxyService)
        return proxy

    async def knows(
        self, campaign: CampaignKey, recipient: str, reason: str, proxy: ProxyService | None = None
    ) -> None:
        """Wait until the proxy's mirror of the bucket holds the pair."""
        suppressions = (proxy or self.proxy).suppressions
        assert suppressions is not None

        async def known() -> bool:
            return suppressions.reason(str(campaign), recipient) == reason

        await eventually(known, within=15)

    async def failed_events(self, campaign: CampaignKey) -> list[dict[str, Any]]:
        url = f"{self.aggregator}/api/campaigns/{campaign}/events"
        async with self.http.get(url, params={"type": "failed"}) as response:
            assert response.status == 200, await response.text()
            return list((await response.json())["events"])


@contextlib.asynccontextmanager
async def running_system(
    tmp_path: Path, nats_url: str, sink: SmtpSink, database: str
) -> AsyncIterator[System]:
    settings = make_settings(
        tmp_path, nats_url=nats_url, upstream_smtp=sink.url, database_url=database, upstream_timeout=5
    )
    all_in_one = AllInOne(settings)
    addresses = await all_in_one.start()
    try:
        assert all_in_one.store is not None
        for key in (NEWSLETTER, DIGEST):  # campaigns that ask for List-Unsubscribe (RFC 8058)
            await all_in_one.store.put(key, CampaignSpec(tracking=TrackingSwitches(unsubscribe_header=True)))
        async with aiohttp.ClientSession() as http:
            running = System(settings, all_in_one, http)
            running.smtp_port = int(addresses.smtp.rsplit(":", 1)[1])
            running.tracker, running.aggregator = addresses.tracker, addresses.aggregator
            yield running
    finally:
        await all_in_one.stop()


@pytest.fixture
async def system(tmp_path: Path, nats_url: str, sink: SmtpSink) -> AsyncIterator[System]:
    async with running_system(tmp_path, nats_url, sink, f"sqlite:///{tmp_path / 'suppress.db'}") as running:
        yield running


@contextlib.asynccontextmanager
async def restarted_proxy(settings: Settings) -> AsyncIterator[ProxyService]:
    """A proxy process started afresh: everything it knows comes from NATS."""
    nc = await connect(settings.nats.url or "", "restarted-proxy")
    kv = await provision(nc.jetstream(), settings)
    store = CampaignStore(kv)
    await store.start()
    publisher = EventPublisher(nc.jetstream())
    suppressions = SuppressionList(await ensure_suppression_bucket(nc.jetstream(), settings))
    proxy = ProxyService(settings, publisher, store, serve_http=False, suppressions=suppressions)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
        await publisher.close()
        await store.stop()
        await nc.close()


def one_click_url(content: bytes) -> str:
    copy = email.message_from_bytes(content, policy=default_policy)
    assert copy["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    return str(copy["List-Unsubscribe"]).strip().strip("<>")


def tracking_id_of(content: bytes) -> str:
    return str(email.message_from_bytes(content, policy=default_policy)["X-Mailbeacon-Tracking-ID"])


@pytest.mark.slow
async def test_one_click_unsubscribe_stops_that_campaigns_mail_to_that_recipient(
    tmp_path: Path, nats_url: str, sink: SmtpSink, database_url: str
) -> None:
    async with running_system(tmp_path, nats_url, sink, database_url) as system:
        before = suppressed_metric("unsubscribed")
        code, _ = await send(system.smtp_port, NEWSLETTER, [ANN])
        assert code == 250 and [m.recipients for m in sink.messages] == [[ANN]]

        # The recipient's mailbox provider POSTs the one-click URL of the copy (RFC 8058).
        url = one_click_url(sink.messages[0].content)
        async with system.http.get(url) as response:  # the page names the list the link leaves
            assert "<h1>Unsubscribe from newsletter?</h1>" in await response.text()
        async with system.http.post(url, data={"List-Unsubscribe": "One-Click"}) as response:
            assert response.status == 200
        await system.knows(NEWSLETTER, ANN, "unsubscribed")

        # The next message of the campaign: Ben's copy goes out, Ann's does not.
        code, text = await send(system.smtp_port, NEWSLETTER, [ANN, BEN])
        assert code == 250, text
        assert "1 of 2 copies accepted" in text
        assert [m.recipients for m in sink.messages[1:]] == [[BEN]]

        async def recorded() -> list[dict[str, Any]]:
            failed = [e for e in await system.failed_events(NEWSLETTER) if e["recipient"] == ANN]
            assert failed, "no failed event for the suppressed copy yet"
            return failed

        (failed,) = await eventually(recorded)
        assert failed["reason"] == "recipient unsubscribed from this campaign" and failed["applied"]

        # Only suppressed recipients left: a permanent refusal the app must not retry.
        code, text = await send(system.smtp_port, NEWSLETTER, [ANN.upper()])
        assert code == 550 and text.startswith("5.7.1 ") and "unsubscribed" in text
        assert len(sink.messages) == 2

        # Another campaign to the same recipient still goes out.
        code, _ = await send(system.smtp_port, DIGEST, [ANN])
        assert code == 250 and sink.messages[-1].recipients == [ANN]
        assert suppressed_metric("unsubscribed") - before == 2


@pytest.mark.slow
async def test_a_complaint_stops_mail_and_a_restarted_proxy_still_knows(
    system: System, sink: SmtpSink
) -> None:
    before = suppressed_metric("complained")
    await send(system.smtp_port, NEWSLETTER, [ANN, BEN])
    ann_copy = next(m for m in sink.messages if m.recipients == [ANN])
    complaint = {"tracking_id": tracking_id_of(ann_copy.content), "reason": "abuse report"}
    async with system.http.post(f"{system.tracker}/track/complaint/", json=complaint) as response:
        assert response.status == 200
    # An address-only complaint (no tracking id) lands on the recipient's latest copy: Ben's.
    async with system.http.post(f"{system.tracker}/track/complaint/", json={"email": BEN}) as response:
        assert response.status == 200
    await system.knows(NEWSLETTER, ANN, "complained")
    await system.knows(NEWSLETTER, BEN, "complained")

    code, text = await send(system.smtp_port, NEWSLETTER, [ANN, BEN])
    assert code == 550 and "complained about this campaign" in text
    assert len(sink.messages) == 2
    assert suppressed_metric("complained") - before == 2

    # A proxy started later (a new pod, a restart) loads the suppressions from the bucket.
    async with restarted_proxy(system.settings) as proxy:
        assert proxy.port is not None
        code, text = await send(proxy.port, NEWSLETTER, [ANN])
        assert code == 550 and "complained" in text
    # HONOUR_UNSUBSCRIBES=false: the operator switched enforcement off; mail is relayed.
    async with restarted_proxy(system.settings.model_copy(update={"honour_unsubscribes": False})) as proxy:
        assert proxy.port is not None and proxy.suppressions is None
        code, _ = await send(proxy.port, NEWSLETTER, [ANN])
        assert code == 250 and sink.messages[-1].recipients == [ANN]
    # Untracked mail (no campaign) is never held back.
    code, _ = await asyncio.to_thread(_send, system.smtp_port, b"Subject: hi\r\n\r\nhello\r\n", [ANN])
    assert code == 250 and sink.messages[-1].recipients == [ANN]


@pytest.mark.slow
async def test_a_complaint_for_an_address_never_mailed_stops_no_later_mail(
    tmp_path: Path, nats_url: str, sink: SmtpSink, database_url: str
) -> None:
    """Issue 14, finding 2: an address-only complaint for an address not mailed yet waited
    parked and went to that address's first copy, withholding every later one. A complaint
    names the copy relayed by its time (five minutes of clock skew allowed): none here."""
    cal = "cal@example.com"
    async with running_system(tmp_path, nats_url, sink, database_url) as system:
        stated = (utcnow() - timedelta(minutes=10)).isoformat()
        parked_before = parked_total()
        async with system.http.post(
            f"{system.tracker}/track/complaint/", json={"email": cal, "timestamp": stated}
        ) as response:
            assert response.status == 200

        async def parked() -> bool:
            return parked_total() - parked_before == 1

        await eventually(parked)
        code, _ = await send(system.smtp_port, NEWSLETTER, [cal])
        assert code == 250

        async def stored_sent() -> bool:
            url = f"{system.aggregator}/api/campaigns/{NEWSLETTER}/events"
            async with system.http.get(url, params={"type": "sent"}) as response:
                return any(e["recipient"] == cal for e in (await response.json())["events"])

        await eventually(stored_sent)
        await asyncio.sleep(CHECK_PARKED_SECONDS + 1.0)  # a suppression would be recorded by now
        suppressions = system.proxy.suppressions
        assert suppressions is not None and suppressions.reason(str(NEWSLETTER), cal) is None
        code, _ = await send(system.smtp_port, NEWSLETTER, [cal])
        assert code == 250 and [m.recipients for m in sink.messages] == [[cal], [cal]]

        async def statistics() -> dict[str, Any] | None:
            url = f"{system.aggregator}/api/campaigns/{NEWSLETTER}/statistics"
            async with system.http.get(url) as response:
                stats: dict[str, Any] = await response.json()
            return stats if stats["sent_count"] == 2 else None

        assert (await eventually(statistics))["complained_count"] == 0


@pytest.mark.slow
async def test_parked_redelivered_and_lost_suppressions_are_recorded(system: System, sink: SmtpSink) -> None:
    """An unsubscribe stored before its copy's ``sent`` (parked, applied later), the same event
    delivered again, and a suppression lost from the bucket all end up enforced."""
    nc = system.all_in_one.nc
    assert nc is not None
    js = nc.jetstream()
    publisher = EventPublisher(js)
    try:
        cy, tid = "cy@example.com", str(uuid.uuid4())
        unsubscribe = Event(
            event_id=f"test:unsub:{tid}", type=EventType.UNSUBSCRIBED, tracking_id=tid, source="unsubscribe"
        )
        parked_before = parked_total()
        await publisher.publish(unsubscribe)

        async def parked() -> bool:
            return parked_total() - parked_before == 1  # stored, waiting for its message

        await eventually(parked)
        sent = Event(
            event_id=f"proxy:sent:{tid}",
            type=EventType.SENT,
            tracking_id=tid,
            campaign=str(NEWSLETTER),
            recipient=cy,
            source="proxy",
        )
        await publisher.publish(sent)
        await system.knows(NEWSLETTER, cy, "unsubscribed")
        code, _ = await send(system.smtp_port, NEWSLETTER, [cy])
        assert code == 550

        # The put lost (a crash between the commit and the put): the event delivered again is
        # a duplicate in SQL, and still puts its suppression.
        kv = await ensure_suppression_bucket(js, system.settings)
        await js.purge_stream("KV_mailbeacon_suppressions")
        await js.publish(unsubscribe.subject, unsubscribe.to_json(), headers={"Nats-Msg-Id": f"again:{tid}"})
        entry = await eventually(lambda: _entry(kv, suppression_key(str(NEWSLETTER), cy)), within=15)
        assert b"unsubscribed" in entry

        # Lost with no redelivery to come: a restarted aggregator puts what the bucket lacks.
        await js.purge_stream("KV_mailbeacon_suppressions")
        aggregator = system.all_in_one.components[0]
        assert isinstance(aggregator, AggregatorService)
        await aggregator.stop()
        replacement = AggregatorService(aggregator.settings, js, await provision(js, aggregator.settings))
        system.all_in_one.components[0] = replacement
        await replacement.start()
        entry = await eventually(lambda: _entry(kv, suppression_key(str(NEWSLETTER), cy)), within=15)
        assert b"unsubscribed" in entry
    finally:
        await publisher.close()


async def _entry(kv: Any, key: str) -> bytes | None:
    try:
        return bytes((await kv.get(key)).value or b"")
    except Exception:
        return None


@pytest.mark.slow
async def test_a_batch_whose_suppression_cannot_be_written_is_redelivered(
    system: System, sink: SmtpSink
) -> None:
    """The bucket unwritable after the commit: the batch is not acknowledged, and its
    redelivery writes the suppression once the bucket is back."""
    await send(system.smtp_port, NEWSLETTER, ["dee@example.com"])
    tid = tracking_id_of(sink.messages[-1].content)
    nc = system.all_in_one.nc
    assert nc is not None
    js = nc.jetstream()
    await js.delete_key_value(SUPPRESSIONS_BUCKET)
    async with system.http.post(f"{system.tracker}/track/complaint/", json={"tracking_id": tid}) as response:
        assert response.status == 200

    async def stored() -> bool:
        url = f"{system.aggregator}/api/campaigns/{NEWSLETTER}/events"
        async with system.http.get(url, params={"type": "complained"}) as response:
            return any(e["tracking_id"] == tid for e in (await response.json())["events"])

    await eventually(stored)  # committed in SQL while its suppression could not be written
    await asyncio.sleep(0.5)
    kv = await ensure_suppression_bucket(js, system.settings)  # the bucket is back
    entry = await eventually(
        lambda: _entry(kv, suppression_key(str(NEWSLETTER), "dee@example.com")), within=15
    )
    assert b"complained" in entry
