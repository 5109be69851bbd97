"""What each dashboard panel must show after the scripted traffic of
``test_prometheus_end_to_end``: the statistics API's numbers, and the traffic's own counts
where no statistic covers them (requests, refusals, webhooks). Every panel query must return
data; those named here must also show these values."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Result = list[dict[str, Any]]
Check = Callable[[Result, "Expected", float], None]

# The scripted traffic, as the test sends it.
GENERIC_STORED = 12 + 2 + 1  # deliveries, bounces, the complaint
WEBHOOKS = {
    ("generic", "stored"): GENERIC_STORED,
    ("generic", "refused"): 2,
    ("sendgrid", "stored"): 1,
    ("sendgrid", "refused"): 3,
}
REQUESTS = {
    ("pixel", "200"): 5,
    ("click", "302"): 3,
    ("click_honeypot", "200"): 1,
    ("click_forged", "400"): 1,
    ("unsubscribe", "200"): 1,
    ("webhook_generic_delivery", "200"): 12,
    ("webhook_generic_bounce", "200"): 2,
    ("webhook_generic_bounce", "401"): 2,
    ("webhook_generic_complaint", "200"): 1,
    ("webhook_sendgrid", "200"): 1,
    ("webhook_sendgrid", "401"): 3,
}
MESSAGES = {"accepted": 4, "partial": 1, "suppressed": 1, "paused": 1}
COPIES = {"sent": 16, "failed": 1}
REFUSED = {"too_many_recipients": 1, "bad_address": 1}
WITHHELD = {"unsubscribed": 1, "complained": 1}
STATES = ("sent", "delivered", "bounced", "failed", "complained", "unsubscribed")
RATES = ("delivery", "open", "click", "human_open", "human_click", "bounce", "complaint")
# Guardrails: the Campaign's spec (defaults, minDelivered 5) and the chart's low-volume copy.
THRESHOLDS = {"complaint": 0.3, "bounce": 5.0}
MIN_VOLUME = 5


@dataclass
class Expected:
    stats: dict[str, dict[str, Any]]  # campaign -> statistics API object
    events: list[dict[str, Any]]  # the campaigns' stored opens and clicks (events API)

    def total(self, field: str) -> float:
        return float(sum(s[field] for s in self.stats.values()))

    def by_type(self) -> dict[str, float]:
        """Events applied, by type: one per copy for the per-copy states, every open and click."""
        by_type = {state: self.total(f"{state}_count") for state in STATES}
        by_type |= {
            "opened": self.total("total_opens"),
            "clicked": self.total("total_clicks"),
            "deferred": 0.0,
        }
        return by_type

    def machines(self) -> dict[tuple[str, str], float]:
        """Stored opens and clicks classified as automated, by (type, machine_kind)."""
        found: dict[tuple[str, str], float] = {}
        for event in self.events:
            if event["machine"]:
                key = (event["type"], event["machine_kind"])
                found[key] = found.get(key, 0.0) + 1
        return found

    def guardrail(self, campaign: str, kind: str) -> float:
        s = self.stats[campaign]
        count, base = (
            (s["complained_count"], s["delivered_count"])
            if kind == "complaint"
            else (
                s["bounced_count"],
                s["sent_count"],
            )
        )
        return 100 * count / base / THRESHOLDS[kind] if base >= MIN_VOLUME else 0.0


def values(result: Result, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in result}


def one(result: Result) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def counted(value: float, n: float, window: float) -> bool:
    """``increase()`` over a window holding every sample from 0: at least the count, at most
    Prometheus's extrapolation to the window's end (about one scrape interval) above it."""
    return n - 1e-9 <= value <= n * (1 + 4 / window) + 1e-9


def counts(
    label_names: tuple[str, ...], wanted: dict[tuple[str, ...], float], *, rate: bool = False
) -> Check:
    def check(result: Result, _: Expected, window: float) -> None:
        found = values(result, *label_names)
        for key, value in found.items():
            n = wanted.get(key, 0.0)
            assert counted(value * window if rate else value, n, window), f"{key}: {value} for {n}"
        assert set(wanted) <= set(found), f"missing {set(wanted) - set(found)}"

    return check


def stat(field: str) -> Check:
    return lambda result, e, _: _equal(one(result), e.total(field))


def per_campaign(field: str, *labels: str, template: str = "{}") -> Check:
    def check(result: Result, e: Expected, _: float) -> None:
        found = values(result, "campaign", *labels)
        for campaign, s in e.stats.items():
            if labels:
                for value in RATES if labels == ("rate",) else STATES:
                    _equal(found[(campaign, value)], float(s[template.format(value)]))
            else:
                _equal(found[(campaign,)], float(s[field]))

    return check


def guardrail(kind: str) -> Check:
    def check(result: Result, e: Expected, _: float) -> None:
        found = values(result, "campaign")
        assert set(found) == {(c,) for c in e.stats}
        for campaign in e.stats:
            _equal(found[(campaign,)], e.guardrail(campaign, kind))

    return check


def gauges(label: str, wanted: dict[str, float]) -> Check:
    def check(result: Result, _: Expected, __: float) -> None:
        assert {k[0]: v for k, v in values(result, label).items()} == wanted

    return check


def finite(result: Result, _: Expected, __: float) -> None:
    assert any(math.isfinite(float(r["value"][1])) and float(r["value"][1]) >= 0 for r in result), result


def _equal(found: float, wanted: float) -> None:
    assert math.isclose(found, wanted, rel_tol=1e-9, abs_tol=1e-9), f"{found} != {wanted}"


def _events(result: Result, e: Expected, window: float) -> None:
    counts(("type",), {(k,): v for k, v in e.by_type().items()})(result, e, window)


def _events_per_second(result: Result, e: Expected, window: float) -> None:
    assert counted(one(result) * window, sum(e.by_type().values()), window)


def _machines(result: Result, e: Expected, window: float) -> None:
    machines = e.machines()
    # The scripted verdicts: Apple's privacy proxy, a scanner burst of two clicks, the honeypot.
    assert machines == {
        ("opened", "apple_privacy_proxy"): 1,
        ("clicked", "burst"): 2,
        ("clicked", "honeypot"): 1,
    }
    counts(("type", "verdict"), machines)(result, e, window)


def _top(rate: str) -> Check:
    def check(result: Result, e: Expected, _: float) -> None:
        found = values(result, "campaign")
        for campaign, s in e.stats.items():
            _equal(found[(campaign,)], float(s[f"{rate}_rate"]))

    return check


JOBS = {f"mb-mailbeacon-{c}": 1.0 for c in ("tracker", "aggregator", "operator", "proxy")}

CHECKS: dict[tuple[str, str], Check] = {
    ("Sent", "A"): stat("sent_count"),
    ("Delivered", "A"): stat("delivered_count"),
    ("Bounced", "A"): stat("bounced_count"),
    ("Complained", "A"): stat("complained_count"),
    ("Paused campaigns", "A"): lambda r, e, w: _equal(one(r), 1.0),
    ("Events applied / s", "A"): _events_per_second,
    ("Messages per campaign", "A"): per_campaign("", "state", template="{}_count"),
    ("Opens and clicks: people vs all", "A"): per_campaign("human_unique_opens"),
    ("Opens and clicks: people vs all", "B"): per_campaign("unique_opens"),
    ("Opens and clicks: people vs all", "C"): per_campaign("human_unique_clicks"),
    ("Opens and clicks: people vs all", "D"): per_campaign("unique_clicks"),
    ("Rates", "A"): per_campaign("", "rate", template="{}_rate"),
    ("Guardrails: rate / threshold", "A"): guardrail("complaint"),
    ("Guardrails: rate / threshold", "B"): guardrail("bounce"),
    ("Top campaigns", "A"): per_campaign("sent_count"),
    ("Top campaigns", "B"): _top("open"),
    ("Top campaigns", "C"): _top("human_open"),
    ("Top campaigns", "D"): _top("click"),
    ("Top campaigns", "E"): _top("bounce"),
    ("Top campaigns", "F"): _top("complaint"),
    ("Events applied by type", "A"): _events,
    ("Webhooks by provider and outcome", "A"): counts(("provider", "outcome"), WEBHOOKS),
    ("Withheld copies", "A"): counts(("reason",), {(k,): v for k, v in WITHHELD.items()}),
    ("Refused recipients and connections", "A"): counts(("reason",), {(k,): v for k, v in REFUSED.items()}),
    ("Machine verdicts by kind", "A"): _machines,
    ("NATS connection", "A"): lambda r, e, w: _equal(one(r), 1.0),
    ("NATS connection", "B"): lambda r, e, w: _equal(one(r), 1.0),
    ("Scrape targets up", "A"): gauges("job", JOBS),
    ("Tracker requests", "A"): counts(("kind", "status"), REQUESTS, rate=True),
    ("Tracker latency", "A"): finite,
    ("Tracker latency", "B"): finite,
    ("Tracker buffer", "A"): lambda r, e, w: _equal(one(r), 0.0),
    ("Tracker buffer", "B"): lambda r, e, w: _equal(one(r), 0.0),
    ("Tracker buffer", "C"): lambda r, e, w: _equal(one(r), 0.0),
    ("Proxy throughput", "A"): counts(("result",), {(k,): v for k, v in MESSAGES.items()}, rate=True),
    ("Proxy throughput", "B"): counts(("result",), {(k,): v for k, v in COPIES.items()}, rate=True),
    ("Proxy errors and untracked mail", "A"): counts(("code_class",), {("5xx",): 1}),
    ("Proxy errors and untracked mail", "B"): lambda r, e, w: _equal(one(r), 0.0),
    ("Proxy errors and untracked mail", "C"): counts(("why",), {("no_campaign",): 1}),
    ("Proxy errors and untracked mail", "D"): lambda r, e, w: _equal(one(r), 0.0),
    ("Relay latency", "A"): finite,
    ("Relay latency", "B"): finite,
    ("Relay latency", "C"): finite,
    ("SMTP AUTH", "A"): counts(("result",), {}),  # no AUTH here: every result at 0
    ("Ingest lag", "A"): finite,  # 0 once caught up, as of its last batch
    ("Ingest lag", "B"): finite,
    ("Ingest delay", "A"): finite,
    ("Batch time", "A"): finite,
    ("Batch time", "B"): finite,
    ("Duplicates, invalid events, failures", "A"): finite,
    ("Duplicates, invalid events, failures", "B"): lambda r, e, w: _equal(one(r), 0.0),
    ("Duplicates, invalid events, failures", "C"): lambda r, e, w: _equal(one(r), 0.0),
    ("Duplicates, invalid events, failures", "D"): lambda r, e, w: _equal(one(r), 0.0),
}


def check_panels(
    results: list[tuple[str, str, str, Result]], expected: Expected, window: float, no_data: dict[str, str]
) -> int:
    """Every query returned data (unless ``no_data`` says why not) and shows its value; all
    failures at once. Returns how many queries were checked."""
    failures = []
    for title, ref, expr, result in results:
        if not result:
            if title not in no_data:
                failures.append(f"{title} [{ref}]: no data for {expr}")
            continue
        check = CHECKS.get((title, ref))
        if check is None:
            failures.append(
                f"{title} [{ref}]: returns data, but nothing says what it must show (add a check)"
            )
            continue
        try:
            check(result, expected, window)
        except AssertionError as exc:
            failures.append(f"{title} [{ref}]: {exc} ({expr} -> {result})")
    assert not failures, "\n".join(failures)
    return len(results)


def expected_alerts(a: str, b: str) -> set[tuple[str, str]]:
    """The alerts of the low-volume rules, keyed by (alertname, campaign or provider)."""
    return {
        ("MailbeaconComplaintRateHigh", a),  # 1 complaint in 8 deliveries: 12.5 % of a 0.3 % guardrail
        ("MailbeaconBounceRateHigh", a),  # 2 of 10 sent, its Campaign's 5 %
        ("MailbeaconBounceRateHigh", b),  # 1 of 5 sent, the chart's 5 % (no Campaign resource)
        ("MailbeaconWebhooksFailing", "sendgrid"),  # 3 of 4 refused: a wrong key looks like this
        ("MailbeaconProxyUpstreamErrors", ""),  # 1 of 17 copies refused, above the copy's 2 %
    }
