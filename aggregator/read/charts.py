"""Server-rendered SVG charts for the pages: counts over a true time axis, the weekday-by-hour
heatmap, and the bars of shares.

SVG presentation attributes (``x``, ``width``, ``fill``) are no inline style, so the
Content-Security-Policy (no 'unsafe-inline') lets them through. Text in an SVG scales with
its viewBox, so each chart is drawn twice, for wide and narrow screens, and the stylesheet
shows one (``.wide``/``.narrow``): labels stay readable on a phone. Every chart carries a
text summary (``aria-label``) and, on the page, a table of its numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import escape

MUTED = "#5d6b7e"
GRID = "#e3e8ef"
DAY_STEPS = (1, 2, 3, 7, 14, 28, 56, 91, 182, 364)
HOUR_STEPS = (1, 2, 3, 6, 12, 24, 48, 72, 168, 336)
MAX_TIPS = 200
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def y_ticks(peak: int, most: int = 5) -> list[int]:
    """Round tick values from 0 up to at least ``peak``, at most ``most`` intervals apart:
    1, 2, 5 times a power of ten (counts have no fractions)."""
    peak = max(peak, 2)
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            step = factor * magnitude
            if math.ceil(peak / step) <= most:
                top = math.ceil(peak / step) * step
                return list(range(0, top + 1, step))
        magnitude *= 10


def slot_start(label: str) -> datetime | None:
    """``2026-03-02`` or ``2026-03-02T09:00:00Z`` (the statistics' day and hour labels) as UTC."""
    try:
        moment = datetime.fromisoformat(label.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def label_ticks(slots: int, steps: tuple[int, ...], most: int, phase: int | None = None) -> list[int]:
    """Which slots get a label: the first, then every k-th (k the smallest step giving at
    most ``most`` labels) counted from ``phase`` (an hour axis: from midnight), and the last
    (its own label, never a repeat of the first); a label too close to the one before is left out."""
    step = next((k for k in steps if math.ceil(slots / k) <= most), steps[-1])
    start = 0 if phase is None else phase % step
    ticks = [0, *(i for i in range(start, slots, step) if i >= step * 0.6)]
    if slots > 1 and ticks[-1] != slots - 1:
        if slots - 1 - ticks[-1] < step * 0.6 and len(ticks) > 1:
            ticks.pop()
        ticks.append(slots - 1)
    return ticks


@dataclass(frozen=True)
class Timeline:
    """The time slots a chart spans: every day (or hour) from the first to the last."""

    start: datetime
    slots: int
    hourly: bool

    @property
    def unit(self) -> timedelta:
        return timedelta(hours=1) if self.hourly else timedelta(days=1)

    def index(self, moment: datetime) -> int:
        return int((moment - self.start) / self.unit)

    def moment(self, index: int) -> datetime:
        return self.start + index * self.unit

    def label(self, index: int, first: bool, last: bool = False) -> tuple[str, str]:
        """Two lines under a tick: ``Mar 2`` (and the year under the first), or ``09:00`` and
        the day under the first, the last and midnight."""
        at = self.moment(index)
        day = f"{at:%b} {at.day}"
        if not self.hourly:
            return day, (str(at.year) if first else "")
        return f"{at:%H:%M}", (day if first or last or at.hour == 0 else "")


def timeline_of(moments: list[datetime], hourly: bool) -> Timeline | None:
    if not moments:
        return None
    start, end = min(moments), max(moments)
    unit = timedelta(hours=1) if hourly else timedelta(days=1)
    return Timeline(start, int((end - start) / unit) + 1, hourly)


@dataclass(frozen=True)
class Frame:
    """A chart's drawing area inside its viewBox."""

    width: int
    height: int
    left: int = 46
    right: int = 10
    top: int = 12
    bottom: int = 46
    font: int = 12

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom

    def y(self, value: float, top: int) -> float:
        return self.top + self.plot_height * (1 - value / top)


WIDE = Frame(760, 230, font=12)
NARROW = Frame(360, 220, left=40, font=11)


def _text(x: float, y: float, text: str, size: int, anchor: str = "middle", extra: str = "") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{MUTED}" '
        f'text-anchor="{anchor}"{extra}>{escape(text)}</text>'
    )


def _bars_svg(
    frame: Frame,
    span: Timeline,
    values: dict[int, tuple[int, int]],
    noun: str,
    summary: str,
    css: str,
    tips: bool,
) -> str:
    top = y_ticks(max((a for a, _ in values.values()), default=0))[-1]
    ticks = y_ticks(top)
    slot = frame.plot_width / span.slots
    bar = max(1.0, min(slot * 0.8, 36.0))
    parts = [
        f'<svg class="{css}" viewBox="0 0 {frame.width} {frame.height}" role="img" aria-label="{escape(summary)}">'
    ]
    for tick in ticks:
        y = frame.y(tick, top)
        parts.append(
            f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{GRID if tick else MUTED}" stroke-width="1"/>'
        )
        parts.append(_text(frame.left - 6, y + frame.font / 3, f"{tick:,}", frame.font, "end"))
    baseline = frame.top + frame.plot_height
    outlines: dict[str, list[str]] = {"all": [], "people": []}
    for index, (everything, people) in sorted(values.items()):
        x = frame.left + index * slot + (slot - bar) / 2
        if not tips:  # many bars: one path per kind, a few bytes a bar
            for value, kind in ((everything, "all"), (people, "people")):
                if value:
                    outlines[kind].append(
                        f"M{x:.1f} {frame.y(value, top):.1f}h{bar:.1f}V{baseline}h-{bar:.1f}z"
                    )
            continue
        when = span.moment(index)
        label = f"{when:%Y-%m-%d %H:00} UTC" if span.hourly else f"{when:%Y-%m-%d}"
        parts.append(f"<g><title>{escape(f'{label}: {everything:,} {noun}, {people:,} by people')}</title>")
        for value, kind in ((everything, "all"), (people, "people")):
            if value:
                y = frame.y(value, top)
                parts.append(
                    f'<rect class="{kind}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{baseline - y:.1f}"/>'
                )
        parts.append("</g>")
    parts.extend(f'<path class="{kind}" d="{"".join(d)}"/>' for kind, d in outlines.items() if d)
    most = max(2, int(frame.plot_width // (70 if span.hourly else 56)))
    if span.hourly:
        ticks = label_ticks(span.slots, HOUR_STEPS, most, phase=-span.start.hour)
    else:
        ticks = label_ticks(span.slots, DAY_STEPS, most)
    for index in ticks:
        x = frame.left + (index + 0.5) * slot
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{baseline}" y2="{baseline + 4}" stroke="{MUTED}"/>'
        )
        upper, lower = span.label(index, index == ticks[0], index == ticks[-1])
        # A label at either end stays inside the chart (about 0.6 em a character).
        half = max(len(upper), len(lower)) * frame.font * 0.3
        x = min(max(x, frame.left + half), frame.width - 2 - half)
        parts.append(_text(x, baseline + 6 + frame.font, upper, frame.font))
        if lower:
            parts.append(_text(x, baseline + 8 + 2 * frame.font, lower, frame.font))
    unit = "hour" if span.hourly else "day"
    parts.append(
        _text(
            12,
            frame.top + frame.plot_height / 2,
            f"{noun} per {unit}",
            frame.font,
            extra=f' transform="rotate(-90 12 {frame.top + frame.plot_height / 2:.1f})"',
        )
    )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(span: Timeline, values: dict[int, tuple[int, int]], noun: str) -> str:
    """Counts per slot (``{slot: (all, by people)}``) on the time axis ``span``, gridlines at
    round values; a slot with nothing is an empty place on the axis, not a missing one."""
    first, last = span.moment(0), span.moment(span.slots - 1)
    unit = "hour" if span.hourly else "day"
    total = sum(a for a, _ in values.values())
    people = sum(p for _, p in values.values())
    peak_index = max(values, key=lambda i: values[i][0], default=0)
    peak = values.get(peak_index, (0, 0))[0]
    fmt = "%Y-%m-%d %H:00" if span.hourly else "%Y-%m-%d"
    summary = (
        f"{noun.capitalize()} per {unit} (UTC) from {first:{fmt}} to {last:{fmt}}: {total:,} in all, "
        f"{people:,} by people; the most, {peak:,}, on {span.moment(peak_index):{fmt}}"
    )
    # Hover tips where a pointer hovers, and while they stay a small part of the page (a month
    # of hours is 720 bars); the table under the chart has every number.
    tips = len(values) <= MAX_TIPS
    return _bars_svg(WIDE, span, values, noun, summary, "wide", tips) + _bars_svg(
        NARROW, span, values, noun, summary, "narrow", False
    )


def _heat_colour(value: int, peak: int) -> str:
    if value <= 0 or peak <= 0:
        return "#f1f4f9"
    low, high = (219, 230, 251), (22, 64, 160)
    share = value / peak
    return "#" + "".join(f"{round(a + (b - a) * share):02x}" for a, b in zip(low, high, strict=True))


def _heatmap_svg(
    grid: list[list[int]], cell: int, label_every: int, font: int, summary: str, css: str
) -> str:
    left, top = 34, 18
    width, height = left + 24 * cell + 4, top + 7 * (cell + 2) + 4
    peak = max(max(row) for row in grid)
    parts = [f'<svg class="{css}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(summary)}">']
    for hour in range(0, 24, label_every):
        parts.append(_text(left + hour * cell + cell / 2, top - 6, f"{hour:02d}", font))
    for day, row in enumerate(grid):
        y = top + day * (cell + 2)
        parts.append(_text(left - 6, y + cell / 2 + font / 3, WEEKDAYS[day], font, "end"))
        for hour, value in enumerate(row):
            tip = f"{WEEKDAYS[day]} {hour:02d}:00-{hour:02d}:59: {value:,} opens by people"
            parts.append(
                f'<rect x="{left + hour * cell + 1}" y="{y}" width="{cell - 2}" height="{cell}" rx="2" '
                f'fill="{_heat_colour(value, peak)}"><title>{escape(tip)}</title></rect>'
            )
    parts.append("</svg>")
    return "".join(parts)


def heatmap(grid: list[list[int]], zone: str) -> str:
    """People's opens by weekday (rows, Monday first) and hour (columns) in ``zone``."""
    peak = max(max(row) for row in grid)
    day, hour = next((d, h) for d in range(7) for h in range(24) if grid[d][h] == peak)
    summary = (
        f"People's opens by weekday and hour ({zone}): {sum(map(sum, grid)):,} in all, the most "
        f"({peak:,}) on {WEEKDAYS[day]} {hour:02d}:00-{hour:02d}:59"
    )
    return _heatmap_svg(grid, 28, 3, 12, summary, "wide") + _heatmap_svg(grid, 13, 6, 10, summary, "narrow")


def share_bar(part: float, whole: float) -> str:
    """A bar as long as ``part`` of ``whole``: an SVG rectangle, whose width is an attribute,
    because the Content-Security-Policy refuses inline ``style`` (no 'unsafe-inline')."""
    width = 100 * part / whole if whole > 0 else 0.0
    return (
        '<svg class="share" viewBox="0 0 100 1" preserveAspectRatio="none" aria-hidden="true">'
        f'<rect width="{width:.1f}" height="1"/></svg>'
    )
