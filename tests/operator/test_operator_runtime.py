"""The operator's real kopf runtime against a Kubernetes API test server, real NATS and the real system.

kopf runs in its own thread (``KopfRunner``), the API server in another; the aggregator,
tracker and SMTP proxy run for real (``AllInOne`` on a real nats-server and SQLite), mail is
sent with smtplib and lands in a real SMTP sink.
"""

from __future__ import annotations

import asyncio
import email
import smtplib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml
from kopf.testing import KopfRunner
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from campaign_operator.status import COUNTS, RATES
from campaign_operator.wiring import CampaignOperator, register
from mailbeacon.app.runner import Addresses, AllInOne
from mailbeacon.bus.jetstream import KV_BUCKET, connect
from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec
from mailbeacon.contract.settings import Settings
from tests.kube_api import FakeKubernetes
from tests.support import SmtpSink, eventually, free_port, make_settings

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "helm" / "mailbeacon" / "crds" / "campaigns.mailbeacon.io.yaml"
CAMPAIGNS = "/apis/mailbeacon.io/v1alpha1/namespaces/{ns}/campaigns"
KEY = CampaignKey("marketing", "newsletter")
SENDER = "news@shop.example.com"


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    server = FakeKubernetes([yaml.safe_load(CRD.read_text())], namespaces=["default", "marketing"]).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def operator_running(
    kube: FakeKubernetes, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CampaignOperator]:
    monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    registry = kopf.OperatorRegistry()
    operator = register(registry, settings)
    with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=registry, timeout=30):
        yield operator


class Kubectl:
    """What a user does with kubectl, over HTTP to the API server."""

    def __init__(self, kube: FakeKubernetes, http: aiohttp.ClientSession) -> None:
        self.kube, self.http = kube, http

    def url(self, namespace: str, name: str = "") -> str:
        return self.kube.url + CAMPAIGNS.format(ns=namespace) + (f"/{name}" if name else "")

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(self.url(manifest["metadata"]["namespace"]), json=manifest) as response:
            assert response.status == 201, await response.text()
            return dict(await response.json())

    async def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.http.patch(self.url(namespace, name), json=body, headers=headers) as response:
            assert response.status == 200, await response.text()

    async def delete(self, namespace: str, name: str) -> None:
        async with self.http.delete(self.url(namespace, name)) as response:
            assert response.status in (200, 202), await response.text()

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        async with self.http.get(self.url(namespace, name)) as response:
            if response.status == 404:
                return None
            return dict(await response.json())


def campaign_manifest(**guardrails: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mailbeacon.io/v1alpha1",
        "kind": "Campaign",
        "metadata": {"name": KEY.name, "namespace": KEY.namespace},
        "spec": {
            "displayName": "Monthly newsletter",
            "match": {"senders": [SENDER]},
            "tracking": {"unsubscribeHeader": True},
            "guardrails": guardrails,
        },
    }


async def kv_spec(nats_url: str, key: CampaignKey) -> CampaignSpec | None:
    nc = await connect(nats_url, "test")
    try:
        try:
            kv = await (nc.jetstream()).key_value(KV_BUCKET)
            entry = await kv.get(key.kv_key)
        except (BucketNotFoundError, KeyNotFoundError):  # also raised for a deleted key
            return None
        return CampaignSpec.from_json(entry.value or b"")
    finally:
        await nc.close()


