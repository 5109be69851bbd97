"""Provisioning, publishing and the campaign KV mirror against a real nats-server."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from mailbeacon.app.embedded_nats import EmbeddedNats, nats_server_binary
from mailbeacon.bus.campaign_store import CampaignStore
from mailbeacon.bus.jetstream import (
    CONSUMER,
    KV_BUCKET,
    STREAM,
    connect,
    provision,
    provision_patiently,
    redact_url,
)
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec
from mailbeacon.contract.events import Event, EventType, new_event_id
from tests.support import eventually, free_port, make_settings

TID = "0b7e4c2a-4f7e-4d8e-9a51-3c1f0f7d2b11"


@pytest.fixture
def nc(bare_nc: NATS) -> NATS:
    return bare_nc


async def test_provisioning_is_idempotent_and_follows_settings(nc: NATS, tmp_path: Path) -> None:
    js = nc.jetstream()
    settings = make_settings(tmp_path)
    await provision(js, settings)
    await provision(js, settings)  # a second replica starting changes nothing
    info = await js.stream_info(STREAM)
    assert info.config.subjects == ["mailbeacon.events.>"]
    assert info.config.max_age == pytest.approx(30 * 86400)
    consumer = await js.consumer_info(STREAM, CONSUMER)
    assert consumer.config.durable_name == CONSUMER
    assert (await js.key_value(KV_BUCKET)) is not None
    await provision(js, make_settings(tmp_path, stream_max_age_days=7))
    assert (await js.stream_info(STREAM)).config.max_age == pytest.approx(7 * 86400)
    # A process not told the retention (a proxy sidecar in an app's pod) leaves it alone.
    await provision(js, make_settings(tmp_path))
    assert (await js.stream_info(STREAM)).config.max_age == pytest.approx(7 * 86400)
    await provision(js, make_settings(tmp_path, stream_duplicate_window_seconds=120))
    info = await js.stream_info(STREAM)
    assert info.config.duplicate_window == pytest.approx(120)
    assert info.config.max_age == pytest.approx(7 * 86400)


async def test_publishing_deduplicates_by_event_id(nc: NATS, tmp_path: Path) -> None:
    js = nc.jetstream()
    await provision(js, make_settings(tmp_path))
    publisher = EventPublisher(js)
    event = Event(event_id=new_event_id(), type=EventType.OPENED, tracking_id=TID, source="pixel")
    await publisher.publish(event)
    await publisher.publish(event)  # a retried publish inside the duplicate window
    assert publisher.publish_later(event.model_copy(update={"event_id": new_event_id()}))
    await publisher.close()  # drains the buffer before returning
    info = await js.stream_info(STREAM)
    assert info.state.messages == 2
    stored = await js.get_msg(STREAM, 1)
    assert Event.from_json(stored.data or b"") == event
    assert stored.headers is not None and stored.headers["Nats-Msg-Id"] == event.event_id


async def test_campaign_store_mirrors_the_bucket(nats_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    writer_nc, reader_nc = await connect(nats_url, "writer"), await connect(nats_url, "reader")
    try:
        writer = CampaignStore(await provision(writer_nc.jetstream(), settings))
        key = CampaignKey("marketing", "news")
        await writer.put(key, CampaignSpec(paused=True))
        seen: list[tuple[CampaignKey, bool]] = []

        async def on_change(changed: CampaignKey, spec: CampaignSpec | None) -> None:
            seen.append((changed, spec is not None))

        reader = CampaignStore(await reader_nc.jetstream().key_value(KV_BUCKET), on_change=on_change)
        await reader.start()
        spec = reader.get(key)
        assert spec is not None and spec.paused  # loaded before start() returns
        await writer.put(key, CampaignSpec(paused=False))

        async def resumed() -> bool:
            spec = reader.get(key)
            return spec is not None and not spec.paused

        await eventually(resumed)
        assert await writer.create_if_missing(CampaignKey("default", "new"), CampaignSpec())
        assert not await writer.create_if_missing(CampaignKey("default", "new"), CampaignSpec())
        await writer.delete(key)

        async def deleted() -> bool:
            return reader.get(key) is None and reader.get(CampaignKey("default", "new")) is not None

        await eventually(deleted)
        assert seen[:2] == [(key, True), (key, True)] and (key, False) in seen
        await reader.stop()
    finally:
        await writer_nc.close()
        await reader_nc.close()


async def test_closing_our_own_connection_is_not_reported_as_a_disconnect(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await connect(nats_url, "close-test")
    with caplog.at_level(logging.INFO, logger="mailbeacon.bus.jetstream"):
        await client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_comma_separated_url_names_a_cluster(nats_url: str) -> None:
    """MAILBEACON_NATS_URL may list a cluster's servers, as the NATS CLI takes them: a server
    of the list that is down is skipped, and logs never show a password of any of them."""
    down = f"nats://127.0.0.1:{free_port()}"
    for url in (f"{down},{nats_url}", f" {nats_url} , {down} "):
        client = await connect(url, "cluster-test")
        try:
            assert client.connected_url is not None
            assert client.connected_url.geturl() == nats_url
            assert len(client.servers) == 2
        finally:
            await client.close()
    assert redact_url("nats://a:pw1@n1:4222,nats://tok@n2:4222,nats://n3:4222") == (
        "nats://***@n1:4222,nats://***@n2:4222,nats://n3:4222"
    )


async def test_a_component_waits_for_jetstream_instead_of_exiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy or aggregator that starts while JetStream cannot answer yet (a cluster electing
    its leader, a server under load) waits, saying so, and provisions once it answers; it
    exited with a traceback before. Here a nats-server without JetStream stands in, then the
    same port gets a server with it."""
    port = free_port()
    bare = await asyncio.create_subprocess_exec(
        str(nats_server_binary()),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server: EmbeddedNats | None = None
    client = await connect(f"nats://127.0.0.1:{port}", "patient-test")
    try:
        with caplog.at_level(logging.WARNING, logger="mailbeacon.bus.jetstream"):
            task = asyncio.create_task(
                provision_patiently(
                    client.jetstream(), make_settings(tmp_path), first_delay=0.1, max_delay=0.2
                )
            )

            async def waiting() -> bool:
                assert not task.done(), task  # it neither gave up nor pretended to succeed
                return "JetStream not ready" in caplog.text

            await eventually(waiting, within=10)
            bare.terminate()
            await asyncio.wait_for(bare.wait(), 10)
            server = EmbeddedNats(tmp_path / "nats", port=port)
            server.start()
            bucket = await asyncio.wait_for(task, 30)
        assert bucket is not None
        assert (await client.jetstream().stream_info(STREAM)).config.name == STREAM
    finally:
        await client.close()
        if bare.returncode is None:
            bare.kill()
            await bare.wait()
        if server is not None:
            server.stop()
