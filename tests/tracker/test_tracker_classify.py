"""Human or machine: the classifier's rules, the burst window, and real requests against a tracker."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbeacon.contract.events import Event
from mailbeacon.contract.signing import HONEYPOT_URL, click_url, honeypot_url, pixel_url
from tests.esp_payloads.harness import BROWSER_UA, running_tracker, stream_events
from tests.support import SECRET, eventually
from tracker.classify import RequestShape, classify
from tracker.engagement.bursts import BurstWindow, ClickHold

TID = "5f0c6a56-2f7e-4b64-9a55-0d3c1c2f1e11"
OTHER_TID = "5f0c6a56-2f7e-4b64-9a55-0d3c1c2f1e12"
SAFARI = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"


@pytest.mark.parametrize(
    ("kind", "shape", "expected"),
    [
        ("open", RequestShape("GET", BROWSER_UA, "198.51.100.7"), None),
        ("click", RequestShape("GET", SAFARI, "198.51.100.7"), None),
        ("click", RequestShape("HEAD", BROWSER_UA, "198.51.100.7"), "head_request"),
        (
            "click",
            RequestShape("GET", BROWSER_UA, "198.51.100.7", {"Sec-Purpose": "prefetch;prerender"}),
            "prefetch",
        ),
        ("open", RequestShape("GET", BROWSER_UA, "198.51.100.7", {"X-Moz": "prefetch"}), "prefetch"),
        ("open", RequestShape("GET", "Mozilla/5.0", "17.58.63.2"), "apple_privacy_proxy"),
        (
            "open",
            RequestShape("GET", "Mozilla/5.0", "104.28.40.1"),
            "apple_privacy_proxy",
        ),  # Private Relay egress
        ("open", RequestShape("GET", SAFARI, "17.58.63.2"), "apple_privacy_proxy"),
        ("click", RequestShape("GET", SAFARI, "17.58.63.2"), None),  # a person at Apple clicking is a person
        ("open", RequestShape("GET", GMAIL_PROXY, "66.249.84.1"), "image_proxy"),
        (
            "click",
            RequestShape("GET", "Mozilla/5.0 (compatible; Barracuda Sentinel)", "203.0.113.9"),
            "security_scanner",
        ),
        ("click", RequestShape("GET", "python-requests/2.31.0", "203.0.113.9"), "security_scanner"),
        (
            "click",
            RequestShape("GET", "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "3.1.1.1"),
            "link_preview",
        ),
        ("click", RequestShape("GET", None, "203.0.113.9"), "no_user_agent"),
    ],
)
def test_request_shapes(kind: str, shape: RequestShape, expected: str | None) -> None:
    verdict = classify(kind, shape)  # type: ignore[arg-type]
    assert verdict.machine_kind == expected
    assert verdict.machine is (expected is not None)
    assert bool(verdict.evidence) is (expected is not None)


def test_operator_ranges_mark_a_mail_gateway() -> None:
    import ipaddress

    gateway = [ipaddress.ip_network("192.0.2.0/24")]
    assert (
        classify("click", RequestShape("GET", BROWSER_UA, "192.0.2.50"), gateway).machine_kind
        == "security_scanner"
    )
    assert classify("click", RequestShape("GET", BROWSER_UA, "192.0.3.50"), gateway).machine is False


def test_burst_window_groups_links_of_one_message() -> None:
    window: BurstWindow[str] = BurstWindow(window=1.0)
    window.add(TID, "https://a.example/", "first", now=10.0)
    window.add(TID, "https://b.example/", "second", now=10.3)
    window.add(TID, "https://c.example/", "third", now=10.6)
    assert window.due(now=11.5) == []  # still within a second of the last click
    [(clicks, verdict)] = window.due(now=11.7)
    assert clicks == ["first", "second", "third"]
    assert verdict is not None and verdict.machine_kind == "burst"
    assert "3 different links" in (verdict.evidence or "")


def test_a_person_clicking_twice_is_not_a_burst() -> None:
    window: BurstWindow[str] = BurstWindow(window=1.0)
    window.add(TID, "https://a.example/", "click", now=0.0)
    window.add(TID, "https://a.example/", "double click", now=0.4)  # on the same link
    released = window.due(now=5.0)
    released += window.add(TID, "https://b.example/", "later", now=6.0)  # came back for another link
    released += window.due(now=7.5)
    assert released == [(["click", "double click"], None), (["later"], None)]
    assert window.pending == 0


class WindowModel:
    """The burst window's rules written plainly, to hold the real one to them."""

    def __init__(self, window: float, max_hold: float) -> None:
        self.window, self.max_hold = window, max_hold
        self.groups: dict[str, dict[str, Any]] = {}  # least recently clicked first

    def add(self, key: str, url: str, item: int, now: float) -> list[tuple[list[int], str | None]]:
        released = []
        group = self.groups.get(key)
        if group and (now - group["last"] > self.window or now - group["first"] > self.max_hold):
            released.append(self.release(key))
            group = None
        group = group or {"first": now, "urls": set(), "items": []}
        group["last"] = now
        group["urls"].add(url)
        group["items"].append(item)
        self.groups.pop(key, None)
        self.groups[key] = group
        return released

    def due(self, now: float, limit: int) -> list[tuple[list[int], str | None]]:
        released = []
        for key, group in list(self.groups.items()):
            if len(released) == limit or (
                now - group["last"] < self.window and now - group["first"] < self.max_hold
            ):
                break
            released.append(self.release(key))
        return released

    def release(self, key: str) -> tuple[list[int], str | None]:
        group = self.groups.pop(key)
        urls = group["urls"]
        kind = None if len(urls) == 1 else "honeypot" if HONEYPOT_URL in urls else "burst"
        return group["items"], kind


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["click", "click", "click", "due"]),
            st.sampled_from([TID, OTHER_TID, "third-copy"]),
            st.sampled_from(["https://a.example/", "https://b.example/", HONEYPOT_URL]),
            st.floats(min_value=0, max_value=1.5),  # seconds since the step before
        ),
        max_size=60,
    ),
    window=st.sampled_from([0.5, 1.0, 3.0]),
    limit=st.integers(min_value=1, max_value=3),
)
def test_the_burst_window_follows_its_rules(
    steps: list[tuple[str, str, str, float]], window: float, limit: int
) -> None:
    """Any sequence of clicks and releases: the same groups, in the same order, with the
    same verdicts as the plain rules."""
    real: BurstWindow[int] = BurstWindow(window=window, max_hold=2.0)
    model = WindowModel(window, max_hold=2.0)
    now, got, expected = 100.0, [], []
    for number, (step, key, url, pause) in enumerate(steps):
        now += pause
        if step == "click":
            got += real.add(key, url, number, now)
            expected += model.add(key, url, number, now)
        else:
            got += real.due(now, limit)
            expected += model.due(now, limit)
        assert real.pending == sum(len(group["items"]) for group in model.groups.values())
    got += real.drain()
    expected += [model.release(key) for key in list(model.groups)]
    assert [(items, verdict and verdict.machine_kind) for items, verdict in got] == expected


