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

from tests.chart.test_helm_chart import PRODUCTION, by_kind, manifests, render

PROMTOOL = shutil.which("promtool")
if PROMTOOL is None:
    if os.environ.get("CI"):
        pytest.fail("promtool is missing (apt-get install prometheus)", pytrace=False)
    pytest.skip("promtool not installed (apt-get install prometheus)", allow_module_level=True)

REPLICAS = ("10.0.0.1:8090", "10.0.0.2:8090")
TEAM = {"team": "email"}  # the production values' alertLabels
# How the chart's ServiceMonitor labels the release's targets ("mb" in namespace "mailbeacon").
NS = 'namespace="mailbeacon"'
AGGREGATOR = f'{NS},job="mb-mailbeacon-aggregator"'
OPERATOR = f'{NS},job="mb-mailbeacon-operator"'
TRACKER = f'{NS},job="mb-mailbeacon-tracker"'
PROXY = f'{NS},job="mb-mailbeacon-proxy"'
RUNBOOK = "https://github.com/mailbeacon/mailbeacon/blob/main/docs/runbooks.md"


def rules() -> dict[str, Any]:
    rule = next(iter(by_kind(manifests(render(PRODUCTION)), "PrometheusRule").values()))
    return {"groups": rule["spec"]["groups"]}


def descriptions() -> dict[str, str]:
    return {r["alert"]: r["annotations"]["description"] for g in rules()["groups"] for r in g["rules"]}


def annotations(name: str, summary: str) -> dict[str, str]:
    return {
        "summary": summary,
        "description": descriptions()[name],
        "runbook_url": f"{RUNBOOK}#{name.lower()}",
    }


def campaign(name: str, values: dict[str, int], target: str = AGGREGATOR) -> list[dict[str, str]]:
    """The aggregator's gauges of one campaign, as each replica reports them (the same)."""
    return [
        {
            "series": f'mailbeacon_campaign_messages{{campaign="{name}",state="{state}",'
            f'{target},instance="{instance}"}}',
            "values": f"{count}x40",
        }
        for instance in REPLICAS
        for state, count in values.items()
    ]


def guardrails(name: str, bounce: float, complaint: float, min_volume: int) -> list[dict[str, str]]:
    """The operator's series for a campaign that has a Campaign resource."""
    labels = f'campaign="{name}",{OPERATOR},instance="10.0.0.9:8070"'
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
        "exp_labels": {"campaign": campaign, "namespace": "mailbeacon", "severity": severity, **TEAM},
        "exp_annotations": annotations(name, summary),
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


@pytest.mark.slow
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
        # Another release's aggregator in another namespace: its campaigns are its own rules' business.
        *campaign(
            "other/newsletter",
            {"sent": 1020, "delivered": 1000, "bounced": 200, "complained": 40},
            target='namespace="other",job="other-mailbeacon-aggregator"',
        ),
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


@pytest.mark.slow
def test_pipeline_alerts_count_replicas_right(tmp_path: Path) -> None:
    """Lag is one value however many replicas report it; proxy counters add up across pods."""
    series = [
        *(
            {
                "series": f'mailbeacon_aggregator_ingest_lag_events{{{AGGREGATOR},instance="{i}"}}',
                "values": "20000x40",
            }
            for i in REPLICAS
        ),
        # Two proxies relay 100 copies a minute each; one sees 30 upstream errors a minute: 15 %.
        {
            "series": f'mailbeacon_proxy_copies_total{{result="sent",{PROXY},pod="proxy-a"}}',
            "values": "0+100x40",
        },
        {
            "series": f'mailbeacon_proxy_copies_total{{result="sent",{PROXY},pod="proxy-b"}}',
            "values": "0+100x40",
        },
        {
            "series": f'mailbeacon_proxy_upstream_errors_total{{code_class="4xx",{PROXY},pod="proxy-a"}}',
            "values": "0+30x40",
        },
        {
            "series": f'mailbeacon_tracker_dropped_events{{{TRACKER},pod="tracker-a"}}',
            "values": "0x20 5x20",
        },
        # A flood of pixels for made-up copies: each replica drops parked events in its turn.
        *(
            {
                "series": f'mailbeacon_aggregator_parked_events_dropped_total{{type="opened",'
                f'{AGGREGATOR},instance="{i}"}}',
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
                    "exp_labels": {"severity": "warning", "namespace": "mailbeacon", **TEAM},
                    "exp_annotations": annotations(
                        "MailbeaconIngestLag", "The aggregator is 20000 events behind the stream"
                    ),
                }
            ],
        },
        {
            "eval_time": "15m",
            "alertname": "MailbeaconProxyUpstreamErrors",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", "namespace": "mailbeacon", **TEAM},
                    "exp_annotations": annotations(
                        "MailbeaconProxyUpstreamErrors", "15% of relayed copies fail upstream"
                    ),
                }
            ],
        },
        {"eval_time": "15m", "alertname": "MailbeaconParkedEventsDropped", "exp_alerts": []},
        {
            "eval_time": "40m",
            "alertname": "MailbeaconParkedEventsDropped",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", "namespace": "mailbeacon", **TEAM},
                    "exp_annotations": annotations(
                        "MailbeaconParkedEventsDropped",
                        "The aggregator deleted 300 parked events beyond its limit in 15 minutes",
                    ),
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
                    "exp_annotations": annotations(
                        "MailbeaconTrackerDroppingEvents", "Tracker tracker-a drops open and click events"
                    ),
                }
            ],
        },
    ]
    promtool_test(tmp_path, series, expected)


