"""The chart's alert rules evaluated by Prometheus's own rule engine (``promtool test rules``).

The series are what the components export, as Prometheus scrapes them: two aggregator
replicas reporting the same campaign statistics, the operator's guardrails for campaigns
that have a Campaign resource, none for the others. Debian's ``prometheus`` package brings
``promtool`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_helm_chart import PRODUCTION, by_kind, manifests, render

PROMTOOL = shutil.which("promtool")
if PROMTOOL is None:
    if os.environ.get("CI"):
        pytest.fail("promtool is missing (apt-get install prometheus)", pytrace=False)
    pytest.skip("promtool not installed (apt-get install prometheus)", allow_module_level=True)

REPLICAS = ("10.0.0.1:8090", "10.0.0.2:8090")
TEAM = {"team": "email"}  # the production values' alertLabels


def rules() -> dict[str, Any]:
    rule = next(iter(by_kind(manifests(render(PRODUCTION)), "PrometheusRule").values()))
    return {"groups": rule["spec"]["groups"]}


def descriptions() -> dict[str, str]:
    return {r["alert"]: r["annotations"]["description"] for g in rules()["groups"] for r in g["rules"]}


def campaign(name: str, values: dict[str, int]) -> list[dict[str, str]]:
    """The aggregator's gauges of one campaign, as each replica reports them (the same)."""
    return [
        {
            "series": f'mailbeacon_campaign_messages{{campaign="{name}",state="{state}",'
            f'job="mailbeacon-aggregator",instance="{instance}"}}',
            "values": f"{count}x40",
        }
        for instance in REPLICAS
        for state, count in values.items()
    ]


def guardrails(name: str, bounce: float, complaint: float, min_volume: int) -> list[dict[str, str]]:
    """The operator's series for a campaign that has a Campaign resource."""
    labels = f'campaign="{name}",job="mailbeacon-operator",instance="10.0.0.9:8070"'
    return [
        {
            "series": f'mailbeacon_campaign_guardrail_threshold_percent{{{labels},guardrail="bounce_rate"}}',
            "values": f"{bounce}x40",
        },
        {
            "series": f'mailbeacon_campaign_guardrail_threshold_percent{{{labels},guardrail="complaint_rate"}}',
            "values": f"{complaint}x40",
        },
        {"series": f"mailbeacon_campaign_guardrail_min_volume{{{labels}}}", "values": f"{min_volume}x40"},
    ]


def alert(name: str, campaign: str, severity: str, summary: str) -> dict[str, Any]:
    return {
        "exp_labels": {"campaign": campaign, "severity": severity, **TEAM},
        "exp_annotations": {"summary": summary, "description": descriptions()[name]},
    }


def promtool_test(tmp_path: Path, input_series: list[dict[str, str]], expected: list[dict[str, Any]]) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules()))
    (tmp_path / "test.yaml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yaml"],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": expected}],
            }
        )
    )
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_reputation_alerts_judge_the_aggregators_numbers_by_each_campaigns_guardrails(tmp_path: Path) -> None:
    series = [
        # A Campaign with the default guardrails: 0.4 % complaints is above 0.3 %.
        *campaign("marketing/newsletter", {"sent": 1020, "delivered": 1000, "bounced": 20, "complained": 4}),
        *guardrails("marketing/newsletter", bounce=5, complaint=0.3, min_volume=100),
        # No Campaign resource (a sidecar's default campaign): the chart's defaults apply;
        # 0.2 % complaints is past half of 0.3 %: a warning.
        *campaign("shop/transactional", {"sent": 1000, "delivered": 1000, "bounced": 0, "complained": 2}),
        # Its own minDelivered of 1000 is not reached: 2 % complaints are not judged yet.
        *campaign("marketing/small", {"sent": 500, "delivered": 500, "bounced": 0, "complained": 10}),
        *guardrails("marketing/small", bounce=5, complaint=0.3, min_volume=1000),
        # 6 % bounces: under its own 10 % threshold (a warning) ...
        *campaign("marketing/promo", {"sent": 200, "delivered": 188, "bounced": 12, "complained": 0}),
        *guardrails("marketing/promo", bounce=10, complaint=0.3, min_volume=100),
        # ... above the default 5 % of a campaign without a resource.
        *campaign("shop/receipts", {"sent": 200, "delivered": 188, "bounced": 12, "complained": 0}),
        # A threshold of 0 means any complaint at all; none is no alert.
        *campaign("marketing/strict", {"sent": 500, "delivered": 500, "bounced": 0, "complained": 0}),
        *guardrails("marketing/strict", bounce=0, complaint=0, min_volume=100),
    ]
    high, rising = "at or above its guardrail", "approaching its guardrail"
    expected = [
        {
            "eval_time": "20m",
            "alertname": "MailbeaconComplaintRateHigh",
            "exp_alerts": [
                alert(
                    "MailbeaconComplaintRateHigh",
                    "marketing/newsletter",
                    "critical",
                    f"Campaign marketing/newsletter: complaint rate 0.40%, {high}",
                )
            ],
        },
        {
            "eval_time": "20m",
            "alertname": "MailbeaconComplaintRateRising",
            "exp_alerts": [
                alert(
                    "MailbeaconComplaintRateRising",
                    "shop/transactional",
                    "warning",
                    f"Campaign shop/transactional: complaint rate 0.20%, {rising}",
                )
            ],
        },
        {
            "eval_time": "20m",
            "alertname": "MailbeaconBounceRateHigh",
            "exp_alerts": [
                alert(
                    "MailbeaconBounceRateHigh",
                    "shop/receipts",
                    "critical",
                    f"Campaign shop/receipts: bounce rate 6.00%, {high}",
                )
            ],
        },
        {
            "eval_time": "20m",
            "alertname": "MailbeaconBounceRateRising",
            "exp_alerts": [
                alert(
                    "MailbeaconBounceRateRising",
                    "marketing/promo",
                    "warning",
                    f"Campaign marketing/promo: bounce rate 6.00%, {rising}",
                )
            ],
        },
        # A critical rate pends for its "for" duration first.
        {"eval_time": "1m", "alertname": "MailbeaconComplaintRateHigh", "exp_alerts": []},
    ]
    promtool_test(tmp_path, series, expected)


