"""The parts of a campaign's statistics page, each a function of the statistics JSON.

Fields the statistics may not have (an older aggregator's, or nothing counted yet) render
as "no data yet" or not at all, never as an error. Numbers carry ``data-metric`` (the
statistics field they show) so tests and scripts read them without scraping the layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from aggregator.read.charts import bar_chart, heatmap, share_bar, slot_start, timeline_of

NO_DELIVERY = "no delivery events yet"
NONE = "&ndash;"  # a figure that cannot be had (a rate without its denominator)
NO_DELIVERY_HINT = "no delivery events yet: configure your provider's webhooks"
DEVICES = (
    ("desktop", "Desktop"),
    ("mobile", "Mobile"),
    ("tablet", "Tablet"),
    ("webmail", "Webmail"),
    ("unknown", "Unknown"),
)
PROVIDERS = {
    "gmail": "Gmail",
    "outlook": "Outlook",
    "yahoo": "Yahoo",
    "apple": "Apple (iCloud)",
    "other": "Other",
}


def percent(value: float) -> str:
    return f"{value:.2f}%"


def _metric(name: str, text: str) -> str:
    return f'<span data-metric="{name}">{escape(text)}</span>'


def _card(label: str, metric: str, value: int, lines: list[str], lead: bool = False) -> str:
    return (
        f'<div class="card{" lead" if lead else ""}"><div class="label">{escape(label)}</div>'
        f'<div class="value" data-metric="{metric}">{value:,}</div>{"".join(lines)}</div>'
    )


def _rate_line(s: Mapping[str, Any], metric: str, of: str, per_delivered: bool, hint: bool = False) -> str:
    """``40.00% of delivered``; without any delivery event a rate per delivered copy is no
    0.00%, it is unknown: the line says so."""
    if per_delivered and not s["delivered_count"]:
        return f'<div class="rate nodata" data-metric="{metric}">{NO_DELIVERY_HINT if hint else NO_DELIVERY}</div>'
    return f'<div class="rate">{_metric(metric, percent(s[metric]))} {escape(of)}</div>'


def _all_line(s: Mapping[str, Any], count: str, rate: str, noun: str) -> str:
    """The figure with machines (privacy proxies, scanners) beside the human one."""
    shown = f" · {_metric(rate, percent(s[rate]))}" if s["delivered_count"] else ""
    return f'<div class="also">{noun} with machines: {_metric(count, f"{s[count]:,}")}{shown}</div>'


def headline_cards(s: Mapping[str, Any]) -> str:
    """People first: a scanner opening every copy makes "all opens" 100%, not the human rate."""
    attempted = s["sent_count"] + s["failed_count"]
    failed_share = s["failed_count"] * 100.0 / attempted if attempted else 0.0
    unsubscribed_share = (
        s["unsubscribed_count"] * 100.0 / s["delivered_count"] if s["delivered_count"] else 0.0
    )
    shares = {**s, "unsubscribed_share": unsubscribed_share, "failed_share": failed_share}
    recipients = _metric("total_recipients", f"{s['total_recipients']:,}")
    cards = [
        _card("Sent", "sent_count", s["sent_count"], [f'<div class="rate">to {recipients} recipients</div>']),
        _card(
            "Delivered",
            "delivered_count",
            s["delivered_count"],
            [_rate_line(s, "delivery_rate", "of sent", True, hint=True)],
        ),
        _card(
            "Opened by people",
            "human_unique_opens",
            s["human_unique_opens"],
            [
                _rate_line(s, "human_open_rate", "of delivered", True),
                _all_line(s, "unique_opens", "open_rate", "opens"),
            ],
            lead=True,
        ),
        _card(
            "Clicked by people",
            "human_unique_clicks",
            s["human_unique_clicks"],
            [
                _rate_line(s, "human_click_rate", "of delivered", True),
                _all_line(s, "unique_clicks", "click_rate", "clicks"),
            ],
            lead=True,
        ),
        _card(
            "Bounced", "bounced_count", s["bounced_count"], [_rate_line(s, "bounce_rate", "of sent", False)]
        ),
        _card(
            "Complaints",
            "complained_count",
            s["complained_count"],
            [_rate_line(s, "complaint_rate", "of delivered", True)],
        ),
        _card(
            "Unsubscribed",
            "unsubscribed_count",
            s["unsubscribed_count"],
            [_rate_line(shares, "unsubscribed_share", "of delivered", True)],
        ),
        _card(
            "Failed",
            "failed_count",
            s["failed_count"],
            [_rate_line(shares, "failed_share", "of attempted", False)],
        ),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def people_and_machines(s: Mapping[str, Any]) -> str:
    def row(noun: str, key: str) -> str:
        rate, human_rate = s[f"{key[:-1]}_rate"], s[f"human_{key[:-1]}_rate"]
        rates = (
            f"{percent(human_rate)} <span>/ {percent(rate)}</span>" if s["delivered_count"] else NO_DELIVERY
        )
        return (
            f"<tr><th scope=row>{noun}</th>"
            f'<td class="num" data-metric="human_unique_{key}">{s[f"human_unique_{key}"]:,}</td>'
            f'<td class="num">{s[f"unique_{key}"]:,}</td>'
            f'<td class="num hide-narrow" data-metric="human_total_{key}">{s[f"human_total_{key}"]:,}</td>'
            f'<td class="num hide-narrow" data-metric="total_{key}">{s[f"total_{key}"]:,}</td>'
            f'<td class="num rates">{rates}</td></tr>'
        )

    return (
        "<div class=wrap tabindex=0><table><thead><tr><th scope=col></th><th class=num scope=col>Messages (people)</th>"
        "<th class=num scope=col>Messages (all)</th><th class='num hide-narrow' scope=col>Events (people)</th>"
        "<th class='num hide-narrow' scope=col>Events (all)</th><th class=num scope=col>Rate people / all</th>"
        f"</tr></thead><tbody>{row('Opens', 'opens')}{row('Clicks', 'clicks')}</tbody></table></div>"
        "<p class=muted>People leaves out opens and clicks classified as automated "
        "(privacy proxies, link scanners, the hidden honeypot link).</p>"
    )


def machines(s: Mapping[str, Any]) -> str:
    kinds = s.get("machines")
    if not isinstance(kinds, Mapping) or not kinds:
        return ""
    rows = "".join(
        f"<tr><th scope=row>{escape(str(kind).replace('_', ' '))}</th>"
        f'<td class="num">{int(v.get("opens", 0)):,}</td><td class="num">{int(v.get("clicks", 0)):,}</td></tr>'
        for kind, v in sorted(kinds.items(), key=lambda kv: -(kv[1].get("opens", 0) + kv[1].get("clicks", 0)))
        if isinstance(v, Mapping)
    )
    return (
        "<h3>Automated opens and clicks by kind</h3><div class=wrap tabindex=0><table id=machines><thead><tr>"
        "<th scope=col>Kind</th><th class=num scope=col>Opens</th><th class=num scope=col>Clicks</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _series(points: Any, value: str, people: str) -> dict[Any, tuple[int, int]]:
    """``{slot start: (all, by people)}`` of an over-time series; unreadable points are left out."""
    found: dict[Any, tuple[int, int]] = {}
    for point in points if isinstance(points, list) else []:
        label = point.get("hour") or point.get("date") if isinstance(point, Mapping) else None
        start = slot_start(label) if isinstance(label, str) else None
        if start is not None:
            found[start] = (int(point.get(value, 0) or 0), int(point.get(people, 0) or 0))
    return found


def over_time(s: Mapping[str, Any], hourly: bool) -> str:
    """Opens and clicks on one true time axis, every day (hour) from the first to the last."""
    opens = _series(s.get("opens_over_time"), "opens", "human_opens")
    clicks = _series(s.get("clicks_over_time"), "clicks", "human_clicks")
    span = timeline_of([*opens, *clicks], hourly)
    if span is None:
        return '<p class="muted" id="no-opens">No opens or clicks yet.</p>'
    legend = '<div class="legend"><i class="all"></i>all<i class="people"></i>by people</div>'
    charts = []
    for noun, series, present in (("opens", opens, True), ("clicks", clicks, "clicks_over_time" in s)):
        if not present:
            continue
        values = {span.index(start): counts for start, counts in series.items() if any(counts)}
        body = bar_chart(span, values, noun) if values else f'<p class="muted">No {noun} yet.</p>'
        charts.append(
            f'<figure class="chart" id="{noun}-chart"><figcaption>{noun.capitalize()}</figcaption>{body}</figure>'
        )
    unit = "Hour" if hourly else "Day"
    key = "%Y-%m-%d %H:00" if hourly else "%Y-%m-%d"
    rows = "".join(
        f"<tr><th scope=row>{start:{key}}</th><td class=num>{opens.get(start, (0, 0))[0]:,}</td>"
        f"<td class=num>{opens.get(start, (0, 0))[1]:,}</td><td class=num>{clicks.get(start, (0, 0))[0]:,}</td>"
        f"<td class=num>{clicks.get(start, (0, 0))[1]:,}</td></tr>"
        for start in sorted({*opens, *clicks})
        if any(opens.get(start, (0, 0))) or any(clicks.get(start, (0, 0)))
    )
    table = (
        '<details id="over-time-table"><summary>The numbers as a table</summary><div class=wrap tabindex=0><table>'
        f"<thead><tr><th scope=col>{unit} (UTC)</th><th class=num scope=col>Opens</th><th class=num scope=col>"
        "Opens by people</th><th class=num scope=col>Clicks</th><th class=num scope=col>Clicks by people</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></div><p class=muted>{unit}s without any are left out.</p></details>"
    )
    return f"{legend}{''.join(charts)}{table}"


def _grid(value: Any) -> list[list[int]] | None:
    if not isinstance(value, list) or len(value) != 7:
        return None
    if not all(isinstance(row, list) and len(row) == 24 for row in value):
        return None
    return [[int(v or 0) for v in row] for row in value]


def engagement(s: Mapping[str, Any], zone: str) -> str:
    grid = _grid(s.get("engagement_heatmap"))
    if grid is None:
        return ""
    if not any(map(any, grid)):
        return '<p class="muted">No opens by people yet.</p>'
    header = "".join(f"<th scope=col class=num>{h:02d}</th>" for h in range(24))
    rows = "".join(
        f"<tr><th scope=row>{day}</th>{''.join(f'<td class=num>{v:,}</td>' for v in row)}</tr>"
        for day, row in zip(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"), grid, strict=True)
    )
    return (
        f'<figure class="chart heat" id="heatmap"><figcaption>Hours in {escape(zone)}; darker is more</figcaption>'
        f"{heatmap(grid, zone)}</figure>"
        '<details id="heatmap-table"><summary>The numbers as a table</summary><div class=wrap tabindex=0><table>'
        f"<thead><tr><th scope=col>Day</th>{header}</tr></thead><tbody>{rows}</tbody></table></div></details>"
    )


def clients(s: Mapping[str, Any]) -> str:
    found = s.get("clients")
    if not isinstance(found, list):
        return ""
    # The share of people's opened copies, as the statistics define it; computed here so
    # the page never depends on how ``share`` is scaled.
    whole = int(s.get("human_unique_opens", 0) or 0)
    rows = "".join(
        f"<tr><th scope=row>{escape(str(c.get('client', '')))}{share_bar(int(c.get('unique_opens', 0)), whole)}</th>"
        f'<td class="num">{int(c.get("unique_opens", 0)):,}</td>'
        f'<td class="num">{percent(int(c.get("unique_opens", 0)) * 100.0 / whole) if whole else NONE}</td>'
        f'<td class="num hide-narrow">{int(c.get("total_opens", 0)):,}</td></tr>'
        for c in found
        if isinstance(c, Mapping)
    )
    rows = rows or '<tr><td colspan="4" class="muted">No data yet.</td></tr>'
    return (
        "<div class=wrap tabindex=0><table id=clients><thead><tr><th scope=col>Mail client</th>"
        "<th class=num scope=col>Messages</th><th class=num scope=col>Share</th>"
        f"<th class='num hide-narrow' scope=col>Opens</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


def devices(s: Mapping[str, Any]) -> str:
    found = s.get("devices")
    if not isinstance(found, Mapping):
        return ""
    counts = [(label, int(found.get(key, 0) or 0)) for key, label in DEVICES]
    whole = sum(n for _, n in counts)
    if not whole:
        return '<p class="muted">No data yet.</p>'
    rows = "".join(
        f"<tr><th scope=row>{label}{share_bar(n, whole)}</th><td class=num>{n:,}</td>"
        f"<td class=num>{percent(n * 100.0 / whole)}</td></tr>"
        for label, n in counts
    )
    return (
        "<div class=wrap tabindex=0><table id=devices><thead><tr><th scope=col>Device</th>"
        "<th class=num scope=col>Messages</th><th class=num scope=col>Share</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _provider_rows(found: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """``domains`` (aggregator.read.breakdowns: a list of rows, each naming its ``domain``) as
    (name, figures)."""
    return [(str(d["domain"]), d) for d in found] if isinstance(found, list) else []


def providers(s: Mapping[str, Any]) -> str:
    rows_in = _provider_rows(s.get("domains"))
    if not rows_in:
        return "" if "domains" not in s else '<p class="muted">No data yet.</p>'

    def rate(figures: Mapping[str, Any], name: str, per_delivered: bool) -> str:
        if per_delivered and not figures.get("delivered"):
            return f'<span class="muted" title="{NO_DELIVERY}">{NONE}</span>'
        return percent(float(figures.get(name, 0) or 0))

    rows = "".join(
        f"<tr><th scope=row>{escape(PROVIDERS.get(name, name))}</th>"
        f"<td class=num>{int(f.get('sent', 0)):,}</td>"
        f"<td class='num hide-narrow'>{int(f.get('delivered', 0)):,}</td>"
        f"<td class='num hide-narrow'>{int(f.get('bounced', 0)):,}</td>"
        f"<td class='num hide-narrow'>{int(f.get('complained', 0)):,}</td>"
        f"<td class='num hide-narrow'>{int(f.get('unique_opens', 0)):,}</td>"
        f"<td class=num>{rate(f, 'delivery_rate', False) if f.get('sent') else NONE}</td>"
        f"<td class=num>{rate(f, 'bounce_rate', False) if f.get('sent') else NONE}</td>"
        f"<td class=num>{rate(f, 'open_rate', True)}</td></tr>"
        for name, f in sorted(rows_in, key=lambda nf: -int(nf[1].get("sent", 0) or 0))
    )
    return (
        "<div class=wrap tabindex=0><table id=providers><thead><tr><th scope=col>Provider</th>"
        "<th class=num scope=col>Sent</th><th class='num hide-narrow' scope=col>Delivered</th>"
        "<th class='num hide-narrow' scope=col>Bounced</th><th class='num hide-narrow' scope=col>Complaints</th>"
        "<th class='num hide-narrow' scope=col>Opened</th><th class=num scope=col>Delivery rate</th>"
        "<th class=num scope=col>Bounce rate</th><th class=num scope=col>Open rate</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def top_links(s: Mapping[str, Any]) -> str:
    links = s["top_links"]
    peak = max((link["total_clicks"] for link in links), default=0) or 1
    rows = "".join(
        f'<tr><td class="url">{escape(link["url"])}{share_bar(link["total_clicks"], peak)}</td>'
        f'<td class="num">{link["total_clicks"]:,}</td><td class="num">{link["unique_clicks"]:,}</td></tr>'
        for link in links
    )
    rows = rows or '<tr><td colspan="3" class="muted">No clicks yet.</td></tr>'
    return (
        "<div class=wrap tabindex=0><table id=top-links><thead><tr><th scope=col>Link</th><th class=num scope=col>Clicks</th>"
        f"<th class=num scope=col>Messages</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )
