"""The spool: files written durably, read back whatever a crash left, taken by one process only."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailbeacon.app.embedded_nats import EmbeddedNats
from mailbeacon.bus.fast_batch import Outgoing, outgoing
from mailbeacon.bus.jetstream import connect, provision
from mailbeacon.bus.publisher import SUBJECTS, EventPublisher
from mailbeacon.bus.spool import Spool, encode_frame
from mailbeacon.contract.events import Event, EventType, new_event_id
from mailbeacon.contract.signing import pixel_url
from tests.esp_payloads.harness import stream_events
from tests.support import make_settings
from tracker.service import StandaloneTracker


def frame(event_type: EventType = EventType.OPENED, **fields: Any) -> Outgoing:
    event = Event(event_id=new_event_id(), type=event_type, tracking_id=str(uuid.uuid4()), **fields)
    return outgoing(SUBJECTS[event.type], event.event_id, event.to_json())


def test_a_spool_file_is_private_complete_and_read_back_byte_for_byte(tmp_path: Path) -> None:
    spool = Spool.under(tmp_path)
    # Text JSON cannot carry every byte a payload may hold: such bytes survive too.
    frames = [
        frame(),
        frame(EventType.SENT, recipient="zoë@example.com"),
        (
            b"mailbeacon.events.opened",
            "odd",
            *outgoing(b"mailbeacon.events.opened", "odd", b'{"x":"\xff"}')[2:],
        ),
    ]
    path = spool.write(frames)
    assert path.parent == tmp_path / "spool" and path.name.endswith(".jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # recipients and IP addresses inside
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    (claim,) = spool.claim_all()
    assert claim.frames == frames and claim.skipped == 0
    assert not path.exists() and claim.path.exists()  # renamed to this process's name
    spool.settle(claim)
    assert list(path.parent.iterdir()) == []


def test_unreadable_lines_are_skipped_and_counted_and_never_stop_a_start(tmp_path: Path) -> None:
    spool = Spool.under(tmp_path)
    good = [frame(), frame()]
    directory = tmp_path / "spool"
    directory.mkdir()
    cut_short = encode_frame(frame())[:-20]  # the last line of a writer that died mid-line
    (directory / "20260101T000000Z-old.jsonl").write_bytes(
        encode_frame(good[0])
        + b"not json at all\n"
        + b'{"subject": "elsewhere.subject", "msg_id": "x", "payload": "{}"}\n'
        + b'{"subject": "mailbeacon.events.opened", "msg_id": 7, "payload": "{}"}\n'
        + encode_frame(good[1])
        + cut_short
    )
    publisher = EventPublisher(None, spool=spool)

    async def start() -> int:
        return publisher.load_spool()

    assert asyncio.run(start()) == 2
    assert publisher.spool_skipped == 4
    assert publisher.buffered == 2 and publisher.spooled == 2


def test_a_file_a_crashed_process_was_writing_is_recovered_but_a_live_writers_is_not(tmp_path: Path) -> None:
    spool = Spool.under(tmp_path)
    directory = tmp_path / "spool"
    directory.mkdir()
    frames = [frame(), frame()]
    dead = directory / "20260101T000000Z-dead.jsonl.tmp"
    dead.write_bytes(b"".join(map(encode_frame, frames)) + encode_frame(frame())[:30])
    (directory / "20260101T000001Z-empty.jsonl.tmp").write_bytes(b"")  # a writer before its first line
    alive = directory / "20260101T000002Z-alive.jsonl.tmp"
    alive.write_bytes(encode_frame(frame()))
    holder = os.open(alive, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # its writer is still at work
    try:
        (claim,) = spool.claim_all()
    finally:
        os.close(holder)
    assert claim.frames == frames and claim.skipped == 1
    assert sorted(p.name for p in directory.iterdir() if not p.name.endswith(".claimed")) == [
        "20260101T000001Z-empty.jsonl.tmp",
        "20260101T000002Z-alive.jsonl.tmp",
    ]


def _claim_in_child(directory: str, ready: Any, done: Any, found: Any) -> None:
    claims = Spool(Path(directory)).claim_all()
    found.put([message[1] for claim in claims for message in claim.frames])
    ready.wait()  # hold the locks until every process has looked
    done.wait()


@pytest.mark.slow
def test_concurrent_processes_never_take_the_same_file(tmp_path: Path) -> None:
    """`tracker --workers 4` starting on a shared DATA_DIR: every file taken once, by one."""
    spool = Spool.under(tmp_path)
    written = [[frame() for _ in range(3)] for _ in range(24)]
    for frames in written:
        spool.write(frames)
    context = multiprocessing.get_context("spawn")
    ready, done, found = context.Barrier(4), context.Event(), context.Queue()
    children = [
        context.Process(target=_claim_in_child, args=(str(tmp_path / "spool"), ready, done, found))
        for _ in range(4)
    ]
    for child in children:
        child.start()
    taken = [found.get(timeout=60) for _ in children]
    done.set()
    for child in children:
        child.join(30)
    every = [msg_id for ids in taken for msg_id in ids]
    assert sorted(every) == sorted(message[1] for frames in written for message in frames)  # none twice
    # The children died without settling their claims: a later start takes them over whole.
    again = Spool.under(tmp_path).claim_all()
    assert sorted(message[1] for claim in again for message in claim.frames) == sorted(every)


async def test_a_file_is_deleted_only_once_all_its_events_are_stored(tmp_path: Path, nats_url: str) -> None:
    spool = Spool.under(tmp_path)
    frames = [frame() for _ in range(50)]
    spool.write(frames[:20])
    spool.write(frames[20:])
    publisher = EventPublisher(None, spool=spool)
    assert publisher.load_spool() == 50
    await asyncio.sleep(0.3)  # no NATS yet: the files stay, taken by this process
    assert len(list((tmp_path / "spool").glob("*.claimed"))) == 2
    nc = await connect(nats_url, "test")
    try:
        await provision(nc.jetstream(), make_settings(tmp_path, nats_url=nats_url))
        publisher.attach(nc.jetstream())
        await asyncio.wait_for(publisher.spool_published(), 20)
        assert list((tmp_path / "spool").iterdir()) == []
        await publisher.close()
    finally:
        await nc.close()
    stored = await stream_events(nats_url)
    assert [e.event_id for e in stored] == [message[1] for message in frames]  # in order, once each


async def test_the_tracker_publishes_its_spool_ahead_of_new_events(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """The tracker serves before NATS answers: spooled events wait at the front of the buffer,
    a second stop with NATS still down keeps them (and the new ones) in one new file, and
    once NATS answers they are stored first."""
    settings = make_settings(tmp_path, nats_url=nats_server.url, shutdown_drain_seconds=0.5)
    earlier = [frame() for _ in range(5)]
    Spool.under(settings.data_dir).write(earlier)
    await asyncio.to_thread(nats_server.stop)
    later = [str(uuid.uuid4()) for _ in range(3)]
    async with aiohttp.ClientSession() as http:
        tracker = StandaloneTracker(settings)
        await tracker.start()
        try:
            assert tracker.publisher.buffered == 5
            for tid in later:
                async with http.get(pixel_url(settings.site_url, tid)) as response:
                    assert response.status == 200  # served with NATS down and a spool waiting
            await asyncio.sleep(0.1)  # the pixels' events reach the buffer
        finally:
            await tracker.stop()
    (kept,) = (settings.data_dir / "spool").iterdir()
    assert kept.name.endswith(".jsonl") and len(kept.read_bytes().splitlines()) == 8

    await asyncio.to_thread(nats_server.start)
    tracker = StandaloneTracker(settings)
    await tracker.start()
    try:
        await asyncio.wait_for(tracker.publisher.spool_published(), 30)
    finally:
        await tracker.stop()
    stored = await stream_events(nats_server.url)
    assert [e.event_id for e in stored[:5]] == [message[1] for message in earlier]
    assert sorted(e.tracking_id or "" for e in stored[5:]) == sorted(later)
    assert list((settings.data_dir / "spool").iterdir()) == []
