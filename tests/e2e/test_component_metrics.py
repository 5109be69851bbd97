"""Each component's metrics on its own port, and what the tracker counts per request.

`mailbeacon up` runs every component in one process; before, one registry was served on
both the tracker's and the aggregator's /metrics (scraping both, as the README said, doubled
every sum) and the proxy's HTTP port was not served at all.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
from email.message import EmailMessage
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mailbeacon.app.runner import AllInOne
from mailbeacon.contract.signing import click_url
from tests.esp_payloads.harness import BROWSER_UA, TRACKING_ID, running_tracker
from tests.support import SECRET, SmtpSink, eventually, make_settings, metric_value

# Process-wide collectors (the process, not a component) and the per-target build info.
PROCESS_WIDE = ("process_", "python_")


def families(exposition: str) -> dict[str, set[str]]:
    """Family name -> the names of its samples."""
    return {
        family.name: {s.name for s in family.samples} for family in text_string_to_metric_families(exposition)
    }


def send(port: int) -> None:
    message = EmailMessage()
    message["From"] = "news@shop.example.com"
    message["To"] = "ann@example.com"
    message["Subject"] = "Ports"
    message["X-Campaign"] = "ports"
    message.set_content("Hello https://shop.example.com/")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(message)


async def test_up_serves_each_components_metrics_on_its_own_port(tmp_path: Path, sink: SmtpSink) -> None:
    settings = make_settings(tmp_path, upstream_smtp=sink.url)
    system = AllInOne(settings)
    addresses = await system.start()
    try:
        await asyncio.to_thread(send, int(addresses.smtp.rsplit(":", 1)[1]))
        ports = {
            "proxy": addresses.proxy_http,
            "tracker": addresses.tracker,
            "aggregator": addresses.aggregator,
        }
        async with aiohttp.ClientSession() as http:

            async def scraped() -> dict[str, str]:
                texts = {}
                for component, base in ports.items():
                    async with http.get(f"{base}/metrics") as response:
                        assert response.status == 200
                        texts[component] = await response.text()
                sent = sum(
                    metric_value(text, "mailbeacon_events_total", campaign="default/ports", type="sent")
                    for text in texts.values()
                )
                assert sent == 1  # counted once, whichever targets Prometheus scrapes
                return texts

            texts = await eventually(scraped)
    finally:
        await system.stop()
    owners: dict[str, str] = {}
    for component, text in texts.items():
        build = [
            s.labels["component"]
            for f in text_string_to_metric_families(text)
            if f.name == "mailbeacon_build_info"
            for s in f.samples
        ]
        assert build == [component]
        for name in families(text):
            if name.startswith(PROCESS_WIDE) or name == "mailbeacon_build_info":
                continue
            assert name not in owners, f"{name} on the {owners.get(name)} and the {component} port"
            owners[name] = component
    assert {n.split("_")[1] for n, c in owners.items() if c == "proxy"} == {"proxy"}
    assert {n.split("_")[1] for n, c in owners.items() if c == "tracker"} == {"tracker"}
    assert "mailbeacon_events" in owners and owners["mailbeacon_events"] == "aggregator"


async def test_tracker_requests_carry_the_status_they_were_answered(tmp_path: Path, nats_url: str) -> None:
    async with (
        running_tracker(tmp_path, nats_url, webhook_token="generic-webhook-token-0123456789") as tracker,
        aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http,
    ):
        site = tracker.settings.site_url

        async def metrics() -> str:
            async with http.get(f"{site}/metrics") as response:
                return await response.text()

        def count(text: str, kind: str, status: str) -> float:
            return metric_value(text, "mailbeacon_tracker_requests_total", kind=kind, status=status)

        before = await metrics()
        # Present at zero before anything happened: rate() sees the first one.
        for kind, status in (("pixel", "400"), ("click_forged", "400"), ("webhook_generic_bounce", "401")):
            assert f'mailbeacon_tracker_requests_total{{kind="{kind}",status="{status}"}}' in before
        link = click_url(site, [SECRET.encode()], TRACKING_ID, "https://shop.example.com/")
        answers = []
        for method, url, body in (
            ("GET", f"{site}/track/pixel/{TRACKING_ID}/", None),
            ("GET", f"{site}/track/pixel/not-a-uuid/", None),
            ("GET", link.replace("sig=", "sig=0"), None),
            ("GET", link, None),
            ("POST", f"{site}/track/bounce/", json.dumps({"tracking_id": TRACKING_ID}).encode()),
        ):
            headers = (
                {"Authorization": "Bearer wrong-token", "Content-Type": "application/json"} if body else {}
            )
            async with http.request(
                method, url, data=body, headers=headers, allow_redirects=False
            ) as response:
                answers.append(response.status)
        assert answers == [200, 400, 400, 302, 401]
        after = await metrics()
        for kind, status in (
            ("pixel", "200"),
            ("pixel", "400"),
            ("click_forged", "400"),
            ("click", "302"),
            ("webhook_generic_bounce", "401"),
        ):
            assert count(after, kind, status) - count(before, kind, status) == 1, (kind, status)
        refused = ("mailbeacon_tracker_webhooks_total", {"provider": "generic", "outcome": "refused"})
        assert (
            metric_value(after, refused[0], **refused[1]) - metric_value(before, refused[0], **refused[1])
            == 1
        )