async def test_a_busy_second_of_held_clicks_is_released_between_requests() -> None:
    """Thousands of clicks fall due together on a busy tracker; releasing them all in one
    turn of the event loop would stall every connection, so requests get turns in between."""
    released: list[str] = []
    hold: ClickHold[str] = ClickHold(lambda item, _verdict: released.append(item), window=0.05)
    for number in range(1000):
        hold.add(f"copy-{number}", "https://a.example/", f"click-{number}")
    seen = [0]
    async with asyncio.timeout(5):
        while len(released) < 1000:
            await asyncio.sleep(0)  # a turn of the loop, as a request handled meanwhile gets
            seen.append(len(released))
    steps = [later - earlier for earlier, later in itertools.pairwise(seen)]
    assert max(steps) <= 256
    assert released == [f"click-{number}" for number in range(1000)]  # oldest first, none lost
    assert hold.pending == 0


def test_honeypot_marks_the_whole_group_and_drain_releases_everything() -> None:
    window: BurstWindow[str] = BurstWindow(window=1.0)
    window.add(TID, "https://a.example/", "link", now=0.0)
    window.add(TID, HONEYPOT_URL, "honeypot", now=0.1)
    window.add(OTHER_TID, "https://a.example/", "elsewhere", now=0.2)
    [(clicks, verdict), (other, none)] = window.drain()
    assert (clicks, verdict and verdict.machine_kind) == (["link", "honeypot"], "honeypot")
    assert (other, none) == (["elsewhere"], None)
    assert window.pending == 0


