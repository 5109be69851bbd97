"""SQL tables (sqlmodel). The same schema on SQLite and PostgreSQL, created by the Alembic
migrations in ``aggregator/store/migrations`` (never by ``create_all``).

``events`` is the record of everything that happened; the other tables are state
maintained from it on ingest so that reading statistics never scans events.
``pruned_events`` keeps what retention removed from ``events`` in counted form, so a
recount (``refresh``) still gives the same numbers after old events are gone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, String, Text, text
from sqlmodel import Field, SQLModel

_ID = 36  # a canonical UUID
# The predicate of ix_events_parked_since; queries repeat it word for word to use the index.
PARKED_SINCE_WHERE = "applied = {false} AND type NOT IN ('sent', 'failed')"


def _ts(**kwargs: Any) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), **kwargs))


class CampaignRow(SQLModel, table=True):
    __tablename__ = "campaigns"

    key: str = Field(primary_key=True, max_length=320)
    namespace: str = Field(max_length=63)
    name: str = Field(max_length=253)
    first_seen_at: datetime | None = _ts()


class CampaignStats(SQLModel, table=True):
    """Maintained counters, one row per campaign (see docs/architecture.md "Statistics")."""

    __tablename__ = "campaign_stats"

    campaign: str = Field(primary_key=True, max_length=320)
    total_recipients: int = 0
    sent_count: int = 0
    failed_count: int = 0
    delivered_count: int = 0
    deferred_count: int = 0
    bounced_count: int = 0
    hard_bounced_count: int = 0
    soft_bounced_count: int = 0
    complained_count: int = 0
    unsubscribed_count: int = 0
    unique_opens: int = 0
    total_opens: int = 0
    human_unique_opens: int = 0
    human_total_opens: int = 0
    unique_clicks: int = 0
    total_clicks: int = 0
    human_unique_clicks: int = 0
    human_total_clicks: int = 0
    updated_at: datetime | None = _ts()


COUNTER_COLUMNS: tuple[str, ...] = tuple(
    name for name in CampaignStats.model_fields if name not in ("campaign", "updated_at")
)


class MessageRow(SQLModel, table=True):
    """One recipient copy, with the first time each kind of event was seen for it."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_recipient_sent", "recipient", "sent_at"),)

    tracking_id: str = Field(primary_key=True, max_length=_ID)
    campaign: str = Field(max_length=320, index=True)
    recipient: str = Field(max_length=320)
    message_id: str | None = Field(default=None, max_length=998)
    status: str = Field(max_length=10)  # sent | failed
    sent_at: datetime | None = _ts()
    delivered_at: datetime | None = _ts()
    deferred_at: datetime | None = _ts()
    first_opened_at: datetime | None = _ts()
    first_human_opened_at: datetime | None = _ts()
    first_clicked_at: datetime | None = _ts()
    first_human_clicked_at: datetime | None = _ts()
    bounced_at: datetime | None = _ts()
    bounce_kind: str | None = Field(default=None, max_length=4)
    complained_at: datetime | None = _ts()
    unsubscribed_at: datetime | None = _ts()
    open_count: int = 0
    click_count: int = 0
    # What follows the last "@" of the recipient (aggregator.store.domains), for the domain breakdown.
    domain: str | None = Field(default=None, max_length=320)
    # Client and device of the first person's open (aggregator.store.readers; docs/architecture.md "Statistics").
    human_client: str | None = Field(default=None, max_length=64)
    human_device: str | None = Field(default=None, max_length=8)
    # The two above as they were before the latest ingest statement (like newly_seen), so that
    # RETURNING tells ingest which client and device a copy moved from.
    replaced_client: str | None = Field(default=None, max_length=64)
    replaced_device: str | None = Field(default=None, max_length=8)
    # Bit mask of the first-seen columns the latest ingest statement filled (see
    # aggregator.ingest.effects.Seen): SET expressions see the row before the update, so RETURNING
    # this column tells ingest exactly which unique counts it moved, in one atomic statement.
    newly_seen: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class EventRow(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_message_type", "tracking_id", "type"),
        # The time indexes end with ``id``: keyset pagination orders by (occurred_at, id).
        Index("ix_events_campaign_time", "campaign", "occurred_at", "id"),
        Index("ix_events_type_time", "type", "occurred_at", "id"),
        Index("ix_events_time", "occurred_at", "id"),
        # Parked events (waiting for their message) are few; partial indexes find them fast:
        # by address and arrival (address-only events, aggregator.store.attribution), and by age
        # for expiry and the cap (aggregator.ingest.parked; sent/failed kept only for the record are
        # left out, so they are never scanned past).
        Index(
            "ix_events_parked",
            "recipient",
            "received_at",
            sqlite_where=text("applied = 0"),
            postgresql_where=text("applied = false"),
        ),
        Index(
            "ix_events_parked_since",
            "received_at",
            "id",
            sqlite_where=text(PARKED_SINCE_WHERE.format(false=0)),
            postgresql_where=text(PARKED_SINCE_WHERE.format(false="false")),
        ),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    event_id: str = Field(max_length=200, unique=True)
    type: str = Field(max_length=16)
    tracking_id: str | None = Field(default=None, max_length=_ID)
    campaign: str | None = Field(default=None, max_length=320)
    recipient: str | None = Field(default=None, max_length=320)
    occurred_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # When the aggregator stored the event; for an address-only one, when the stream stored
    # it (its arrival, which bounds its time: aggregator.store.attribution). Parked events age by it.
    received_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, sa_column=Column(Text))
    url: str | None = Field(default=None, sa_column=Column(Text))
    bounce_kind: str | None = Field(default=None, max_length=4)
    reason: str | None = Field(default=None, sa_column=Column(Text))
    machine: bool = False
    machine_kind: str | None = Field(default=None, max_length=64)
    source: str = Field(max_length=32)
    details: dict[str, Any] | None = Field(default=None, sa_column=Column("metadata", JSON))
    applied: bool = Field(default=False)


