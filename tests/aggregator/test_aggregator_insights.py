"""The pure rules behind the insights: mail clients and devices from user agents, mailbox
providers from domains, gap-filled and bounded series, the heatmap in a time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.read.series import MAX_DAYS, MAX_HOURS, BadZone, Bucket, activity_series, heatmap, parse_zone
from aggregator.store.domains import PROVIDERS, counted_domain, domain_of, provider_of, rows_of
from aggregator.store.readers import CLIENTS, DEVICES, Reader, reader_of

AGENTS = {
    # Mail apps
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Mobile/15E148": ("Apple Mail", "mobile"),
    "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148": (
        "Apple Mail",
        "tablet",
    ),
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)": (
        "Apple Mail",
        "desktop",
    ),
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)": ("Outlook", "desktop"),
    "Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 10.0; WOW64; Trident/7.0; .NET4.0C; .NET4.0E; "
    "Microsoft Outlook 16.0.17328; ms-office; MSOffice 16)": ("Outlook", "desktop"),
    "Outlook-iOS/709.2189947.prod.iphone (3.24.1)": ("Outlook", "mobile"),
    "Mozilla/5.0 (X11; Linux x86_64; rv:109.0) Gecko/20100101 Thunderbird/115.0": ("Thunderbird", "desktop"),
    "Mozilla/5.0 (Linux; Android 13; SM-S911B Build/TP1A.220624.014; wv) AppleWebKit/537.36 (KHTML, like "
    "Gecko) Version/4.0 Chrome/116.0.0.0 Mobile Safari/537.36": ("Android mail app", "mobile"),
    "Mozilla/5.0 (Linux; Android 13; SM-X700 Build/TP1A; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Version/4.0 Chrome/116.0.0.0 Safari/537.36": ("Android mail app", "tablet"),
    # Webmail in a browser
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.6478.71 "
    "Mobile Safari/537.36": ("Webmail (Chrome Mobile)", "webmail"),
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 "
    "Safari/537.36": ("Webmail (Chrome)", "webmail"),
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 "
    "Safari/605.1.15": ("Webmail (Safari)", "webmail"),
    # The providers' proxies the tracker knows
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)": (
        "Gmail",
        "webmail",
    ),
    "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html": ("Yahoo Mail", "webmail"),
    "Mozilla/5.0": ("Apple Mail", "unknown"),
    # Nothing known
    "": ("Other", "unknown"),
    "curious-client/0.1": ("Other", "unknown"),
}


@pytest.mark.parametrize(("agent", "expected"), list(AGENTS.items()))
def test_mail_clients_and_devices(agent: str, expected: tuple[str, str]) -> None:
    assert reader_of(agent) == Reader(*expected)


@given(st.text(max_size=300))
def test_any_user_agent_gives_a_listed_client_and_device(agent: str) -> None:
    """However many user agents arrive, a campaign has at most len(CLIENTS) clients."""
    client, device = reader_of(agent)
    assert client in CLIENTS and device in DEVICES


def test_mailbox_providers() -> None:
    cases = {
        "gmail.com": "gmail",
        "googlemail.com": "gmail",
        "outlook.com": "outlook",
        "hotmail.com": "outlook",
        "hotmail.co.uk": "outlook",
        "live.fr": "outlook",
        "msn.com": "outlook",
        "outlook.de": "outlook",
        "yahoo.com": "yahoo",
        "yahoo.co.jp": "yahoo",
        "yahoo.com.br": "yahoo",
        "ymail.com": "yahoo",
        "aol.com": "yahoo",
        "icloud.com": "apple",
        "me.com": "apple",
        "mac.com": "apple",
        "corp.example": "other",
        "gmail.company.example": "other",
        "mail.live.example.org": "other",
        "": "other",
    }
    assert {d: provider_of(d) for d in cases} == cases
    assert set(cases.values()) == set(PROVIDERS)


def test_domains_counted_on_their_own() -> None:
    assert domain_of('"a@b"@corp.example') == "corp.example"  # the last @ decides
    assert domain_of("no-at-sign") == "" and domain_of(None) == ""
    assert rows_of("gmail.com") == ("gmail",)
    assert rows_of("corp.example") == ("other", "corp.example")
    assert rows_of("localhost") == ("other",)  # no dot: never mistaken for a provider row
    assert counted_domain("corp.example") == "corp.example" and counted_domain("outlook.com") is None


def _bucket(moment: datetime, opens: int = 0, clicks: int = 0, people: int | None = None) -> Bucket:
    return Bucket(moment, opens, opens if people is None else people, clicks, clicks)


def test_series_are_gap_filled_on_one_axis() -> None:
    day = datetime(2026, 12, 1, 9, tzinfo=UTC)
    series = activity_series(
        [_bucket(day, opens=3), _bucket(day + timedelta(days=3, hours=5), clicks=2, opens=1)], hourly=False
    )
    assert series["opens_over_time"] == [
        {"date": "2026-12-01", "opens": 3, "human_opens": 3},
        {"date": "2026-12-02", "opens": 0, "human_opens": 0},
        {"date": "2026-12-03", "opens": 0, "human_opens": 0},
        {"date": "2026-12-04", "opens": 1, "human_opens": 1},
    ]
    assert [p["clicks"] for p in series["clicks_over_time"]] == [0, 0, 0, 2]
    hourly = activity_series(
        [_bucket(day, opens=1), _bucket(day + timedelta(hours=2), clicks=1)], hourly=True
    )
    assert [(p["hour"], p["opens"]) for p in hourly["opens_over_time"]] == [
        ("2026-12-01T09:00:00Z", 1),
        ("2026-12-01T10:00:00Z", 0),
        ("2026-12-01T11:00:00Z", 0),
    ]
    assert activity_series([], hourly=False) == {"opens_over_time": [], "clicks_over_time": []}


def test_series_keep_the_most_recent_days_only() -> None:
    last = datetime(2026, 12, 1, 9, tzinfo=UTC)
    long_ago = last - timedelta(days=3 * 365)  # a provider's late report of an old open
    daily = activity_series([_bucket(long_ago, opens=1), _bucket(last, opens=1)], hourly=False)
    assert len(daily["opens_over_time"]) == MAX_DAYS
    assert daily["opens_over_time"][-1] == {"date": "2026-12-01", "opens": 1, "human_opens": 1}
    hourly = activity_series([_bucket(long_ago, opens=1), _bucket(last, opens=1)], hourly=True)
    assert len(hourly["opens_over_time"]) == MAX_HOURS


def test_heatmap_in_a_zone_with_daylight_saving() -> None:
    """The same UTC hour is 8:00 in New York's winter and 9:00 in its summer."""
    winter, summer = datetime(2026, 1, 5, 13, tzinfo=UTC), datetime(2026, 7, 6, 13, tzinfo=UTC)  # Mondays
    buckets = [_bucket(winter, opens=2), _bucket(summer, opens=3, people=1)]
    utc = heatmap(buckets)
    assert len(utc) == 7 and all(len(row) == 24 for row in utc)
    assert utc[0][13] == 3 and sum(map(sum, utc)) == 3  # people's opens only
    new_york = heatmap(buckets, ZoneInfo("America/New_York"))
    assert (new_york[0][8], new_york[0][9]) == (2, 1)
    # A half-hour zone: the UTC hour 13:00-14:00 is placed at its start, 18:30 in Kolkata.
    assert heatmap(buckets, ZoneInfo("Asia/Kolkata"))[0][18] == 3


@pytest.mark.parametrize(
    "name", ["Mars/Olympus", "../../etc/passwd", "/etc/localtime", "America", "utc", "x" * 300]
)
def test_bad_time_zones_are_refused(name: str) -> None:
    with pytest.raises(BadZone, match="IANA time zone"):
        parse_zone(name)


def test_time_zones() -> None:
    assert parse_zone(None) is UTC and parse_zone("") is UTC and parse_zone("UTC") is UTC
    assert str(parse_zone("Europe/Berlin")) == "Europe/Berlin"
