"""Click links whose destination holds control characters: refused, never redirected to."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from mailbeacon.contract.signing import click_url
from tests.esp_payloads.harness import BROWSER_UA, running_tracker
from tests.support import SECRET

TID = "2c8f4e6a-1b3d-4f5e-9a7c-8d0e2f4a6b1c"
CONTROLLED = [
    "https://shop.example.com/\x00",
    "https://shop.example.com/a\r\nSet-Cookie: session=stolen",  # header splitting
    "https://shop.example.com/\ttab",
    "https://shop.example.com/\x1b[31m",
    "https://shop.example.com/\x7f",
    "https://shop.example.com/?q=%00",  # stays percent-encoded: a valid destination
]


async def test_destinations_with_control_characters_are_400_without_a_redirect(
    tmp_path: Path, nats_url: str
) -> None:
    keys = [SECRET.encode()]
    answers: list[tuple[int, str, str | None]] = []
    async with (
        running_tracker(tmp_path, nats_url) as tracker,
        aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http,
    ):
        site = tracker.settings.site_url
        for destination in CONTROLLED:
            # Signed like a real link, so the refusal is about the destination, not the signature.
            link = click_url(site, keys, TID, destination)
            assert quote(destination, safe="") in link  # the control characters travel percent-encoded
            async with http.get(link, allow_redirects=False) as response:
                answers.append((response.status, response.content_type, response.headers.get("Location")))
    assert answers[:-1] == [(400, "text/html", None)] * (len(CONTROLLED) - 1)
    assert (answers[-1][0], answers[-1][2]) == (302, CONTROLLED[-1])


@pytest.mark.parametrize("character", ["\x00", "\x1f", "\x7f", "\n"])
async def test_an_unsigned_destination_with_control_characters_is_refused_too(
    tmp_path: Path, nats_url: str, character: str
) -> None:
    async with (
        running_tracker(tmp_path, nats_url) as tracker,
        aiohttp.ClientSession() as http,
        http.get(
            f"{tracker.settings.site_url}/track/click/{TID}/",
            params={"url": f"https://shop.example.com/{character}", "sig": "x"},
            allow_redirects=False,
        ) as response,
    ):
        assert response.status == 400
        assert "Location" not in response.headers
