"""With ANONYMIZE_IP on, no full client address leaves the tracker: not in ``ip``, not in a
verdict's evidence, not in a provider's payload or a bounce diagnostic."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import aiohttp
import pytest

from mailbeacon.contract.events import Event
from mailbeacon.contract.netaddr import anonymize_ip, anonymize_text, normalize_ip, scrub_ips
from mailbeacon.contract.signing import click_url, pixel_url
from tests.esp_payloads.harness import BROWSER_UA, post, running_tracker, sendgrid_headers, stream_events
from tests.support import SECRET, eventually, make_settings
from tracker.engagement.privacy import client_ip
from tracker.service import StandaloneTracker

TID = "5e2b7c1a-3d4f-4a6b-8c9d-0e1f2a3b4c5d"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.77", ipaddress.ip_address("198.51.100.77")),
        ("::ffff:198.51.100.77", ipaddress.ip_address("198.51.100.77")),  # dual-stack socket
        ("fe80::1%eth0", ipaddress.ip_address("fe80::1")),
        ("2001:db8::1", ipaddress.ip_address("2001:db8::1")),
        ("unix-socket", None),
        ("", None),
    ],
)
def test_one_normalisation_of_client_addresses(text: str, expected: object) -> None:
    assert normalize_ip(text) == expected


def test_mapped_addresses_are_one_client_everywhere() -> None:
    assert anonymize_ip("::ffff:198.51.100.77") == anonymize_ip("198.51.100.77") == "198.51.100.0"
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_ip("::ffff:10.1.2.3", "::ffff:198.51.100.77", trusted) == "198.51.100.77"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("image fetched from Apple's network 17.58.63.12", "image fetched from Apple's network 17.58.63.0"),
        ("address 2001:db8:1:2::7 is in MACHINE_IP_RANGES", "address 2001:db8:1:: is in MACHINE_IP_RANGES"),
        ("smtp; 550 5.7.1 [192.0.2.77] blocked", "smtp; 550 5.7.1 [192.0.2.0] blocked"),
        ("from ::ffff:198.51.100.9", "from 198.51.100.0"),
        ("at 10:30:00, version 1.2.3 and 1.2.3.4.5", "at 10:30:00, version 1.2.3 and 1.2.3.4.5"),
        ("Mozilla/5.0 (X11)", "Mozilla/5.0 (X11)"),
        # A dotted quad with its port, or ending a clause; IPv6 next to colons still found.
        ("relay 192.0.2.1:25 refused", "relay 192.0.2.0:25 refused"),
        ("connect to 192.0.2.1: timed out", "connect to 192.0.2.0: timed out"),
        ("via [2001:db8:1:2::7]:25 and 2001:db8:1:2::7", "via [2001:db8:1::]:25 and 2001:db8:1::"),
    ],
)
def test_addresses_quoted_in_text_are_anonymized(text: str, expected: str) -> None:
    assert anonymize_text(text) == expected


def test_payloads_are_scrubbed_to_the_last_string() -> None:
    payload = {"ip": "198.51.100.23", "nested": [{"note": "seen from 203.0.113.9"}], "count": 3}
    assert scrub_ips(payload) == {
        "ip": "198.51.100.0",
        "nested": [{"note": "seen from 203.0.113.0"}],
        "count": 3,
    }


FULL_ADDRESSES = ["17.58.63.12", "198.51.100.77", "203.0.113.45", "192.0.2.200", "2001:db8:1:2::7"]


async def test_no_full_client_address_leaves_the_tracker(tmp_path: Path, nats_url: str) -> None:
    async with (
        running_tracker(
            tmp_path,
            nats_url,
            anonymize_ip=True,
            trusted_proxies="127.0.0.0/8",
            machine_ip_ranges="198.51.100.0/24,2001:db8:1::/48",
            click_burst_seconds=0.1,
        ) as tracker,
        aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http,
    ):
        site = tracker.settings.site_url
        # Apple's network (open) and an operator's scanner range (click, IPv4 and IPv6).
        async with http.get(pixel_url(site, TID), headers={"X-Forwarded-For": "17.58.63.12"}) as response:
            assert response.status == 200
        for forwarded, page in (("198.51.100.77", "a"), ("2001:db8:1:2::7", "b")):
            link = click_url(site, [SECRET.encode()], TID, f"https://shop.example.com/{page}")
            async with http.get(
                link, headers={"X-Forwarded-For": forwarded}, allow_redirects=False
            ) as response:
                assert response.status == 302
        record = {
            "event": "open",
            "email": "ann@example.com",
            "timestamp": 1764237600,
            "sg_event_id": "privacy-evidence-1",
            "ip": "198.51.100.77",  # in MACHINE_IP_RANGES: the verdict's evidence quotes it
            "useragent": BROWSER_UA,
            "note": "relayed by 203.0.113.45",
        }
        body = json.dumps([record]).encode()
        status, _ = await post(http, f"{tracker.url}/webhooks/sendgrid", body, sendgrid_headers(body))
        assert status == 200
        bounce = {"tracking_id": TID, "reason": "550 rejected by [192.0.2.200]", "client_ip": "203.0.113.45"}
        async with http.post(f"{site}/track/bounce/", json=bounce) as response:
            assert response.status == 200

        async def stored() -> list[Event]:
            events = await stream_events(nats_url)
            assert len(events) == 5
            return events

        events = await eventually(stored)
    kinds = sorted((e.source, e.machine_kind) for e in events)
    assert kinds == [
        ("click", "security_scanner"),
        ("click", "security_scanner"),
        ("pixel", "apple_privacy_proxy"),
        ("webhook:generic", None),
        ("webhook:sendgrid", "security_scanner"),
    ]
    stored_json = "\n".join(e.to_json().decode() for e in events)
    for full in FULL_ADDRESSES:
        assert full not in stored_json
    assert "17.58.63.0" in stored_json and "2001:db8:1::" in stored_json  # kept, anonymized


async def test_the_nats_password_is_never_logged(
    tmp_path: Path, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with_password = nats_url.replace("nats://", "nats://tracker:hunter2-secret@")
    caplog.set_level("DEBUG")
    tracker = StandaloneTracker(make_settings(tmp_path, nats_url=with_password))
    await tracker.start()
    try:

        async def attached() -> bool:
            return "connected to NATS" in caplog.text

        await eventually(attached)
    finally:
        await tracker.stop()
    assert "hunter2-secret" not in caplog.text
    assert "nats://***@127.0.0.1" in caplog.text