class CampaignRecipient(SQLModel, table=True):
    """Distinct recipients per campaign, for ``total_recipients``."""

    __tablename__ = "campaign_recipients"

    campaign: str = Field(primary_key=True, max_length=320)
    recipient: str = Field(primary_key=True, max_length=320)


class LinkStats(SQLModel, table=True):
    __tablename__ = "link_stats"
    __table_args__ = (Index("ix_link_stats_rank", "campaign", "total_clicks"),)

    campaign: str = Field(primary_key=True, max_length=320)
    url_hash: str = Field(primary_key=True, max_length=64)
    url: str = Field(sa_column=Column(Text, nullable=False))
    total_clicks: int = 0
    unique_clicks: int = 0


class MessageLink(SQLModel, table=True):
    """Which links a message has clicked, for per-link unique clicks."""

    __tablename__ = "message_links"

    tracking_id: str = Field(primary_key=True, max_length=_ID)
    url_hash: str = Field(primary_key=True, max_length=64)


class OpenBucket(SQLModel, table=True):
    """Opens and clicks per campaign and UTC hour; days (and the heatmap) are sums of hours."""

    __tablename__ = "open_buckets"

    campaign: str = Field(primary_key=True, max_length=320)
    hour: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    opens: int = 0
    human_opens: int = 0
    clicks: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    human_clicks: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class Breakdown(SQLModel, table=True):
    """Counts per campaign by client and device of people's opens, and by kind of machine.

    ``facet`` ``client``: ``unique_opens`` copies whose first person's open was with that
    client, ``opens`` people's opens with it; ``device``: ``unique_opens`` likewise;
    ``machine``: ``opens`` and ``clicks`` flagged with that ``machine_kind``.
    """

    __tablename__ = "campaign_breakdowns"

    campaign: str = Field(primary_key=True, max_length=320)
    facet: str = Field(primary_key=True, max_length=8)
    name: str = Field(primary_key=True, max_length=64)
    unique_opens: int = 0
    opens: int = 0
    clicks: int = 0