def test_pipeline_alerts_count_replicas_right(tmp_path: Path) -> None:
    """Lag is one value however many replicas report it; proxy counters add up across pods."""
    series = [
        *(
            {
                "series": f'mailbeacon_aggregator_ingest_lag_events{{job="mailbeacon-aggregator",instance="{i}"}}',
                "values": "20000x40",
            }
            for i in REPLICAS
        ),
        # Two proxies relay 100 copies a minute each; one sees 30 upstream errors a minute: 15 %.
        {"series": 'mailbeacon_proxy_copies_total{result="sent",pod="proxy-a"}', "values": "0+100x40"},
        {"series": 'mailbeacon_proxy_copies_total{result="sent",pod="proxy-b"}', "values": "0+100x40"},
        {
            "series": 'mailbeacon_proxy_upstream_errors_total{code_class="4xx",pod="proxy-a"}',
            "values": "0+30x40",
        },
        {
            "series": 'mailbeacon_tracker_dropped_events{namespace="mailbeacon",pod="tracker-a"}',
            "values": "0x20 5x20",
        },
        # A flood of pixels for made-up copies: each replica drops parked events in its turn.
        *(
            {
                "series": f'mailbeacon_aggregator_parked_events_dropped_total{{type="opened",'
                f'job="mailbeacon-aggregator",instance="{i}"}}',
                "values": "0x20 0+10x20",
            }
            for i in REPLICAS
        ),
    ]
    expected = [
        {
            "eval_time": "15m",
            "alertname": "MailbeaconIngestLag",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", **TEAM},
                    "exp_annotations": {
                        "summary": "The aggregator is 20000 events behind the stream",
                        "description": descriptions()["MailbeaconIngestLag"],
                    },
                }
            ],
        },
        {
            "eval_time": "15m",
            "alertname": "MailbeaconProxyUpstreamErrors",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", **TEAM},
                    "exp_annotations": {
                        "summary": "15% of relayed copies fail upstream",
                        "description": descriptions()["MailbeaconProxyUpstreamErrors"],
                    },
                }
            ],
        },
        {"eval_time": "15m", "alertname": "MailbeaconParkedEventsDropped", "exp_alerts": []},
        {
            "eval_time": "40m",
            "alertname": "MailbeaconParkedEventsDropped",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", **TEAM},
                    "exp_annotations": {
                        "summary": "The aggregator deleted 300 parked events beyond its limit in 15 minutes",
                        "description": descriptions()["MailbeaconParkedEventsDropped"],
                    },
                }
            ],
        },
        {"eval_time": "15m", "alertname": "MailbeaconTrackerDroppingEvents", "exp_alerts": []},
        {
            "eval_time": "25m",
            "alertname": "MailbeaconTrackerDroppingEvents",
            "exp_alerts": [
                {
                    "exp_labels": {
                        "severity": "critical",
                        "namespace": "mailbeacon",
                        "pod": "tracker-a",
                        **TEAM,
                    },
                    "exp_annotations": {
                        "summary": "Tracker tracker-a drops open and click events",
                        "description": descriptions()["MailbeaconTrackerDroppingEvents"],
                    },
                }
            ],
        },
    ]
    promtool_test(tmp_path, series, expected)
