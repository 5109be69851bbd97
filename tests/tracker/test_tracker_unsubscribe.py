"""Unsubscribe (GET changes nothing, POST records it) and privacy of what the tracker publishes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from mailbeacon.contract.signing import click_url, pixel_url, unsubscribe_url
from tests.esp_payloads.harness import BROWSER_UA, post, running_tracker, sendgrid_headers, stream_events
from tests.support import SECRET, eventually, raw_http

TID = "9d1f3c1e-8b0a-4e7e-a3c4-2b6f0e9d7a10"
OTHER = "9d1f3c1e-8b0a-4e7e-a3c4-2b6f0e9d7a11"


async def test_get_shows_a_confirmation_and_changes_nothing(tmp_path: Path, nats_url: str) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        url = unsubscribe_url(tracker.settings.site_url, TID)
        for _ in range(3):  # a link scanner following the link, twice, and a person looking
            async with http.get(url) as response:
                page = await response.text()
                assert response.status == 200 and response.content_type == "text/html"
                assert '<form method="post"' in page and "Unsubscribe" in page
                assert response.headers["Cache-Control"] == "no-store"
        async with http.head(url) as response:
            assert response.status == 200
        async with http.get(unsubscribe_url(tracker.settings.site_url, "not-a-uuid")) as response:
            assert response.status == 400
        await asyncio.sleep(0.3)
    assert await stream_events(nats_url) == []


async def test_the_page_names_the_list_only_when_the_link_carries_it_signed(
    tmp_path: Path, nats_url: str
) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        site, keys = tracker.settings.site_url, tracker.settings.signing_keys()
        url = unsubscribe_url(site, TID, keys, "Spring <b>Sale</b>")
        async with http.get(url) as response:
            page = await response.text()
            assert "<h1>Unsubscribe from Spring &lt;b&gt;Sale&lt;/b&gt;?</h1>" in page
            assert "stop receiving <strong>Spring &lt;b&gt;Sale&lt;/b&gt;</strong>" in page
            # The button posts to the same link, so the answer names the list as well.
            action = page.split('action="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
        async with http.post(site + action, data={"confirm": "page"}) as response:
            assert "not receive <strong>Spring &lt;b&gt;Sale&lt;/b&gt;</strong>" in await response.text()
        for forged in (
            url.replace("Spring", "Summer"),  # another name under the same signature
            unsubscribe_url(site, OTHER, keys, "Spring <b>Sale</b>").replace(OTHER, TID),  # another copy's
            url.split("&sig=")[0],  # no signature
        ):
            async with http.get(forged) as response:
                page = await response.text()
                assert response.status == 200 and "Unsubscribe from these emails?" in page
                assert "Sale" not in page and "Summer" not in page


async def test_post_one_click_and_button_record_one_unsubscribe_never_a_click(
    tmp_path: Path, nats_url: str
) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        site = tracker.settings.site_url
        # RFC 8058: the mailbox provider POSTs List-Unsubscribe=One-Click, form-encoded ...
        async with http.post(unsubscribe_url(site, TID), data={"List-Unsubscribe": "One-Click"}) as response:
            assert response.status == 200 and "You are unsubscribed" in await response.text()
        # ... or as multipart/form-data; a repeated request is the same unsubscribe.
        form = aiohttp.FormData()
        form.add_field("List-Unsubscribe", "One-Click")
        form.add_field("filler", b"x", filename="x.txt")  # forces multipart/form-data
        async with http.post(unsubscribe_url(site, TID), data=form) as response:
            assert response.status == 200
        # The confirmation page's button.
        async with http.get(unsubscribe_url(site, OTHER)) as page:
            assert 'name="confirm"' in await page.text()
        async with http.post(unsubscribe_url(site, OTHER), data={"confirm": "page"}) as response:
            assert response.status == 200
        # A POST that asks for nothing changes nothing.
        async with http.post(unsubscribe_url(site, OTHER), data={"something": "else"}) as response:
            assert response.status == 400

        async def stored() -> list[object]:
            events = await stream_events(nats_url)
            assert len(events) == 2
            return events

        events = await eventually(stored)
    assert {(e.type.value, e.tracking_id, e.source, e.metadata["via"]) for e in events} == {  # type: ignore[attr-defined]
        ("unsubscribed", TID, "unsubscribe", "one_click"),
        ("unsubscribed", OTHER, "unsubscribe", "page"),
    }


@pytest.mark.slow
async def test_anonymized_addresses_and_trusted_proxies(tmp_path: Path, nats_url: str) -> None:
    keys = [SECRET.encode()]
    async with (
        running_tracker(tmp_path, nats_url, anonymize_ip=True, trusted_proxies="127.0.0.0/8") as tracker,
        aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http,
    ):
        site = tracker.settings.site_url
        for forwarded in ("198.51.100.77", "2001:db8:1234:5678::1", "192.0.2.9, 127.0.0.5"):
            async with http.get(pixel_url(site, TID), headers={"X-Forwarded-For": forwarded}) as response:
                assert response.status == 200
        url = click_url(site, keys, TID, "https://shop.example.com/")
        async with http.get(
            url, headers={"X-Forwarded-For": "203.0.113.200"}, allow_redirects=False
        ) as response:
            assert response.status == 302
        record = {
            "event": "open",
            "email": "ann@example.com",
            "timestamp": 1764237600,
            "sg_event_id": "privacy-1",
            "ip": "198.51.100.23",
            "useragent": BROWSER_UA,
        }
        body = json.dumps([record]).encode()
        status, _ = await post(http, f"{tracker.url}/webhooks/sendgrid", body, sendgrid_headers(body))
        assert status == 200

        async def stored() -> list[object]:
            events = await stream_events(nats_url)
            assert len(events) == 5
            return events

        events = await eventually(stored)
    by_source = sorted((e.source, e.ip) for e in events)  # type: ignore[attr-defined]
    assert by_source == [
        ("click", "203.0.113.0"),
        ("pixel", "192.0.2.0"),  # the ingress (127.0.0.5) is trusted; the client before it is kept
        ("pixel", "198.51.100.0"),
        ("pixel", "2001:db8:1234::"),
        ("webhook:sendgrid", "198.51.100.0"),
    ]
    webhook = next(e for e in events if e.source == "webhook:sendgrid")  # type: ignore[attr-defined]
    assert webhook.metadata["payload"]["ip"] == "198.51.100.0"  # type: ignore[attr-defined]


async def test_forwarded_for_is_ignored_from_untrusted_peers(tmp_path: Path, nats_url: str) -> None:
    async with running_tracker(tmp_path, nats_url) as tracker, aiohttp.ClientSession() as http:
        async with http.get(
            pixel_url(tracker.settings.site_url, TID), headers={"X-Forwarded-For": "17.58.63.2"}
        ) as response:
            assert response.status == 200
        (event,) = await eventually(lambda: stream_events(nats_url))
    assert event.ip == "127.0.0.1"  # a client cannot claim another address (or Apple's)


async def test_unsubscribe_with_a_user_agent_that_is_not_utf8_is_stored(
    tmp_path: Path, nats_url: str
) -> None:
    """The recipient is told "unsubscribed": the event must reach the stream, not be dropped
    by the publisher because aiohttp kept the header's bytes as lone surrogates."""
    async with running_tracker(tmp_path, nats_url) as tracker:
        port, site = int(tracker.url.rsplit(":", 1)[1]), tracker.settings.site_url
        path = unsubscribe_url(site, TID).removeprefix(site).encode()
        form = b"List-Unsubscribe=One-Click"
        answer = await raw_http(
            port,
            b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nUser-Agent: Mozilla \xff\xfe\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: " + str(len(form)).encode() + b"\r\nConnection: close\r\n\r\n" + form,
        )
        assert answer.startswith(b"HTTP/1.1 200") and b"You are unsubscribed" in answer

        async def stored() -> list[object]:
            events = await stream_events(nats_url)
            assert len(events) == 1
            return events

        (event,) = await eventually(stored, within=10)
    assert (event.type.value, event.tracking_id, event.user_agent) == (  # type: ignore[attr-defined]
        "unsubscribed",
        TID,
        "Mozilla \ufffd\ufffd",
    )
