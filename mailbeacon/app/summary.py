"""`mailbeacon stats`: a campaign's statistics as a short text a person reads in a terminal.

A pure function of the statistics JSON (docs/architecture.md "Statistics"); ``--json`` prints the
object itself instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

_WIDTH = 28  # the name column of the tables
_DAYS = 14  # days of the opens and clicks series shown


def _pct(value: Any) -> str:
    return f"{float(value):.2f}%"


def _when(value: str | None) -> str:
    if not value:
        return "never"
    return datetime.fromisoformat(value.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M UTC")


def _rate(stats: dict[str, Any], name: str, *, per_delivered: bool = True) -> str:
    """A rate, or why there is none: rates of opens and clicks are per delivered copy."""
    if per_delivered and not stats.get("delivered_count"):
        return "n/a"
    return _pct(stats.get(name, 0))


def _messages(s: dict[str, Any]) -> list[str]:
    lines = [
        f"Messages    sent {s['sent_count']}, failed {s['failed_count']}, "
        f"delivered {s['delivered_count']} ({_rate(s, 'delivery_rate', per_delivered=False)}), "
        f"bounced {s['bounced_count']} ({_pct(s['bounce_rate'])}: {s['hard_bounced_count']} hard, "
        f"{s['soft_bounced_count']} soft)",
        f"            complained {s['complained_count']} ({_rate(s, 'complaint_rate')}), "
        f"unsubscribed {s['unsubscribed_count']}, deferred {s['deferred_count']}, "
        f"recipients {s['total_recipients']}",
        f"Opens       people {s['human_unique_opens']} copies ({_rate(s, 'human_open_rate')}), "
        f"{s['human_total_opens']} opens; all {s['unique_opens']} copies ({_rate(s, 'open_rate')}), "
        f"{s['total_opens']} opens",
        f"Clicks      people {s['human_unique_clicks']} copies ({_rate(s, 'human_click_rate')}), "
        f"{s['human_total_clicks']} clicks; all {s['unique_clicks']} copies ({_rate(s, 'click_rate')}), "
        f"{s['total_clicks']} clicks",
    ]
    if s["sent_count"] and not s["delivered_count"]:
        lines.append(
            "            no delivery events yet: configure your provider's webhooks (open and click rates "
            "are per delivered copy)"
        )
    return lines


def _breakdowns(s: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    clients = s.get("clients") or []
    if clients:
        lines += ["", "Mail clients (of people's first opens)"]
        lines += [
            f"  {c['client'][:_WIDTH]:<{_WIDTH}} {c['unique_opens']:>7}  {_pct(c['share']):>7}  "
            f"{c['total_opens']} opens"
            for c in clients
        ]
    devices = s.get("devices") or {}
    if any(devices.values()):
        lines += ["", "Devices     " + ", ".join(f"{name} {n}" for name, n in devices.items())]
    machines = s.get("machines") or {}
    if machines:
        lines += [
            "",
            "Machines    "
            + "; ".join(f"{kind} {m['opens']} opens, {m['clicks']} clicks" for kind, m in machines.items()),
        ]
    domains = [d for d in s.get("domains") or [] if d["sent"] or d["delivered"] or d["unique_opens"]]
    if domains:
        lines += [
            "",
            f"  {'Providers and domains':<{_WIDTH}} {'sent':>7} {'deliv.':>7} {'bounced':>7} {'opened':>7}",
        ]
        lines += [
            f"  {d['domain'][:_WIDTH]:<{_WIDTH}} {d['sent']:>7} {d['delivered']:>7} {d['bounced']:>7} "
            f"{d['unique_opens']:>7}   delivery {_pct(d['delivery_rate'])}, open {_pct(d['open_rate'])}"
            for d in domains
        ]
    return lines


def _activity(s: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    links = s.get("top_links") or []
    if links:
        lines += ["", "Top links (clicks, copies)"]
        lines += [f"  {link['total_clicks']:>7} {link['unique_clicks']:>7}  {link['url']}" for link in links]
    opens, clicks = s.get("opens_over_time") or [], s.get("clicks_over_time") or []
    if opens:
        key = "hour" if "hour" in opens[0] else "date"
        lines += ["", f"Per {'hour' if key == 'hour' else 'day'} (UTC, last {_DAYS}): opens, clicks"]
        peak = max([p["opens"] for p in opens[-_DAYS:]] + [1])
        for o, c in list(zip(opens, clicks, strict=False))[-_DAYS:]:
            bar = "#" * round(20 * o["opens"] / peak)
            lines.append(f"  {o[key]:<20} {o['opens']:>7} {c['clicks']:>7}  {bar}")
    return lines


def summary(stats: dict[str, Any]) -> str:
    """The statistics of one campaign, in a few lines (see the module)."""
    head = f"{stats['campaign']}  (updated {_when(stats.get('updated_at'))})"
    return "\n".join([head, "", *_messages(stats), *_breakdowns(stats), *_activity(stats)]) + "\n"
