"""`mailbeacon up` as a development setup that shows real numbers: the outbox reports kept
copies as delivered, links point at the tracker wherever TRACKER_LISTEN puts it, `stats`
reads like a summary, and the other commands find the running `up` from any directory
(or say exactly what to set)."""

from __future__ import annotations

import email
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from email.policy import default as default_policy
from pathlib import Path

import pytest

from tests.e2e.test_cli import MAILBEACON, cli_env, nats_children_of

Up = tuple[subprocess.Popen[str], dict[str, str], dict[str, str]]


@pytest.fixture
def up_without_site_url(tmp_path: Path) -> Iterator[Up]:
    env = cli_env(tmp_path)
    del env["MAILBEACON_SITE_URL"]  # the tracker's address comes from TRACKER_LISTEN alone
    process = subprocess.Popen(
        [*MAILBEACON, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    addresses: dict[str, str] = {}
    try:
        assert process.stdout is not None
        for line in process.stdout:
            match = re.match(r"\s+(send mail|statistics API)\b.*?\s((?:http://)?127\.0\.0\.1:\S+)", line)
            if match:
                addresses[match.group(1)] = match.group(2)
            if "NATS" in line and "nats://" in line:
                break
        yield process, addresses, env
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
        for leftover in nats_children_of(tmp_path / "data"):
            leftover.kill()


def elsewhere(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A command run from another directory, told nothing but the per-user runtime directory."""
    directory = tmp_path / "elsewhere"
    directory.mkdir(exist_ok=True)
    plain = {k: v for k, v in env.items() if not k.startswith("MAILBEACON_")}
    plain["MAILBEACON_RUNTIME_DIR"] = env["MAILBEACON_RUNTIME_DIR"]
    return subprocess.run(
        [*MAILBEACON, *args], env=plain, cwd=directory, capture_output=True, text=True, timeout=60
    )


def test_up_links_to_its_tracker_counts_deliveries_and_is_found_from_anywhere(
    up_without_site_url: Up, tmp_path: Path
) -> None:
    process, addresses, env = up_without_site_url
    tracker = env["MAILBEACON_TRACKER_LISTEN"]
    sent = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailbeacon.app.sendtest",
            "--smtp",
            addresses["send mail"],
            "--to",
            "ann@example.com",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    (kept,) = (tmp_path / "data" / "outbox").glob("*.eml")
    relayed = email.message_from_bytes(kept.read_bytes(), policy=default_policy)
    html = relayed.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    links = [
        link.replace("&amp;", "&") for link in re.findall(r'(?:src|href)="(http[^"]+/track/[^"]+)"', html)
    ]
    assert links and all(link.startswith(f"http://{tracker}/track/") for link in links), links
    pixel = next(link for link in links if "/track/pixel/" in link)
    with urllib.request.urlopen(pixel, timeout=5) as response:  # the pixel answers where it points
        assert response.status == 200

    statistics = addresses["statistics API"] + "/default/welcome/statistics"
    deadline = time.monotonic() + 20
    while True:
        with urllib.request.urlopen(statistics, timeout=5) as response:
            stats = json.load(response)
        if (stats["delivered_count"] == 1 and stats["unique_opens"] == 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (stats["sent_count"], stats["delivered_count"], stats["delivery_rate"]) == (1, 1, 100.0)
    assert stats["open_rate"] == 100.0  # per delivered copy: no longer 0.00% in development
    # A mailbox delivers after the relay accepted: the copy's timeline reads sent, then delivered.
    events_url = addresses["statistics API"] + "/default/welcome/events?type=sent,delivered"
    with urllib.request.urlopen(events_url, timeout=5) as response:
        newest_first = [e["type"] for e in json.load(response)["events"]]
    assert newest_first == ["delivered", "sent"], newest_first

    summary = elsewhere(tmp_path, env, "stats", "default/welcome")
    assert summary.returncode == 0, summary.stderr
    assert summary.stdout.startswith("default/welcome  (updated ")
    assert "sent 1, failed 0, delivered 1 (100.00%)" in summary.stdout
    as_json = elsewhere(tmp_path, env, "stats", "default/welcome", "--json")
    assert json.loads(as_json.stdout)["delivered_count"] == 1
    manifest = tmp_path / "campaign.yaml"
    manifest.write_text(
        "apiVersion: mailbeacon.io/v1alpha1\nkind: Campaign\nmetadata: {name: news, namespace: marketing}\nspec: {}\n"
    )
    applied = elsewhere(tmp_path, env, "campaign", "apply", "-f", str(manifest))
    assert applied.returncode == 0 and "news configured" in applied.stdout, applied.stderr

    state = Path(env["MAILBEACON_RUNTIME_DIR"]) / "mailbeacon" / "up.json"
    assert state.stat().st_mode & 0o077 == 0  # readable by the user only
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert not state.exists()  # removed on stop
    no_aggregator = elsewhere(tmp_path, env, "stats", "default/welcome")
    assert no_aggregator.returncode != 0
    assert "start `mailbeacon up`, or set MAILBEACON_AGGREGATOR_URL" in no_aggregator.stderr
    no_nats = elsewhere(tmp_path, env, "campaign", "apply", "-f", str(manifest))
    assert no_nats.returncode != 0 and "set MAILBEACON_NATS_URL" in no_nats.stderr
    assert "Traceback" not in no_aggregator.stderr + no_nats.stderr
