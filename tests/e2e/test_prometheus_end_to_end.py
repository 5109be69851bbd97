"""What Grafana shows, proven against a real Prometheus scraping the real system.

`mailbeacon up` and `mailbeacon operator` run as processes (the operator against the Kubernetes
API test server), a real ``prometheus`` scrapes them every second with the targets labelled as
the chart's ServiceMonitor labels them and the chart's alert rules loaded. A scripted mix of
traffic goes through: two campaigns (one with a Campaign resource, one without), copies,
opens, clicks, a scanner burst, a honeypot and a forged click, bounces, a complaint, an
unsubscribe, withheld copies, refused recipients, an upstream refusal, untracked mail,
webhooks with bad credentials and a paused campaign. Then every query of every dashboard panel
is run as Grafana runs it (its variables substituted) and must return data, with values equal
to the statistics API (counters within Prometheus's extrapolation of ``increase``), and the
alert rules, in a low-volume copy (minVolume 5, no ``for``), must fire exactly where they should.
"""

from __future__ import annotations

import asyncio
import email
import json
import math
import os
import re
import smtplib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mailbeacon.contract.campaigns import CampaignKey
from tests.chart.test_dashboard_metrics import substitute
from tests.chart.test_helm_chart import NAMESPACE, PRODUCTION, manifests, render
from tests.esp_payloads.harness import sendgrid_headers, sendgrid_public_key
from tests.kube_api import FakeKubernetes
from tests.operator.test_operator_runtime import CRD, Kubectl, campaign_manifest, kv_spec
from tests.prometheus_support import (
    PrometheusServer,
    immediate_rules,
    panel_targets,
    require_prometheus,
    scrape_configs,
)
from tests.support import SECRET, SmtpSink, eventually, free_port, wait_http_ok

pytestmark = pytest.mark.slow

A = CampaignKey("marketing", "newsletter")  # a Campaign resource, guardrails from its spec
B = CampaignKey("default", "receipts")  # applied with the command line: the chart's defaults judge it
CAMPAIGNS = (A, B)
TOKEN = "generic-webhook-token-0123456789abcdef"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
APPLE_PROXY = "Mozilla/5.0"  # Apple Mail Privacy Protection's bare user agent
# The low-volume copy of the rules: the chart's values with small thresholds.
LOW_VOLUME = {"minVolume": 5, "upstreamErrorRatio": 0.02}
# Panel queries allowed to return no data in this setup, each with why. Empty: every panel
# shows what happened here; a panel added without a way to get data fails this test.
NO_DATA_EXPECTED: dict[str, str] = {}


@dataclass
class System:
    tmp: Path
    sink: SmtpSink
    http: aiohttp.ClientSession
    ports: dict[str, int]
    kube: FakeKubernetes
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    def url(self, component: str) -> str:
        return f"http://127.0.0.1:{self.ports[component]}"

    async def statistics(self, key: CampaignKey) -> dict[str, Any]:
        async with self.http.get(f"{self.url('aggregator')}/api/campaigns/{key}/statistics") as response:
            assert response.status == 200, await response.text()
            return dict(await response.json())


