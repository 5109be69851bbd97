"""The aggregator's own clients send a token when one is configured: the command line
(`mailbeacon stats|events|refresh|campaigns`) and the Campaign operator, against a real
aggregator that requires one. A refusal is one line saying which setting to set."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import kopf
import pytest
from nats.aio.client import Client as NATS

from campaign_operator.statistics_client import StatisticsClient, StatisticsUnavailable
from campaign_operator.wiring import CampaignOperator
from mailbeacon.contract.campaigns import CampaignKey
from tests.auth_support import CAMPAIGN, FULL, READ, Running, aggregators
from tests.support import make_settings


@pytest.fixture
async def running(tmp_path: Path, nc: NATS, nats_url: str) -> AsyncIterator[Running]:
    async with aggregators(tmp_path, nc, nats_url) as start:
        yield await start()


async def cli(running: Running, *args: str, **env: str) -> tuple[int, str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MAILBEACON_")}
    environment.update(MAILBEACON_AGGREGATOR_URL=running.base, **env)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailbeacon.app.cli",
        *args,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
async def test_the_command_line_sends_its_token(running: Running) -> None:
    code, _, err = await cli(running, "stats", CAMPAIGN)
    assert code == 1 and "requires a token (401): set MAILBEACON_API_TOKEN" in one_line(err)
    code, _, err = await cli(running, "campaigns", MAILBEACON_API_TOKEN="not-the-token-0123456789abc")
    assert code == 1 and "does not accept the token (401)" in one_line(err)

    code, out, err = await cli(running, "stats", CAMPAIGN, "--json", MAILBEACON_API_TOKEN=READ)
    assert code == 0, err
    assert json.loads(out)["sent_count"] == 1
    code, out, err = await cli(running, "events", CAMPAIGN, MAILBEACON_API_TOKEN=READ)
    assert code == 0 and "ann@example.com" in out, err
    code, _, err = await cli(running, "refresh", CAMPAIGN, MAILBEACON_API_TOKEN=READ)
    assert code == 1 and "may only read" in one_line(err) and "MAILBEACON_API_TOKEN" in err

    # Without API_TOKEN the first of API_TOKENS is sent (the aggregator's own environment).
    code, out, err = await cli(running, "refresh", CAMPAIGN, MAILBEACON_API_TOKENS=f"{FULL},{READ}x")
    assert code == 0, err
    assert json.loads(out)["sent_count"] == 1
    code, out, err = await cli(running, "campaigns", MAILBEACON_API_READ_TOKENS=READ)
    assert code == 0 and CAMPAIGN in out, err


async def test_the_operator_reads_statistics_with_its_token(
    running: Running, tmp_path: Path, nats_url: str
) -> None:
    key = CampaignKey.parse(CAMPAIGN)
    async with aiohttp.ClientSession() as http:
        statistics = await StatisticsClient(running.base, http, token=READ).fetch(key)
        assert statistics is not None and statistics["sent_count"] == 1
        with pytest.raises(StatisticsUnavailable, match="set MAILBEACON_API_TOKEN"):
            await StatisticsClient(running.base, http).fetch(key)
        with pytest.raises(StatisticsUnavailable, match="does not accept the operator's token"):
            await StatisticsClient(running.base, http, token=READ + "x").fetch(key)

    # Wired as it runs: a read token from its settings (API_READ_TOKENS before API_TOKENS).
    settings = make_settings(
        tmp_path,
        nats_url=nats_url,
        aggregator_url=running.base,
        operator_listen="127.0.0.1:0",
        api_tokens=FULL,
        api_read_tokens=READ,
    )
    operator = CampaignOperator(settings)
    await operator.startup(kopf.OperatorSettings())
    try:
        assert operator.statistics is not None
        fetched = await operator.statistics.fetch(key)
        assert fetched is not None and fetched["sent_count"] == 1
    finally:
        await operator.cleanup()


def test_clients_pick_the_token_they_need() -> None:
    from mailbeacon.contract.settings import Settings

    both = Settings(api_tokens=FULL, api_read_tokens=READ)
    assert both.aggregator.client_token() == FULL  # the CLI may refresh
    assert both.aggregator.client_token(read_only=True) == READ  # the operator only reads
    assert Settings(api_tokens=FULL).aggregator.client_token(read_only=True) == FULL
    chosen = Settings(api_token="chosen-token", api_tokens=FULL, api_read_tokens=READ)
    assert (
        chosen.aggregator.client_token() == chosen.aggregator.client_token(read_only=True) == "chosen-token"
    )
    assert Settings().aggregator.client_token() is None