@pytest.mark.slow
async def test_real_request_shapes_against_the_tracker(tmp_path: Path, nats_url: str) -> None:
    """HEAD, an Apple proxy address, a scanner burst and the honeypot are machine; a browser click is human."""
    apple, scanner, person, crawler, checker = (
        "4a4cf3d1-2a0e-4c36-b2a8-8e5d3d8d0a01",
        "4a4cf3d1-2a0e-4c36-b2a8-8e5d3d8d0a02",
        "4a4cf3d1-2a0e-4c36-b2a8-8e5d3d8d0a03",
        "4a4cf3d1-2a0e-4c36-b2a8-8e5d3d8d0a04",
        "4a4cf3d1-2a0e-4c36-b2a8-8e5d3d8d0a05",
    )
    keys = [SECRET.encode()]
    links = ["https://shop.example.com/a", "https://shop.example.com/b", "https://shop.example.com/c"]
    # The tracker sits behind an ingress on 127.0.0.1 that reports the real client address.
    async with running_tracker(tmp_path, nats_url, trusted_proxies="127.0.0.1/32") as tracker:
        site = tracker.settings.site_url
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as browser:
            async with browser.get(
                click_url(site, keys, person, links[0]), allow_redirects=False
            ) as response:
                assert (response.status, response.headers["Location"]) == (302, links[0])
            async with browser.get(pixel_url(site, person)) as response:
                assert response.status == 200
            # A link checker asking for headers only (on another copy: two different links of
            # one message within a second would be a burst).
            async with browser.head(
                click_url(site, keys, checker, links[1]), allow_redirects=False
            ) as response:
                assert response.status == 302
        async with (
            aiohttp.ClientSession(
                headers={"User-Agent": "Mozilla/5.0", "X-Forwarded-For": "17.58.63.2"}
            ) as mail_privacy,
            mail_privacy.get(pixel_url(site, apple)) as response,
        ):
            assert response.headers["Content-Type"] == "image/gif"
        async with aiohttp.ClientSession(
            headers={"User-Agent": SAFARI, "X-Forwarded-For": "203.0.113.40"}
        ) as gateway:
            # A gateway that looks like Safari but follows every link of the message at once.
            urls = [click_url(site, keys, scanner, link) for link in links]
            assert await asyncio.gather(*(_status(gateway, url) for url in urls)) == [302, 302, 302]
            # Another one finds the link hidden from people: answered, never redirected.
            async with gateway.get(honeypot_url(site, keys, crawler), allow_redirects=False) as response:
                assert (response.status, "Location" in response.headers) == (200, False)

        async def all_stored() -> list[Event]:
            events = await stream_events(nats_url)
            assert len(events) == 8
            return events

        events = await eventually(all_stored, within=10)
    verdicts = sorted(
        (e.tracking_id or "", e.type.value, e.url or "", e.machine_kind or "human") for e in events
    )
    assert verdicts == sorted(
        [
            (person, "clicked", links[0], "human"),
            (person, "opened", "", "human"),
            (checker, "clicked", links[1], "head_request"),
            (apple, "opened", "", "apple_privacy_proxy"),
            *((scanner, "clicked", link, "burst") for link in links),
            (crawler, "clicked", HONEYPOT_URL, "honeypot"),
        ]
    )
    assert all(e.machine and e.metadata["machine_evidence"] for e in events if e.machine_kind)
    assert not any(e.machine for e in events if not e.machine_kind)
    apple_open = next(e for e in events if e.tracking_id == apple)
    assert apple_open.ip == "17.58.63.2"  # the forwarded client, not the ingress


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url, allow_redirects=False) as response:
        return response.status
