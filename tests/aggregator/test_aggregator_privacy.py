"""A campaign's ``privacy.anonymizeIp`` on both databases: the stored IP of its events keeps
only the IPv4 /24 or IPv6 /48, whether the event is applied at once or parked until its
message arrives; other campaigns keep the address as sent. And address-only webhooks
resolve to the most recent message sent to that address by the time of the event (or up to
five minutes after it, when none was), never to one relayed later."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from aggregator.ingest.ingest import apply_batch
from aggregator.store.db import Database, open_database
from aggregator.store.migrate import migrate
from aggregator.store.models import EVENTS, MESSAGES
from mailbeacon.contract.events import Event, EventType
from mailbeacon.contract.netaddr import anonymize_ip

START = datetime(2026, 7, 1, 9, 0, tzinfo=UTC)


def test_anonymize_ip_keeps_the_network_only() -> None:
    assert anonymize_ip("203.0.113.77") == "203.0.113.0"
    assert anonymize_ip("2001:db8:abcd:12:34::9") == "2001:db8:abcd::"
    assert anonymize_ip("::ffff:198.51.100.9") == "198.51.100.0"
    assert anonymize_ip(" 192.0.2.1 ") == "192.0.2.0"
    assert anonymize_ip("not-an-ip") is None  # dropped rather than kept: it may identify
    assert anonymize_ip("") is None


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = open_database(database_url)
    await migrate(database)
    yield database
    await database.dispose()


def sent(tid: str, campaign: str, recipient: str, at: datetime) -> Event:
    return Event(
        event_id=f"{tid}-sent", type=EventType.SENT, tracking_id=tid, campaign=campaign, recipient=recipient,
        occurred_at=at,
    )  # fmt: skip


def opened(
    tid: str | None, ip: str, recipient: str | None = None, kind: EventType = EventType.OPENED
) -> Event:
    # The address also where the tracker's classification and the provider's payload quote it.
    return Event(
        event_id=uuid.uuid4().hex, type=kind, tracking_id=tid, recipient=recipient, ip=ip,
        occurred_at=START + timedelta(hours=1), source="pixel", user_agent=f"Scanner/2.0 (via {ip})",
        reason=f"550 5.7.1 [{ip}] blocked",
        metadata={"machine_evidence": f"image fetched from {ip}", "payload": {"ip": ip, "hops": [f"from {ip}"]}},
    )  # fmt: skip


async def stored_text(db: Database, event_id: str) -> str:
    """Everything an event row holds besides its ip column, as one text."""
    async with db.read_engine.connect() as conn:
        row = (
            await conn.execute(
                select(EVENTS.c.user_agent, EVENTS.c.reason, EVENTS.c["metadata"]).where(
                    EVENTS.c.event_id == event_id
                )
            )
        ).one()
    return json.dumps([row[0], row[1], row[2]])


async def stored_ips(db: Database, event_ids: list[str]) -> dict[str, tuple[str | None, bool]]:
    async with db.read_engine.connect() as conn:
        rows = await conn.execute(
            select(EVENTS.c.event_id, EVENTS.c.ip, EVENTS.c.applied).where(EVENTS.c.event_id.in_(event_ids))
        )
        return {event_id: (ip, bool(applied)) for event_id, ip, applied in rows}


async def test_campaign_privacy_anonymizes_stored_ips(db: Database) -> None:
    tag = uuid.uuid4().hex[:8]
    private, public = f"priv/{tag}-anon", f"priv/{tag}-open"
    anonymized = {private}
    m_private, m_public, m_later = (str(uuid.uuid4()) for _ in range(3))
    await apply_batch(
        db,
        [
            sent(m_private, private, f"a@{tag}.example", START),
            sent(m_public, public, f"b@{tag}.example", START),
        ],
        anonymized,
    )
    applied_now = [
        opened(m_private, "203.0.113.77"),
        opened(m_private, "2001:db8:abcd:12:34::9"),
        opened(m_public, "203.0.113.77"),
    ]
    # Parked: their message arrives in a later batch, only then is their campaign known.
    parked = [
        opened(m_later, "198.51.100.23"),
        opened(None, "198.51.100.24", recipient=f"c@{tag}.example", kind=EventType.BOUNCED),
    ]
    await apply_batch(db, applied_now + parked, anonymized)
    before = await stored_ips(db, [e.event_id for e in parked])
    assert all(not applied for _, applied in before.values())
    await apply_batch(db, [sent(m_later, private, f"c@{tag}.example", START)], anonymized)

    ips = await stored_ips(db, [e.event_id for e in applied_now + parked])
    assert ips[applied_now[0].event_id] == ("203.0.113.0", True)
    assert ips[applied_now[1].event_id] == ("2001:db8:abcd::", True)
    assert ips[applied_now[2].event_id] == ("203.0.113.77", True)  # a campaign without the setting
    assert ips[parked[0].event_id] == ("198.51.100.0", True)
    assert ips[parked[1].event_id] == ("198.51.100.0", True)
    for event, full, kept in (
        (applied_now[0], "203.0.113.77", "203.0.113.0"),
        (applied_now[1], "2001:db8:abcd:12:34::9", "2001:db8:abcd::"),
        (parked[0], "198.51.100.23", "198.51.100.0"),
        (parked[1], "198.51.100.24", "198.51.100.0"),
    ):
        text = await stored_text(db, event.event_id)
        assert full not in text and text.count(kept) == 5, (
            text
        )  # user agent, reason, evidence, payload ip, hops
    assert (await stored_text(db, applied_now[2].event_id)).count("203.0.113.77") == 5  # kept as sent


async def test_address_only_events_resolve_to_the_message_sent_by_their_time(db: Database) -> None:
    tag = uuid.uuid4().hex[:8]
    campaign, address = f"addr/{tag}", f"dana@{tag}.example"
    first, second, third = (str(uuid.uuid4()) for _ in range(3))
    await apply_batch(
        db,
        [
            sent(first, campaign, address, START),
            sent(second, campaign, address, START + timedelta(days=1)),
            sent(third, campaign, address, START + timedelta(days=2)),
            sent(str(uuid.uuid4()), campaign, f"other@{tag}.example", START + timedelta(days=3)),
            # Copies never relayed (refused by the upstream, withheld after an unsubscribe):
            # no provider reports on them, so no webhook is theirs however recent.
            Event(
                event_id=f"{tag}-refused",
                type=EventType.FAILED,
                tracking_id=str(uuid.uuid4()),
                campaign=f"other/{tag}",
                recipient=address,
                occurred_at=START + timedelta(days=8),
            ),
        ],
    )

    def webhook(at: datetime, kind: EventType = EventType.DELIVERED) -> Event:
        return Event(
            event_id=uuid.uuid4().hex, type=kind, recipient=address.upper(), occurred_at=at,
            source="webhook:generic",
        )  # fmt: skip

    cases = {
        first: webhook(START + timedelta(hours=5)),  # between the first and second sends
        second: webhook(START + timedelta(days=1, hours=1), EventType.BOUNCED),
        third: webhook(START + timedelta(days=9)),  # after every send: the latest
    }
    # Clocks disagree a little: the first copy was relayed three minutes after the event.
    skewed = webhook(START - timedelta(minutes=3))
    before_any = webhook(START - timedelta(days=1), EventType.COMPLAINED)  # before every send
    await apply_batch(db, [*cases.values(), skewed, before_any])
    async with db.read_engine.connect() as conn:
        rows = dict(
            (
                await conn.execute(
                    select(EVENTS.c.event_id, EVENTS.c.tracking_id).where(
                        EVENTS.c.event_id.in_([e.event_id for e in [*cases.values(), skewed, before_any]])
                    )
                )
            ).all()
        )
        times = dict(
            (
                await conn.execute(
                    select(MESSAGES.c.tracking_id, MESSAGES.c.bounced_at).where(
                        MESSAGES.c.recipient == address
                    )
                )
            ).all()
        )
    for tid, e in cases.items():
        assert rows[e.event_id] == tid, e.occurred_at
    assert rows[skewed.event_id] == first
    assert rows[before_any.event_id] is None  # no copy relayed by then: it waits (parked), and expires
    assert times[second] is not None and times[first] is None and times[third] is None
