"""Activity over time and the engagement heatmap, from the hourly buckets (pure functions).

The aggregator keeps opens and clicks (all, and people's) per campaign and UTC hour
(``open_buckets``). Everything here is derived from those rows at read time:

- ``opens_over_time`` and ``clicks_over_time``: per UTC day (or hour), every day or
  hour from the first to the last one with an open or a click present, zeros included,
  the same range for both series. At most the most recent :data:`MAX_DAYS` days
  (:data:`MAX_HOURS` hours when hourly), ending with the last activity: an open dated
  years back (a provider's late report) does not stretch the series to thousands of days.
- ``engagement_heatmap``: people's opens by weekday (0 = Monday) and hour in a time
  zone, over the same most recent :data:`MAX_DAYS` days. Each UTC hour is placed by its
  start in that zone's local time, daylight saving included, so it is exact to the hour
  in zones whose offset is whole hours; in zones offset by a half or quarter hour
  (Asia/Kolkata, Asia/Kathmandu) an open may be shown in the local hour before its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, available_timezones

MAX_DAYS = 366
MAX_HOURS = 31 * 24
_HOUR, _DAY = timedelta(hours=1), timedelta(days=1)
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+){0,3}")


class Bucket(NamedTuple):
    """One campaign hour (UTC, aware): opens, people's opens, clicks, people's clicks."""

    hour: datetime
    opens: int
    human_opens: int
    clicks: int
    human_clicks: int


class BadZone(ValueError):
    """A ``tz`` that names no IANA time zone; the message says so (answered as 400)."""


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def parse_zone(name: str | None) -> tzinfo:
    """The IANA zone ``name`` (``Europe/Berlin``); UTC when empty. :class:`BadZone` otherwise."""
    name = (name or "").strip()
    if not name or name == "UTC":
        return UTC
    if len(name) > 64 or not _ZONE_NAME.fullmatch(name) or name not in _zones():
        raise BadZone(
            f"tz must be an IANA time zone such as Europe/Berlin or America/New_York, got {name[:64]!r}"
        )
    return ZoneInfo(name)


def window_start(last_hour: datetime) -> datetime:
    """The first hour a read looks at when the latest activity is in ``last_hour``."""
    day = last_hour.replace(hour=0)
    return day - (MAX_DAYS - 1) * _DAY


def _filled(
    totals: dict[datetime, list[int]], step: timedelta, limit: int, label: str
) -> list[tuple[str, list[int]]]:
    """Every step from the first to the last key (at most ``limit``, the most recent), zeros between."""
    if not totals:
        return []
    last = max(totals)
    moment = max(min(totals), last - (limit - 1) * step)
    out = []
    while moment <= last:
        out.append((moment.strftime(label), totals.get(moment, [0, 0, 0, 0])))
        moment += step
    return out


def activity_series(buckets: Iterable[Bucket], hourly: bool) -> dict[str, list[dict[str, Any]]]:
    """``opens_over_time`` and ``clicks_over_time``, gap-filled and bounded (see the module)."""
    totals: dict[datetime, list[int]] = {}
    for b in buckets:
        if not (b.opens or b.clicks):
            continue
        moment = b.hour if hourly else b.hour.replace(hour=0)
        row = totals.setdefault(moment, [0, 0, 0, 0])
        row[0] += b.opens
        row[1] += b.human_opens
        row[2] += b.clicks
        row[3] += b.human_clicks
    if hourly:
        points = _filled(totals, _HOUR, MAX_HOURS, "%Y-%m-%dT%H:00:00Z")
    else:
        points = _filled(totals, _DAY, MAX_DAYS, "%Y-%m-%d")
    key = "hour" if hourly else "date"
    return {
        "opens_over_time": [{key: label, "opens": v[0], "human_opens": v[1]} for label, v in points],
        "clicks_over_time": [{key: label, "clicks": v[2], "human_clicks": v[3]} for label, v in points],
    }


def heatmap(buckets: Iterable[Bucket], zone: tzinfo = UTC) -> list[list[int]]:
    """People's opens by weekday (0 = Monday) x hour of day in ``zone``: 7 rows of 24."""
    grid = [[0] * 24 for _ in range(7)]
    for b in buckets:
        if b.human_opens:
            local = b.hour.astimezone(zone)
            grid[local.weekday()][local.hour] += b.human_opens
    return grid