def webhooks(provider: str, outcome: str, per_minute: int) -> dict[str, str]:
    return {
        "series": f'mailbeacon_tracker_webhooks_total{{provider="{provider}",outcome="{outcome}",{TRACKER},pod="t-a"}}',
        "values": f"0+{per_minute}x40",
    }


def test_a_provider_whose_webhooks_all_fail_alerts(tmp_path: Path) -> None:
    """A wrong SendGrid key refuses every webhook: bounces and complaints stop arriving, and
    nothing else would say so. A few refusals among stored webhooks (someone probing) do not alert."""
    series = [
        # Every series exists from the start (at 0), as the tracker creates them.
        *(
            webhooks(p, o, 0)
            for p in ("mailgun", "ses", "postmark")
            for o in ("stored", "refused", "invalid", "unavailable")
        ),
        webhooks("sendgrid", "stored", 0),
        webhooks("sendgrid", "refused", 12),  # the key was rotated at the provider
        webhooks("generic", "stored", 30),
        webhooks("generic", "refused", 2),
        # Another release's tracker refusing everything is that release's alert.
        {
            "series": 'mailbeacon_tracker_webhooks_total{provider="mailgun",outcome="refused",'
            'namespace="other",job="other-mailbeacon-tracker"}',
            "values": "0+50x40",
        },
    ]
    expected = [
        {"eval_time": "3m", "alertname": "MailbeaconWebhooksFailing", "exp_alerts": []},  # pending
        {
            "eval_time": "20m",
            "alertname": "MailbeaconWebhooksFailing",
            "exp_alerts": [
                {
                    "exp_labels": {
                        "severity": "critical",
                        "namespace": "mailbeacon",
                        "provider": "sendgrid",
                        **TEAM,
                    },
                    "exp_annotations": annotations(
                        "MailbeaconWebhooksFailing", "100% of sendgrid webhooks fail"
                    ),
                }
            ],
        },
    ]
    promtool_test(tmp_path, series, expected)


def test_a_lost_nats_connection_alerts(tmp_path: Path) -> None:
    series = [
        {"series": f'mailbeacon_tracker_nats_connected{{{TRACKER},pod="t-a"}}', "values": "1x5 0x35"},
        {"series": f'mailbeacon_tracker_nats_connected{{{TRACKER},pod="t-b"}}', "values": "1x40"},
        {
            "series": 'mailbeacon_proxy_nats_connected{job="mailbeacon/mb-mailbeacon-proxy-sidecars",namespace="shop",pod="shop-1"}',
            "values": "1x10 0x30",
        },
        {
            "series": 'mailbeacon_tracker_nats_connected{namespace="other",job="other-mailbeacon-tracker",pod="x"}',
            "values": "0x40",
        },
    ]

    def disconnected(job: str, namespace: str, pod: str) -> dict[str, Any]:
        return {
            "exp_labels": {"severity": "warning", "namespace": namespace, "job": job, "pod": pod, **TEAM},
            "exp_annotations": annotations(
                "MailbeaconNatsDisconnected", f"{job} {pod} has lost its NATS connection"
            ),
        }

    expected = [
        {"eval_time": "6m", "alertname": "MailbeaconNatsDisconnected", "exp_alerts": []},  # pending for 2m
        {
            "eval_time": "20m",
            "alertname": "MailbeaconNatsDisconnected",
            "exp_alerts": [
                disconnected("mb-mailbeacon-tracker", "mailbeacon", "t-a"),
                disconnected("mailbeacon/mb-mailbeacon-proxy-sidecars", "shop", "shop-1"),
            ],
        },
    ]
    promtool_test(tmp_path, series, expected)