def newsletter(recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Shop News <{SENDER}>"
    message["To"] = recipient
    message["Subject"] = "Our news"
    message.set_content("News: https://shop.example.com/news")
    return message


def send(port: int, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(newsletter(recipient), to_addrs=[recipient])


@dataclass
class System:
    running: AllInOne
    addresses: Addresses

    def mirrored_paused(self) -> bool | None:
        """Whether the proxy's own mirror of the KV bucket has the campaign paused (None: absent)."""
        assert self.running.store is not None
        spec = self.running.store.get(KEY)
        return None if spec is None else spec.paused


@pytest.fixture
async def system(tmp_path: Path, nats_url: str, sink: SmtpSink) -> AsyncIterator[System]:
    settings = make_settings(
        tmp_path, nats_url=nats_url, upstream_smtp=sink.url, database_url=f"sqlite:///{tmp_path / 'stats.db'}"
    )
    running = AllInOne(settings)
    addresses = await running.start()
    try:
        yield System(running, addresses)
    finally:
        await running.stop()


@pytest.mark.slow
async def test_campaign_lifecycle_with_guardrails(
    tmp_path: Path,
    nats_url: str,
    sink: SmtpSink,
    system: System,
    kube: FakeKubernetes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    addresses = system.addresses
    settings = make_settings(
        tmp_path,
        nats_url=nats_url,
        aggregator_url=addresses.aggregator,
        operator_listen="127.0.0.1:0",
        operator_status_interval=0.3,
    )
    smtp_port = int(addresses.smtp.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as http:
        kubectl = Kubectl(kube, http)
        with operator_running(kube, settings, tmp_path, monkeypatch) as operator:
            applied = await kubectl.apply(
                campaign_manifest(minDelivered=10, complaintRatePercent=0.3, autoPause=True)
            )
            assert applied["spec"]["guardrails"]["bounceRatePercent"] == 5.0  # the CRD's default

            # Applying the Campaign puts its spec (defaults included) in the KV bucket.
            async def spec_in_kv() -> CampaignSpec | None:
                return await kv_spec(nats_url, KEY)

            stored = await eventually(spec_in_kv)
            assert stored == CampaignSpec.model_validate(applied["spec"])
            assert stored.match.senders == [SENDER] and stored.tracking.unsubscribe_header
            assert stored.guardrails.auto_pause and stored.guardrails.min_delivered == 10
            resource = await eventually(lambda: kubectl.get(KEY.namespace, KEY.name))
            assert "mailbeacon.io/campaign-operator" in resource["metadata"]["finalizers"]

            # Mail from the campaign's sender goes through the real proxy.
            recipients = [f"reader{i}@example.org" for i in range(10)]
            for recipient in recipients:
                await asyncio.to_thread(send, smtp_port, recipient)
            tracking = {
                m.recipients[0]: str(
                    email.message_from_bytes(m.content, policy=default_policy)["X-Mailbeacon-Tracking-ID"]
                )
                for m in sink.messages
            }
            assert sorted(tracking) == recipients

            async def webhook(kind: str, recipient: str) -> None:
                url = f"{addresses.tracker}/track/{kind}/"
                async with http.post(url, json={"tracking_id": tracking[recipient]}) as response:
                    assert response.status == 200, await response.text()

            # Four deliveries and one complaint: 25 %, but below minDelivered nothing is judged.
            for recipient in recipients[:4]:
                await webhook("delivery", recipient)
            await webhook("complaint", recipients[0])

            async def spec_with(**wanted: Any) -> dict[str, Any]:
                current = await kubectl.get(KEY.namespace, KEY.name)
                assert current is not None
                assert {k: current["spec"].get(k) for k in wanted} == wanted, current["spec"]
                return current

            async def status_with(**wanted: Any) -> dict[str, Any]:
                current = await kubectl.get(KEY.namespace, KEY.name)
                assert current is not None
                status = current.get("status", {})
                assert {k: status.get(k) for k in wanted} == wanted, status
                return current

            early = await eventually(lambda: status_with(sent=10, delivered=4, complained=1))
            conditions = {c["type"]: c for c in early["status"].get("conditions", [])}
            assert conditions["ComplaintRateHigh"]["status"] == "False"
            assert conditions["ComplaintRateHigh"]["reason"] == "InsufficientVolume"
            assert conditions["BounceRateHigh"]["status"] == "False"
            assert early["spec"]["paused"] is False
            assert not [e for e in kube.events(KEY.namespace) if e["reason"] == "ComplaintRateHigh"]

            # Six more deliveries: 1 complaint in 10 deliveries crosses 0.3 % once volume suffices.
            for recipient in recipients[4:]:
                await webhook("delivery", recipient)
            tripped = await eventually(lambda: status_with(delivered=10, complained=1, complaintRate=10.0))
            async with http.get(f"{addresses.aggregator}/api/campaigns/{KEY}/statistics") as response:
                statistics = await response.json()
            for status_field, source in {**COUNTS, **RATES}.items():
                assert tripped["status"][status_field] == statistics[source], status_field
            conditions = {c["type"]: c for c in tripped["status"]["conditions"]}
            assert conditions["ComplaintRateHigh"]["status"] == "True"
            assert conditions["ComplaintRateHigh"]["reason"] == "AboveThreshold"
            assert conditions["StatisticsAvailable"]["status"] == "True"
            assert tripped["status"]["observedGeneration"] >= 1

            # The flip posted a Warning Event, and the spec asked for an automatic pause.
            async def events_posted() -> list[dict[str, Any]]:
                events = [e for e in kube.events(KEY.namespace) if e["involvedObject"]["name"] == KEY.name]
                reasons = [e["reason"] for e in events]
                assert "ComplaintRateHigh" in reasons and "AutoPaused" in reasons, reasons
                return events

            events = await eventually(events_posted)
            complaint = next(e for e in events if e["reason"] == "ComplaintRateHigh")
            assert complaint["type"] == "Warning" and "complaint rate 10.00%" in complaint["message"]
            assert complaint["involvedObject"]["kind"] == "Campaign"
            assert len([e for e in events if e["reason"] == "ComplaintRateHigh"]) == 1
            await eventually(lambda: spec_with(paused=True))
            stored = await eventually(spec_in_kv)
            assert stored.paused  # written to the bucket before the resource was patched

            # Once the proxy's campaign mirror has it, the proxy defers the campaign's mail
            # with a 4xx: the app keeps the message and retries later.
            async def proxy_sees(paused: bool) -> bool:
                return system.mirrored_paused() is paused

            await eventually(lambda: proxy_sees(True))
            sent_before = len(sink.messages)
            with pytest.raises(smtplib.SMTPDataError) as refused:
                await asyncio.to_thread(send, smtp_port, "late@example.org")
            assert 400 <= refused.value.smtp_code < 500 and b"paused" in refused.value.smtp_error
            assert len(sink.messages) == sent_before

            # A person resumes the campaign; the guardrail is still high, but it tripped before:
            # the operator respects the decision and does not pause again.
            await kubectl.patch(KEY.namespace, KEY.name, {"spec": {"paused": False}})

            async def resumed_in_kv() -> bool:
                spec = await kv_spec(nats_url, KEY)
                return spec is not None and not spec.paused

            await eventually(resumed_in_kv)
            await eventually(lambda: proxy_sees(False))
            await asyncio.sleep(3 * settings.operator.status_interval)
            current = await kubectl.get(KEY.namespace, KEY.name)
            assert current is not None and current["spec"]["paused"] is False
            assert [e["reason"] for e in kube.events(KEY.namespace)].count("AutoPaused") == 1

            # Deleting removes the spec from the bucket, then the finalizer; statistics stay.
            await kubectl.delete(KEY.namespace, KEY.name)

            async def gone() -> bool:
                return await kubectl.get(KEY.namespace, KEY.name) is None

            await eventually(gone)
            assert await kv_spec(nats_url, KEY) is None
            async with http.get(f"{addresses.aggregator}/api/campaigns/{KEY}/statistics") as response:
                assert response.status == 200
                assert (await response.json())["sent_count"] == 10
            assert operator.health_port is not None
    assert kube.pruned == []  # the operator never wrote a field the CRD does not know


async def test_spec_updates_resume_and_unreachable_aggregator(
    tmp_path: Path, nats_url: str, kube: FakeKubernetes, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        tmp_path,
        nats_url=nats_url,
        aggregator_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        operator_listen="127.0.0.1:0",
        operator_status_interval=0.3,
    )
    async with aiohttp.ClientSession() as http:
        kubectl = Kubectl(kube, http)
        with operator_running(kube, settings, tmp_path, monkeypatch) as operator:
            await kubectl.apply(campaign_manifest())

            async def stored_with(**wanted: Any) -> CampaignSpec:
                spec = await kv_spec(nats_url, KEY)
                assert spec is not None
                assert {k: getattr(spec.tracking, k) for k in wanted} == wanted
                return spec

            await eventually(lambda: stored_with(clicks=True))
            await kubectl.patch(KEY.namespace, KEY.name, {"spec": {"tracking": {"clicks": False}}})
            await eventually(lambda: stored_with(clicks=False))

            # The aggregator cannot be reached: a condition says so, no numbers are invented.
            async def unavailable() -> dict[str, Any]:
                current = await kubectl.get(KEY.namespace, KEY.name)
                assert current is not None
                conditions = {c["type"]: c for c in current.get("status", {}).get("conditions", [])}
                assert "StatisticsAvailable" in conditions
                assert conditions["StatisticsAvailable"]["status"] == "False"
                assert conditions["StatisticsAvailable"]["reason"] == "AggregatorUnavailable"
                return current

            current = await eventually(unavailable)
            assert "sent" not in current["status"]

            async def observed() -> bool:
                current = await kubectl.get(KEY.namespace, KEY.name)
                assert current is not None
                return bool(
                    current["status"].get("observedGeneration") == current["metadata"]["generation"] == 2
                )

            await eventually(observed)

            async with http.get(f"http://127.0.0.1:{operator.health_port}/readyz") as response:
                assert response.status == 200

        # While the operator is down, the bucket loses the spec; on restart it is written again.
        nc = await connect(nats_url, "test")
        await (await nc.jetstream().key_value(KV_BUCKET)).delete(KEY.kv_key)
        await nc.close()
        assert await kv_spec(nats_url, KEY) is None
        with operator_running(kube, settings, tmp_path, monkeypatch):
            spec = await eventually(lambda: stored_with(clicks=False))
            assert spec.tracking.unsubscribe_header
            await kubectl.delete(KEY.namespace, KEY.name)

            async def gone() -> bool:
                return await kubectl.get(KEY.namespace, KEY.name) is None

            await eventually(gone)
    assert await kv_spec(nats_url, KEY) is None
    assert kube.pruned == []


async def test_a_hung_aggregator_does_not_hold_a_deletion(
    tmp_path: Path, nats_url: str, kube: FakeKubernetes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An aggregator that accepts connections and never answers (a network partition, a
    # stuck process): every timer tick hangs in its HTTP request.
    hung: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    black_hole = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = black_hole.sockets[0].getsockname()[1]
    settings = make_settings(
        tmp_path,
        nats_url=nats_url,
        aggregator_url=f"http://127.0.0.1:{port}",
        operator_listen="127.0.0.1:0",
        operator_status_interval=0.2,
    )
    try:
        async with aiohttp.ClientSession() as http:
            kubectl = Kubectl(kube, http)
            with operator_running(kube, settings, tmp_path, monkeypatch):
                await kubectl.apply(campaign_manifest())

                async def stored() -> bool:
                    return await kv_spec(nats_url, KEY) is not None

                await eventually(stored)

                async def asking() -> bool:
                    return bool(hung)

                await eventually(asking)  # a tick is waiting for the aggregator right now
                await kubectl.delete(KEY.namespace, KEY.name)
                started = asyncio.get_running_loop().time()

                async def gone() -> bool:
                    return await kubectl.get(KEY.namespace, KEY.name) is None

                await eventually(gone, within=8)
                # Well before the statistics request's own 10 s timeout.
                assert asyncio.get_running_loop().time() - started < 5
                assert await kv_spec(nats_url, KEY) is None
    finally:
        for writer in hung:
            writer.close()
        black_hole.close()
        await black_hole.wait_closed()