class DomainStats(SQLModel, table=True):
    """Copies per campaign and mailbox provider (``gmail`` ... ``other``, no dot) or, for the
    providers' ``other``, per domain (with a dot): see aggregator.domains."""

    __tablename__ = "domain_stats"
    __table_args__ = (Index("ix_domain_stats_rank", "campaign", "sent"),)

    campaign: str = Field(primary_key=True, max_length=320)
    domain: str = Field(primary_key=True, max_length=320)
    sent: int = 0
    delivered: int = 0
    bounced: int = 0
    complained: int = 0
    unique_opens: int = 0
    human_unique_opens: int = 0


DOMAIN_COUNTERS: tuple[str, ...] = tuple(
    name for name in DomainStats.model_fields if name not in ("campaign", "domain")
)


class PendingRecount(SQLModel, table=True):
    """Campaigns whose statistics a migration asked to recount (aggregator.store.migrate)."""

    __tablename__ = "pending_recounts"

    campaign: str = Field(primary_key=True, max_length=320)


class PrunedEvent(SQLModel, table=True):
    """Events removed by retention, counted per message, type, hour and the details that
    statistics group by. A recount reads these rows weighted by ``n`` alongside ``events``;
    ``first_at`` is the earliest exact time of a row's events (which open came first)."""

    __tablename__ = "pruned_events"
    __table_args__ = (Index("ix_pruned_events_campaign", "campaign"),)

    tracking_id: str = Field(primary_key=True, max_length=_ID)
    type: str = Field(primary_key=True, max_length=16)
    hour: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    machine: bool = Field(primary_key=True)
    bounce_kind: str = Field(primary_key=True, max_length=4)  # "" when not a bounce
    url_hash: str = Field(primary_key=True, max_length=64)  # "" when not a click
    # A person's open: its client and device (aggregator.store.readers); "" otherwise, and for
    # opens pruned before these were kept (they count as client Other, device unknown).
    client: str = Field(default="", primary_key=True, max_length=64)
    device: str = Field(default="", primary_key=True, max_length=8)
    machine_kind: str = Field(default="", primary_key=True, max_length=64)  # "" when not a machine
    first_at: datetime | None = _ts()
    campaign: str = Field(max_length=320)
    recipient: str | None = Field(default=None, max_length=320)
    url: str | None = Field(default=None, sa_column=Column(Text))
    n: int = 0


# The tables, for SQLAlchemy Core statements.
EVENTS = EventRow.__table__  # type: ignore[attr-defined]
MESSAGES = MessageRow.__table__  # type: ignore[attr-defined]
STATS = CampaignStats.__table__  # type: ignore[attr-defined]
CAMPAIGNS = CampaignRow.__table__  # type: ignore[attr-defined]
RECIPIENTS = CampaignRecipient.__table__  # type: ignore[attr-defined]
LINKS = LinkStats.__table__  # type: ignore[attr-defined]
MESSAGE_LINKS = MessageLink.__table__  # type: ignore[attr-defined]
BUCKETS = OpenBucket.__table__  # type: ignore[attr-defined]
PRUNED = PrunedEvent.__table__  # type: ignore[attr-defined]
BREAKDOWNS = Breakdown.__table__  # type: ignore[attr-defined]
DOMAINS = DomainStats.__table__  # type: ignore[attr-defined]
PENDING = PendingRecount.__table__  # type: ignore[attr-defined]

__all__ = [
    "BREAKDOWNS",
    "BUCKETS",
    "CAMPAIGNS",
    "COUNTER_COLUMNS",
    "DOMAINS",
    "DOMAIN_COUNTERS",
    "EVENTS",
    "LINKS",
    "MESSAGES",
    "MESSAGE_LINKS",
    "PARKED_SINCE_WHERE",
    "PENDING",
    "PRUNED",
    "RECIPIENTS",
    "STATS",
    "Breakdown",
    "CampaignRecipient",
    "CampaignRow",
    "CampaignStats",
    "DomainStats",
    "EventRow",
    "LinkStats",
    "MessageLink",
    "MessageRow",
    "OpenBucket",
    "PendingRecount",
    "PrunedEvent",
    "String",
]