def test_components_down_or_gone_alert(tmp_path: Path) -> None:
    """up == 0: Prometheus cannot scrape it; no up series at all: nothing of it is scraped
    (no pod, or the ServiceMonitor not selected), which no other rule could notice."""
    series = [
        {"series": f'up{{{TRACKER},instance="10.0.0.5:8080",pod="t-a"}}', "values": "1x40"},
        {"series": f'up{{{AGGREGATOR},instance="10.0.0.1:8090",pod="a-a"}}', "values": "1x10 0x30"},
        {"series": f'up{{{PROXY},instance="10.0.0.7:8025",pod="p-a"}}', "values": "1x40"},
        # No operator target at all; another release's operator does not count.
        {"series": 'up{namespace="other",job="other-mailbeacon-operator",instance="x"}', "values": "1x40"},
    ]
    expected = [
        {
            "eval_time": "20m",
            "alertname": "MailbeaconTargetDown",
            "exp_alerts": [
                {
                    "exp_labels": {
                        "severity": "critical",
                        "namespace": "mailbeacon",
                        "job": "mb-mailbeacon-aggregator",
                        "instance": "10.0.0.1:8090",
                        "pod": "a-a",
                        **TEAM,
                    },
                    "exp_annotations": annotations(
                        "MailbeaconTargetDown",
                        "Prometheus cannot scrape mb-mailbeacon-aggregator at 10.0.0.1:8090",
                    ),
                }
            ],
        },
        {"eval_time": "5m", "alertname": "MailbeaconOperatorAbsent", "exp_alerts": []},  # pending for 10m
        {
            "eval_time": "20m",
            "alertname": "MailbeaconOperatorAbsent",
            "exp_alerts": [
                {
                    "exp_labels": {
                        "severity": "critical",
                        "namespace": "mailbeacon",
                        "job": "mb-mailbeacon-operator",
                        **TEAM,
                    },
                    "exp_annotations": annotations(
                        "MailbeaconOperatorAbsent", "No operator of this release is scraped"
                    ),
                }
            ],
        },
        {"eval_time": "20m", "alertname": "MailbeaconTrackerAbsent", "exp_alerts": []},
        {"eval_time": "20m", "alertname": "MailbeaconAggregatorAbsent", "exp_alerts": []},  # down, not gone
        {"eval_time": "20m", "alertname": "MailbeaconProxyAbsent", "exp_alerts": []},
    ]
    promtool_test(tmp_path, series, expected)


def test_pipeline_alerts_judge_only_their_release(tmp_path: Path) -> None:
    """Two releases in one Prometheus: one's lagging aggregator and failing proxy never fire the other's rules."""
    other = 'namespace="other",job="other-mailbeacon'
    series = [
        {"series": f'mailbeacon_aggregator_ingest_lag_events{{{other}-aggregator"}}', "values": "50000x40"},
        {"series": f"mailbeacon_aggregator_ingest_lag_events{{{AGGREGATOR}}}", "values": "3x40"},
        {"series": f'mailbeacon_proxy_copies_total{{result="sent",{other}-proxy"}}', "values": "0+100x40"},
        {
            "series": f'mailbeacon_proxy_upstream_errors_total{{code_class="5xx",{other}-proxy"}}',
            "values": "0+90x40",
        },
        {"series": f'mailbeacon_tracker_buffered_events{{{other}-tracker",pod="x"}}', "values": "90000x40"},
    ]
    expected = [
        {"eval_time": "30m", "alertname": name, "exp_alerts": []}
        for name in ("MailbeaconIngestLag", "MailbeaconProxyUpstreamErrors", "MailbeaconTrackerBuffering")
    ]
    promtool_test(tmp_path, series, expected)
