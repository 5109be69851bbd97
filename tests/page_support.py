"""Driving the aggregator's pages in headless Chromium (Debian's chromium, playwright; never
``playwright install``): the browser, what its console says about the Content-Security-Policy,
the numbers a page shows, and axe-core's accessibility check."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
NEEDS_CHROMIUM = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    playwright_api = pytest.importorskip("playwright.async_api")
    ARTIFACTS.mkdir(exist_ok=True)
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


def csp_violations(page: Any) -> list[str]:
    """Chromium reports what a Content-Security-Policy blocked on the console: collected here."""
    found: list[str] = []
    page.on(
        "console",
        lambda message: found.append(message.text) if "Content Security Policy" in message.text else None,
    )
    return found


async def styled(page: Any) -> bool:
    """Whether the site's stylesheet applies (the header's colour comes only from it)."""
    colour = await page.evaluate("getComputedStyle(document.querySelector('header')).backgroundColor")
    return bool(colour == "rgb(20, 33, 61)")


async def metrics_on(page: Any) -> dict[str, str]:
    values = {}
    for element in await page.query_selector_all("[data-metric]"):
        values[await element.get_attribute("data-metric")] = (await element.inner_text()).strip()
    return values


async def serious_accessibility_problems(page: Any) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now (axe-core comes
    inside the axe-playwright-python package: nothing is downloaded)."""
    axe_api = pytest.importorskip("axe_playwright_python.async_playwright")
    results = await axe_api.Axe().run(page)
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at " + ", ".join(str(n["target"]) for n in v["nodes"][:5])
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
