"""The `mailbeacon` command line as a user runs it: `up`, `campaign apply`, `stats`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import free_port

MAILBEACON = [sys.executable, "-m", "mailbeacon.app.cli"]


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MAILBEACON_") and k not in ("SITE_URL", "XDG_RUNTIME_DIR")
    }
    tracker = free_port()
    env.update(
        MAILBEACON_DATA_DIR=str(tmp_path / "data"),
        MAILBEACON_RUNTIME_DIR=str(tmp_path / "run"),
        MAILBEACON_SMTP_LISTEN="127.0.0.1:0",
        MAILBEACON_TRACKER_LISTEN=f"127.0.0.1:{tracker}",
        MAILBEACON_SITE_URL=f"http://127.0.0.1:{tracker}",
        MAILBEACON_AGGREGATOR_LISTEN=f"127.0.0.1:{free_port()}",
        MAILBEACON_PROXY_HTTP_LISTEN="127.0.0.1:0",
    )
    env.update(extra)
    return env


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], dict[str, str]]]:
    env = cli_env(tmp_path)
    process = subprocess.Popen(
        [*MAILBEACON, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    addresses: dict[str, str] = {}
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        for line in process.stdout:
            match = re.match(
                r"\s+(send mail|statistics API|outbox)\b.*?\s((?:http://)?127\.0\.0\.1:\S+)", line
            )
            if match:
                addresses[match.group(1)] = match.group(2)
            if ("NATS" in line and "nats://" in line) or time.monotonic() > deadline:
                break
        yield process, addresses, env
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for leftover in nats_children_of(tmp_path / "data"):
            leftover.kill()


def nats_children_of(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "nats-server" and any(str(data_dir) in part for part in cmdline):
            found.append(proc)
    return found


@pytest.mark.slow
def test_up_prints_addresses_relays_mail_and_stops_cleanly(
    up: tuple[subprocess.Popen[str], dict[str, str], dict[str, str]], tmp_path: Path
) -> None:
    process, addresses, env = up
    assert set(addresses) == {"send mail", "statistics API", "outbox"}, addresses
    assert len(nats_children_of(tmp_path / "data")) == 1
    send = subprocess.run(
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
    assert send.returncode == 0, send.stderr
    outbox = list((tmp_path / "data" / "outbox").glob("*.eml"))
    assert len(outbox) == 1 and b"/track/pixel/" in outbox[0].read_bytes()
    statistics = addresses["statistics API"] + "/default/welcome/statistics"
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(statistics, timeout=5) as response:
            sent = json.load(response)["sent_count"]
        if sent == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sent == 1
    listed = subprocess.run(
        # Repeated types are all asked for (no open yet: the sent event alone comes back).
        [*MAILBEACON, "events", "default/welcome", "--type", "sent", "--type", "opened"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 1 and " sent " in lines[0] and "ann@example.com" in lines[0]
    nothing = subprocess.run(
        [*MAILBEACON, "events", "--limit", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert nothing.returncode == 2 and "at least 1" in nothing.stderr
    with urllib.request.urlopen(addresses["outbox"], timeout=5) as response:
        assert "Welcome to mailbeacon" in response.read().decode()

    process.send_signal(signal.SIGINT)  # what Ctrl-C does
    assert process.wait(timeout=30) == 0
    assert nats_children_of(tmp_path / "data") == []  # the child nats-server is gone too


@pytest.mark.slow
def test_campaign_apply_defines_campaigns_in_the_bucket(
    up: tuple[subprocess.Popen[str], dict[str, str], dict[str, str]], tmp_path: Path
) -> None:
    _, addresses, env = up
    manifest = tmp_path / "campaign.yaml"
    manifest.write_text(
        "apiVersion: mailbeacon.io/v1alpha1\nkind: Campaign\n"
        "metadata: {name: newsletter, namespace: marketing}\nspec: {paused: true}\n"
    )
    applied = subprocess.run(
        [*MAILBEACON, "campaign", "apply", "-f", str(manifest)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr
    assert "marketing" in applied.stdout and "newsletter" in applied.stdout
    # The running proxy follows the bucket: mail of the paused campaign is deferred.
    import smtplib

    host, port = addresses["send mail"].rsplit(":", 1)
    deadline = time.monotonic() + 10
    while True:
        try:
            with smtplib.SMTP(host, int(port), timeout=10) as smtp:
                smtp.sendmail(
                    "news@example.com",
                    ["ann@example.com"],
                    "X-Campaign: marketing/newsletter\r\nSubject: x\r\n\r\nhello\r\n",
                )
        except smtplib.SMTPDataError as refused:
            assert refused.smtp_code == 451 and b"paused" in refused.smtp_error
            break
        assert time.monotonic() < deadline, "the paused campaign's mail was accepted"
        time.sleep(0.2)
    listed = subprocess.run([*MAILBEACON, "campaigns"], env=env, capture_output=True, text=True, timeout=60)
    assert "marketing/newsletter" in listed.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: mailbeacon.io/v1alpha1\nkind: Campaign\nmetadata: {name: x}\nspec: {paused: maybe}\n"
    )
    refused = subprocess.run(
        [*MAILBEACON, "campaign", "apply", "-f", str(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "invalid spec" in refused.stderr
    for missing in (tmp_path / "nonexistent.yaml", tmp_path):
        unreadable = subprocess.run(
            [*MAILBEACON, "campaign", "apply", "-f", str(missing)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert unreadable.returncode != 0
        assert f"cannot read {missing}" in unreadable.stderr and "Traceback" not in unreadable.stderr


@pytest.mark.slow
def test_components_need_their_settings(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    result = subprocess.run([*MAILBEACON, "tracker"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "MAILBEACON_NATS_URL is required" in result.stderr
    env["MAILBEACON_SITE_URL"] = "not a url"
    result = subprocess.run([*MAILBEACON, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "invalid configuration" in result.stderr


@pytest.mark.slow
def test_a_short_signing_key_stops_every_component_with_one_line(tmp_path: Path) -> None:
    """The error names the setting and never quotes the key."""
    env = cli_env(tmp_path, MAILBEACON_SECRET_KEYS="tooshort-key", MAILBEACON_NATS_URL="nats://127.0.0.1:1")
    for command in ("tracker", "proxy", "up"):
        result = subprocess.run([*MAILBEACON, command], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines() == [
            "invalid configuration: MAILBEACON_SECRET_KEYS: every key must be at least 32 characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        ]


@pytest.mark.slow
def test_up_refuses_a_short_generated_key_file_instead_of_replacing_it(tmp_path: Path) -> None:
    """Replacing the key would break every link already sent: `up` stops and says how to fix it."""
    env = cli_env(tmp_path)
    key_file = tmp_path / "data" / "secret.key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text("short-old-key\n")
    result = subprocess.run([*MAILBEACON, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{key_file} holds a signing key shorter than 32 characters" in result.stderr
    assert "MAILBEACON_SECRET_KEYS" in result.stderr and "short-old-key" not in result.stderr
    assert key_file.read_text() == "short-old-key\n"  # left alone
