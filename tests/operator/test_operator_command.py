"""``mailbeacon operator`` as the container runs it: a process, health endpoints, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from mailbeacon.contract.campaigns import CampaignKey
from tests.kube_api import FakeKubernetes
from tests.operator.test_operator_runtime import CRD, Kubectl, campaign_manifest, kv_spec
from tests.support import eventually, free_port, wait_http_ok

KEY = CampaignKey("marketing", "newsletter")


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    server = FakeKubernetes([yaml.safe_load(CRD.read_text())], namespaces=["default", "marketing"]).start()
    try:
        yield server
    finally:
        server.stop()


COMMANDS = {
    # What the container runs (the chart's operator Deployment: args ["operator"]).
    "mailbeacon operator": ["-m", "mailbeacon.app.cli", "operator"],
    # kopf's own runner, as docs/architecture.md "Layout" names the operator module.
    "kopf run": ["-m", "kopf", "run", "-m", "campaign_operator.handlers", "--standalone", "-n", "marketing"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
async def test_operator_command_serves_campaigns_until_sigterm(
    command: str, tmp_path: Path, nats_url: str, kube: FakeKubernetes
) -> None:
    health = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "KUBECONFIG": str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
        "MAILBEACON_NATS_URL": nats_url,
        "MAILBEACON_OPERATOR_LISTEN": f"127.0.0.1:{health}",
        "MAILBEACON_AGGREGATOR_URL": f"http://127.0.0.1:{free_port()}",
        "MAILBEACON_OPERATOR_NAMESPACES": "marketing",
        "MAILBEACON_DATA_DIR": str(tmp_path / "data"),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *COMMANDS[command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_http_ok(f"http://127.0.0.1:{health}/readyz")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{health}/metrics") as response:
                assert "mailbeacon_operator_statistics_errors_total" in await response.text()
            await Kubectl(kube, http).apply(campaign_manifest())

            async def stored() -> bool:
                return await kv_spec(nats_url, KEY) is not None

            await eventually(stored, within=20)
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, output.decode()[-3000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.slow
def test_operator_command_requires_nats(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "MAILBEACON_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "mailbeacon.app.cli", "operator"], env=env, capture_output=True, timeout=60
    )
    assert result.returncode != 0
    assert b"MAILBEACON_NATS_URL is required" in result.stderr
