"""The aggregator started with the environment the chart gives its pod, on a fresh database.

A new PostgreSQL (or the SQLite fallback on an emptyDir) has no schema, and an aggregator
refuses to run on a schema it does not know: the chart's default must bring it to life.
It listens on every interface, as in its pod, with the token from the chart's Secret.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.chart.test_helm_aggregator_auth import resolved
from tests.chart.test_helm_chart import API_TOKEN, manifests, render
from tests.support import free_port, wait_http_ok

pytest.importorskip("helm_python")


def aggregator_environment(
    values: dict[str, Any], tmp_path: Path, nats_url: str, port: int
) -> dict[str, str]:
    env = resolved(manifests(render(values)), "mb-mailbeacon-aggregator")
    assert env["MAILBEACON_AGGREGATOR_LISTEN"] == "0.0.0.0:8090"
    env.update(
        {
            # Where this machine differs from a pod: a single-node NATS, a free port, a data dir.
            "MAILBEACON_NATS_URL": nats_url,
            "MAILBEACON_STREAM_REPLICAS": "1",
            "MAILBEACON_AGGREGATOR_LISTEN": f"0.0.0.0:{port}",
            "MAILBEACON_DATA_DIR": str(tmp_path / "data"),
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
        }
    )
    return env


@pytest.mark.slow
async def test_default_chart_aggregator_migrates_a_fresh_database_and_serves(
    tmp_path: Path, nats_url: str
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailbeacon.app.cli",
        "aggregator",
        env=aggregator_environment({}, tmp_path, nats_url, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_http_ok(f"http://127.0.0.1:{port}/readyz", within=30)
        url = f"http://127.0.0.1:{port}/api/campaigns"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as response:
                assert response.status == 401  # auth on by default
            async with http.get(url, headers={"Authorization": f"Bearer {API_TOKEN}"}) as response:
                assert response.status == 200
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.mark.slow
def test_without_migrate_on_start_the_aggregator_says_what_to_run(tmp_path: Path, nats_url: str) -> None:
    env = aggregator_environment({"aggregator": {"migrateOnStart": False}}, tmp_path, nats_url, free_port())
    result = subprocess.run(
        [sys.executable, "-m", "mailbeacon.app.cli", "aggregator"], env=env, capture_output=True, timeout=60
    )
    assert result.returncode != 0
    assert b"run `mailbeacon migrate` first" in result.stdout + result.stderr
