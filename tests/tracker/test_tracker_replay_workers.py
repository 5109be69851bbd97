"""One replay guard for every worker: `mailbeacon tracker --workers 2` as operators run it.

Mailgun signs only timestamp and token, so a captured request can be replayed with other
event-data. With a guard in each process's memory, the worker that had not seen the token
took it. The shared guard (NATS KV ``mailbeacon_webhook_replay``) refuses it whichever worker
gets it; a provider's retry of the very same request (SNS retries are normal) is answered
200 and stores nothing new.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from mailbeacon.app.embedded_nats import EmbeddedNats
from tests.esp_payloads.harness import (
    MAILGUN_KEY,
    TOPIC,
    mailgun_body,
    now_ts,
    ses_event,
    sns_headers,
    sns_notification,
    stream_events,
    write_sns_certificate,
)
from tests.support import SECRET, eventually, free_port

ATTEMPTS = 24  # fresh connections: the chance that all reach the same worker is 2 ** -23


def _delivered(recipient: str) -> dict[str, object]:
    return {"event": "delivered", "id": uuid.uuid4().hex, "timestamp": now_ts(), "recipient": recipient}


async def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    # A session per request: a new connection, which the kernel hands to either worker.
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as response:
        return response.status


async def _answered(url: str, body: bytes, headers: dict[str, str]) -> list[int]:
    """ATTEMPTS answers other than 503: a worker that has not reached NATS yet answers 503 (it
    never takes a request unchecked), and the provider would retry."""
    answers: list[int] = []
    for _ in range(ATTEMPTS * 20):
        status = await _post(url, body, headers)
        if status == 503:
            await asyncio.sleep(0.1)
            continue
        answers.append(status)
        if len(answers) == ATTEMPTS:
            break
    return answers


@pytest.mark.slow
async def test_replays_are_refused_by_every_worker_and_retries_store_once(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAILBEACON_")},
        "MAILBEACON_NATS_URL": nats_server.url,
        "MAILBEACON_SECRET_KEYS": SECRET,
        "MAILBEACON_TRACKER_LISTEN": f"127.0.0.1:{port}",
        "MAILBEACON_SITE_URL": f"http://127.0.0.1:{port}",
        "MAILBEACON_MAILGUN_SIGNING_KEY": MAILGUN_KEY,
        "MAILBEACON_SES_TOPIC_ARNS": TOPIC,
        "MAILBEACON_SNS_CERT_DIR": str(write_sns_certificate(tmp_path / "certs").parent),
        "MAILBEACON_LOG_LEVEL": "INFO",
    }
    log_path = tmp_path / "tracker.log"
    command = [str(Path(sys.executable).parent / "mailbeacon"), "tracker", "--workers", "2"]
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=log, stderr=log, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        mailgun = mailgun_body(_delivered("ann@example.com"))
        json_headers = {"Content-Type": "application/json"}

        async def first_taken() -> bool:
            try:
                return await _post(f"{base}/webhooks/mailgun", mailgun, json_headers) == 200
            except aiohttp.ClientError:
                return False

        await eventually(first_taken, within=30)  # the workers serve, and reach NATS

        async def both_connected() -> bool:
            # Until a worker reaches NATS it answers 503, which _answered skips: under load one
            # worker could then take every request, and the test would not see the other refuse.
            lines = [line for line in log_path.read_text().splitlines() if "connected to NATS" in line]
            return all(any(name in line.split() for line in lines) for name in ("tracker-0", "tracker-1"))

        await eventually(both_connected, within=30)
        # The captured request with other event-data: a forged complaint under a valid signature.
        forged = json.loads(mailgun)
        forged["event-data"] = {**_delivered("victim@example.com"), "event": "complained"}
        body = json.dumps(forged).encode()

        assert await _answered(f"{base}/webhooks/mailgun", body, json_headers) == [403] * ATTEMPTS

        message = sns_notification(ses_event("Delivery", messageId=uuid.uuid4().hex))
        ses_body, ses_headers = json.dumps(message).encode(), sns_headers(message)
        assert await _answered(f"{base}/webhooks/ses", ses_body, ses_headers) == [200] * ATTEMPTS

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    logged = log_path.read_text()
    refusals = [
        line for line in logged.splitlines() if "mailgun webhook refused" in line and "replay" in line
    ]
    assert len(refusals) == ATTEMPTS
    assert {"tracker-0", "tracker-1"} <= {word for line in refusals for word in line.split()}, logged[-3000:]
    stored = await stream_events(nats_server.url)
    assert sorted((e.source, e.type.value, e.recipient) for e in stored) == [
        ("webhook:mailgun", "delivered", "ann@example.com"),
        ("webhook:ses", "delivered", "ann@example.com"),
    ]