def env_of(tmp: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBEACON_") and k != "SITE_URL"}
    env.update({f"MAILBEACON_{k.upper()}": v for k, v in values.items()})
    env["HOME"] = str(tmp)
    return env


async def spawn(system: System, name: str, args: list[str], env: dict[str, str]) -> None:
    log = (system.tmp / f"{name}.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailbeacon.app.cli", *args, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    system.processes.append(process)


@pytest.fixture
async def system(tmp_path: Path, nats_url: str, sink: SmtpSink) -> AsyncIterator[System]:
    require_prometheus()
    ports = {name: free_port() for name in ("smtp", "tracker", "aggregator", "proxy", "operator")}
    async with aiohttp.ClientSession() as http:
        kube = FakeKubernetes([yaml.safe_load(CRD.read_text())], namespaces=["default", "marketing"]).start()
        running = System(tmp_path, sink, http, ports, kube)
        try:
            up = env_of(
                tmp_path,
                nats_url=nats_url,
                data_dir=str(tmp_path / "data"),
                smtp_listen=f"127.0.0.1:{ports['smtp']}",
                tracker_listen=f"127.0.0.1:{ports['tracker']}",
                site_url=running.url("tracker"),
                aggregator_listen=f"127.0.0.1:{ports['aggregator']}",
                proxy_http_listen=f"127.0.0.1:{ports['proxy']}",
                upstream_smtp=sink.url,
                secret_keys=SECRET,
                webhook_token=TOKEN,
                sendgrid_public_key=sendgrid_public_key(),
                smtp_max_recipients="5",
            )
            await spawn(running, "up", ["up"], up)
            for component in ("tracker", "aggregator", "proxy"):
                await wait_http_ok(f"{running.url(component)}/readyz", within=60)
            operator = env_of(
                tmp_path,
                nats_url=nats_url,
                data_dir=str(tmp_path / "operator"),
                operator_listen=f"127.0.0.1:{ports['operator']}",
                aggregator_url=running.url("aggregator"),
                operator_namespaces="marketing",
                operator_status_interval="1",
            )
            operator["KUBECONFIG"] = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
            await spawn(running, "operator", ["operator"], operator)
            await wait_http_ok(f"{running.url('operator')}/readyz", within=60)
            yield running
        finally:
            for process in running.processes:
                if process.returncode is None:
                    process.terminate()
            for process in running.processes:
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            kube.stop()


def message(sender: str, recipients: list[str], campaign: str | None = None) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = ", ".join(recipients)
    mail["Subject"] = "News"
    if campaign:
        mail["X-Campaign"] = campaign
    mail.set_content("News: https://shop.example.com/sale https://blog.example.com/post")
    mail.add_alternative(
        '<p><a href="https://shop.example.com/sale">Sale</a> <a href="https://blog.example.com/post">Blog</a></p>',
        subtype="html",
    )
    return mail


def send(port: int, mail: EmailMessage, recipients: list[str]) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        return smtp.send_message(mail, to_addrs=recipients)


def refused_data(port: int, mail: EmailMessage, recipients: list[str]) -> int:
    try:
        send(port, mail, recipients)
    except smtplib.SMTPDataError as exc:
        return exc.smtp_code
    return 250


def bad_address(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("news@shop.example.com")
        code, _ = smtp.rcpt("no-at-sign")
        smtp.rset()
        return code


@dataclass
class Copy:
    tracking_id: str
    pixel: str
    links: list[str]
    honeypot: str
    unsubscribe: str | None


def copies_of(sink: SmtpSink) -> dict[str, Copy]:
    found = {}
    for received in sink.messages:
        parsed = email.message_from_bytes(received.content, policy=default_policy)
        if parsed["X-Mailbeacon-Tracking-ID"] is None:
            continue  # untracked mail, relayed as it was
        html = parsed.get_body(preferencelist=("html",)).get_content()
        clicks = [u.replace("&amp;", "&") for u in re.findall(r'href="([^"]+/track/click/[^"]+)"', html)]
        unsubscribe = re.search(
            r"<(http[^>]+/track/unsubscribe/[^>]+)>", str(parsed.get("List-Unsubscribe", ""))
        )
        found[received.recipients[0]] = Copy(
            tracking_id=str(parsed["X-Mailbeacon-Tracking-ID"]),
            pixel=re.findall(r'<img src="([^"]+/track/pixel/[^"]+)"', html)[0],
            links=[u for u in clicks if "mailbeacon%3Ahoneypot" not in u],
            honeypot=next(u for u in clicks if "mailbeacon%3Ahoneypot" in u),
            unsubscribe=unsubscribe.group(1) if unsubscribe else None,
        )
    return found


async def get(http: aiohttp.ClientSession, url: str, agent: str = BROWSER) -> int:
    async with http.get(url, headers={"User-Agent": agent}, allow_redirects=False) as response:
        await response.read()
        return response.status


async def generic(system: System, kind: str, tracking_id: str, token: str = TOKEN, **extra: str) -> int:
    url = f"{system.url('tracker')}/track/{kind}/"
    headers = {"Authorization": f"Bearer {token}"}
    async with system.http.post(url, json={"tracking_id": tracking_id, **extra}, headers=headers) as response:
        return response.status


async def sendgrid(system: System, tracking_id: str, recipient: str, *, forged: bool = False) -> int:
    record = {
        "email": recipient,
        "timestamp": int(time.time()),
        "event": "bounce",
        "type": "bounce",
        "reason": "550 5.1.1 unknown user",
        "status": "5.1.1",
        "sg_event_id": f"e2e-{tracking_id}-{forged}-{time.monotonic_ns()}",
        "sg_message_id": "e2e.filter0001",
        "tracking_id": tracking_id,
    }
    body = json.dumps([record]).encode()
    headers = sendgrid_headers(b"[]" if forged else body)  # forged: signed for another body
    async with system.http.post(
        f"{system.url('tracker')}/webhooks/sendgrid", data=body, headers=headers
    ) as response:
        return response.status


async def campaign_apply(system: System, nats_url: str, key: CampaignKey) -> None:
    manifest = {
        "apiVersion": "mailbeacon.io/v1alpha1",
        "kind": "Campaign",
        "metadata": {"name": key.name, "namespace": key.namespace},
        "spec": {"displayName": "Receipts"},
    }
    path = system.tmp / "receipts.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mailbeacon.app.cli", "campaign", "apply", "-f", str(path)],
        env=env_of(system.tmp, nats_url=nats_url, data_dir=str(system.tmp / "cli")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def traffic(system: System, nats_url: str) -> None:
    """The scripted mix; the numbers the panels must show are read back from the statistics API."""
    smtp, http = system.ports["smtp"], system.http
    a = [f"a{i}@example.com" for i in range(1, 12)]
    b = [f"b{i}@example.com" for i in range(1, 7)]
    system.sink.handler.refuse["b6@example.com"] = "550 5.1.1 user unknown"  # an upstream refusal
    news, receipts = "news@shop.example.com", "receipts@shop.example.com"
    assert await asyncio.to_thread(send, smtp, message(news, a[:5]), a[:5]) == {}
    refused = await asyncio.to_thread(send, smtp, message(news, a[5:11]), a[5:11])  # 6 recipients, 5 allowed
    assert refused == {a[10]: (452, b"4.5.3 Too many recipients")}
    assert await asyncio.to_thread(send, smtp, message(receipts, b[:3], "receipts"), b[:3]) == {}
    assert (
        await asyncio.to_thread(send, smtp, message(receipts, b[3:], "receipts"), b[3:]) == {}
    )  # b6: partial
    await asyncio.to_thread(
        send, smtp, message("someone@example.org", ["u1@example.com"]), ["u1@example.com"]
    )
    assert await asyncio.to_thread(bad_address, smtp) == 501
    copies = copies_of(system.sink)
    assert len(system.sink.messages) == 5 + 5 + 3 + 2 + 1 and len(copies) == 15

    # Opens: people, and Apple's privacy proxy; clicks: a person, a scanner burst (two links of
    # one copy at once), the hidden honeypot link, and a forged signature.
    for recipient, agent in (
        ("a1", BROWSER),
        ("a1", BROWSER),
        ("a2", BROWSER),
        ("a3", APPLE_PROXY),
        ("b1", BROWSER),
    ):
        assert await get(http, copies[f"{recipient}@example.com"].pixel, agent) == 200
    assert await get(http, copies[a[0]].links[0]) == 302
    scanner = await asyncio.gather(*(get(http, link) for link in copies[a[3]].links))
    assert scanner == [302, 302]
    assert await get(http, copies[a[4]].honeypot) == 200
    assert await get(http, copies[a[1]].links[0].replace("sig=", "sig=0")) == 400

    # Provider reports: deliveries, bounces (one through SendGrid, signed), a complaint; and
    # webhooks with bad credentials (a wrong token, SendGrid signatures that do not match).
    ids = {recipient: copy.tracking_id for recipient, copy in copies.items()}
    for recipient in (*a[:5], a[7], a[8], a[9], b[0], b[2], b[3], b[4]):
        assert await generic(system, "delivery", ids[recipient]) == 200
    assert await generic(system, "bounce", ids[a[5]], bounce_type="hard") == 200
    assert await generic(system, "bounce", ids[b[1]], bounce_type="soft") == 200
    assert await sendgrid(system, ids[a[6]], a[6]) == 200
    assert await generic(system, "complaint", ids[a[7]]) == 200
    for _ in range(2):
        assert await generic(system, "bounce", ids[a[0]], token="a-wrong-token-0123456789abcdef") == 401
    for _ in range(3):
        assert await sendgrid(system, ids[a[0]], a[0], forged=True) == 401
    unsubscribe = copies[a[8]].unsubscribe
    assert unsubscribe is not None
    async with http.post(unsubscribe, data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 200

    # Copies to the recipient who unsubscribed and to the one who complained are withheld.
    async def suppressions_recorded() -> bool:
        return await suppressions_recorded_total(system) >= 2

    await eventually(suppressions_recorded, within=30, interval=0.2)
    await asyncio.sleep(1.0)  # the proxy's mirror of the suppression bucket follows within milliseconds
    assert await asyncio.to_thread(refused_data, smtp, message(news, [a[7], a[8]]), [a[7], a[8]]) == 550

    # Pausing the Campaign: the operator writes it to the bucket, the proxy defers its mail.
    await Kubectl(system.kube, http).patch(A.namespace, A.name, {"spec": {"paused": True}})

    async def paused() -> bool:
        spec = await kv_spec(nats_url, A)
        return spec is not None and spec.paused

    await eventually(paused, within=30, interval=0.2)
    await asyncio.sleep(1.0)
    assert await asyncio.to_thread(refused_data, smtp, message(news, [a[9]]), [a[9]]) == 451


async def suppressions_recorded_total(system: System) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with system.http.get(f"{system.url('aggregator')}/metrics") as response:
        text = await response.text()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "mailbeacon_aggregator_suppressions_recorded"
        for s in f.samples
        if s.name.endswith("_total")
    )


async def engagements(system: System) -> list[dict[str, Any]]:
    """Every stored open and click of the two campaigns, from the events API."""
    found: list[dict[str, Any]] = []
    for key in CAMPAIGNS:
        for event_type in ("opened", "clicked"):
            url = f"{system.url('aggregator')}/api/campaigns/{key}/events"
            async with system.http.get(url, params={"type": event_type, "limit": "500"}) as response:
                page = await response.json()
            assert page["next_cursor"] is None
            found += page["events"]
    return found


async def test_every_panel_shows_what_happened_and_the_alert_rules_fire(
    system: System, nats_url: str, tmp_path: Path
) -> None:
    from tests.dashboard_expectations import Expected, check_panels, expected_alerts

    started = time.monotonic()
    http = system.http
    values = yaml.safe_load(yaml.safe_dump(PRODUCTION))
    values["metrics"]["prometheusRule"].update(LOW_VOLUME)
    docs = manifests(render(values))
    local = {c: f"127.0.0.1:{system.ports[c]}" for c in ("tracker", "aggregator", "operator", "proxy")}
    scrape = scrape_configs(docs, local, NAMESPACE)
    assert sorted(c["job_name"] for c in scrape) == [f"mb-mailbeacon-{c}" for c in sorted(local)]
    (config_map,) = (
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
    )
    dashboard = json.loads(config_map["data"]["mailbeacon.json"])
    prometheus = PrometheusServer(tmp_path / "prometheus", scrape, immediate_rules(docs))
    await prometheus.start(http)
    try:
        await Kubectl(system.kube, http).apply(campaign_manifest(minDelivered=5))
        await campaign_apply(system, nats_url, B)

        # Both campaigns' event counters exist at 0 before the first event, so increase() sees it.
        async def counters_at_zero() -> bool:
            zero = await prometheus.query(
                http, 'count(mailbeacon_events_total{campaign=~"marketing/newsletter|default/receipts"} == 0)'
            )
            guardrail = await prometheus.query(
                http, f'mailbeacon_campaign_guardrail_min_volume{{campaign="{A}"}}'
            )
            return bool(zero) and float(zero[0]["value"][1]) == 18 and bool(guardrail)

        await eventually(counters_at_zero, within=60, interval=0.5)
        await asyncio.sleep(2.0)
        t0 = time.time()
        await traffic(system, nats_url)

        stats: dict[CampaignKey, dict[str, Any]] = {}

        async def settled() -> bool:
            for key in CAMPAIGNS:
                stats[key] = await system.statistics(key)
            a, b = stats[A], stats[B]
            assert (a["sent_count"], a["failed_count"], a["delivered_count"], a["total_clicks"]) == (
                10,
                2,
                8,
                4,
            )
            assert (a["bounced_count"], a["complained_count"], a["unsubscribed_count"], a["total_opens"]) == (
                2,
                1,
                1,
                4,
            )
            assert (b["sent_count"], b["failed_count"], b["delivered_count"], b["bounced_count"]) == (
                5,
                1,
                4,
                1,
            )
            return True

        await eventually(settled, within=60, interval=0.5)
        expected = Expected(stats={str(k): v for k, v in stats.items()}, events=await engagements(system))

        # The campaign gauges are read from the database every 10 s; the operator's pause follows.
        async def scraped() -> bool:
            for key in CAMPAIGNS:
                for state in ("sent", "failed", "delivered", "bounced", "complained", "unsubscribed"):
                    result = await prometheus.query(
                        http, f'max(mailbeacon_campaign_messages{{campaign="{key}",state="{state}"}})'
                    )
                    assert result and float(result[0]["value"][1]) == stats[key][f"{state}_count"], (
                        key,
                        state,
                    )
            paused = await prometheus.query(http, f'mailbeacon_campaign_paused{{campaign="{A}"}}')
            assert paused and float(paused[0]["value"][1]) == 1
            return True

        await eventually(scraped, within=60, interval=1.0)
        await asyncio.sleep(3.0)  # every process counter scraped at its final value
        at = time.time()
        window = math.ceil(at - t0) + 1
        variables = {
            "$namespace": NAMESPACE,
            "$job": ".*",
            "$campaign": ".*",
            "$__rate_interval": f"{window}s",
            "$__interval": "1s",
            "$__range": f"{window}s",
            **{
                f"${v['name']}": v["query"]
                for v in dashboard["templating"]["list"]
                if v["type"] == "constant"
            },
        }
        results = []
        for panel, target in panel_targets(dashboard):
            expr = substitute(target["expr"], variables)
            results.append((panel["title"], target["refId"], expr, await prometheus.query(http, expr, at)))
        checked = check_panels(results, expected, window, NO_DATA_EXPECTED)
        assert checked == len(results) >= 50

        async def alerting() -> set[tuple[str, str]]:
            firing = {
                (
                    alert["labels"]["alertname"],
                    alert["labels"].get("campaign") or alert["labels"].get("provider", ""),
                )
                for alert in await prometheus.alerts(http)
                if alert["state"] == "firing"
            }
            assert firing == expected_alerts(str(A), str(B)), firing
            return firing

        await eventually(alerting, within=30, interval=1.0)
    finally:
        await prometheus.stop()
    print(f"{len(results)} panel queries checked in {time.monotonic() - started:.1f} s")
