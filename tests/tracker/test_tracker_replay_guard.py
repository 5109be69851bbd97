"""The shared replay guard against a real nats-server: one rule for every provider.

A new key is taken; the same key with the same body is a retry; with another body, a
replay. Two guards (two workers) see one bucket. Without NATS nothing is taken unchecked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from mailbeacon.bus.jetstream import REPLAY_BUCKET, ensure_replay_bucket, provision, replay_window_seconds
from tests.support import make_settings
from tracker.webhooks.replay import Claim, ReplayGuardUnavailable, SharedReplayGuard, verdict


@pytest.fixture
def nc(bare_nc: NATS) -> NATS:
    return bare_nc


def guard(nc: NATS, tmp_path: Path) -> SharedReplayGuard:
    js = nc.jetstream()
    return SharedReplayGuard(make_settings(tmp_path), lambda: js)


async def test_one_rule_for_every_worker(nc: NATS, tmp_path: Path) -> None:
    first_worker, second_worker = guard(nc, tmp_path), guard(nc, tmp_path)
    assert await first_worker.claim("mailgun:token-1", b"body") is Claim.FIRST
    assert await second_worker.claim("mailgun:token-1", b"body") is Claim.RETRY
    assert await second_worker.claim("mailgun:token-1", b"swapped event-data") is Claim.REPLAY
    assert await first_worker.claim("mailgun:token-1", b"swapped event-data") is Claim.REPLAY
    # Keys are anyone's text: hashed into what KV keys allow.
    assert await first_worker.claim("mailgun:*.> \x00 ünïcode", b"body") is Claim.FIRST
    # Concurrent first claims of one key: exactly one wins.
    claims = await asyncio.gather(
        *(g.claim("sns:concurrent", b"same") for g in [first_worker, second_worker] * 5)
    )
    assert claims.count(Claim.FIRST) == 1 and claims.count(Claim.RETRY) == 9
    assert verdict(None, b"x") is Claim.REPLAY


async def test_without_nats_nothing_is_taken_unchecked(nc: NATS, tmp_path: Path) -> None:
    offline = SharedReplayGuard(make_settings(tmp_path), lambda: None)
    with pytest.raises(ReplayGuardUnavailable):
        await offline.claim("sns:1", b"body")
    online = guard(nc, tmp_path)
    assert await online.claim("sns:1", b"body") is Claim.FIRST
    await nc.close()  # the connection is gone while the guard still holds its bucket
    with pytest.raises(ReplayGuardUnavailable):
        await online.claim("sns:2", b"body")


async def test_the_bucket_expires_keys_after_the_replay_window(nc: NATS, tmp_path: Path) -> None:
    js: JetStreamContext = nc.jetstream()
    settings = make_settings(tmp_path)
    await provision(js, settings)
    stream = f"KV_{REPLAY_BUCKET}"
    assert (await js.stream_info(stream)).config.max_age == pytest.approx(3600 + 300)
    assert replay_window_seconds(settings) == 3900
    longer = make_settings(tmp_path, webhook_max_age_seconds=7200)
    await ensure_replay_bucket(js, longer)
    assert (await js.stream_info(stream)).config.max_age == pytest.approx(7500)
    # Never shortened: a process told a shorter window must not open a gap for the others.
    await ensure_replay_bucket(js, settings)
    assert (await js.stream_info(stream)).config.max_age == pytest.approx(7500)


async def test_a_bucket_lost_with_the_nats_store_is_made_again(nc: NATS, tmp_path: Path) -> None:
    js = nc.jetstream()
    replays = guard(nc, tmp_path)
    assert await replays.claim("sns:a", b"body") is Claim.FIRST
    await js.delete_key_value(REPLAY_BUCKET)  # as a NATS without a persistent volume restarts
    with pytest.raises(ReplayGuardUnavailable):
        await replays.claim("sns:b", b"body")  # the provider retries ...
    assert await replays.claim("sns:b", b"body") is Claim.FIRST  # ... and is heard
