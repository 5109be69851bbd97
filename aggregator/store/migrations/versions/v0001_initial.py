"""The schema of the first end-to-end slice (what its ``create_all`` made).

Databases created before migrations existed have exactly these tables; ``mailbeacon
migrate`` stamps them with this revision and upgrades from here.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

TS = sa.DateTime(timezone=True)


def _counters(*names: str) -> list[sa.Column[int]]:
    return [sa.Column(name, sa.Integer(), nullable=False) for name in names]


def upgrade() -> None:
    op.create_table(
        "campaign_recipients",
        sa.Column("campaign", sa.String(320), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.PrimaryKeyConstraint("campaign", "recipient"),
    )
    op.create_table(
        "campaign_stats",
        sa.Column("campaign", sa.String(320), nullable=False),
        *_counters(
            "total_recipients",
            "sent_count",
            "failed_count",
            "delivered_count",
            "deferred_count",
            "bounced_count",
            "hard_bounced_count",
            "soft_bounced_count",
            "complained_count",
            "unsubscribed_count",
            "unique_opens",
            "total_opens",
            "human_unique_opens",
            "human_total_opens",
            "unique_clicks",
            "total_clicks",
            "human_unique_clicks",
            "human_total_clicks",
        ),
        sa.Column("updated_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("campaign"),
    )
    op.create_table(
        "campaigns",
        sa.Column("key", sa.String(320), nullable=False),
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("first_seen_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("tracking_id", sa.String(36), nullable=True),
        sa.Column("campaign", sa.String(320), nullable=True),
        sa.Column("recipient", sa.String(320), nullable=True),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("ip", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.Text(), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("bounce_kind", sa.String(4), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("machine", sa.Boolean(), nullable=False),
        sa.Column("machine_kind", sa.String(64), nullable=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_events_campaign_time", "events", ["campaign", "occurred_at"])
    op.create_index(
        "ix_events_parked",
        "events",
        ["recipient"],
        sqlite_where=sa.text("applied = 0"),
        postgresql_where=sa.text("applied = false"),
    )
    op.create_index("ix_events_message_type", "events", ["tracking_id", "type"])
    op.create_index("ix_events_type_time", "events", ["type", "occurred_at"])
    op.create_table(
        "link_stats",
        sa.Column("campaign", sa.String(320), nullable=False),
        sa.Column("url_hash", sa.String(64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("total_clicks", sa.Integer(), nullable=False),
        sa.Column("unique_clicks", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("campaign", "url_hash"),
    )
    op.create_index("ix_link_stats_rank", "link_stats", ["campaign", "total_clicks"])
    op.create_table(
        "message_links",
        sa.Column("tracking_id", sa.String(36), nullable=False),
        sa.Column("url_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("tracking_id", "url_hash"),
    )
    op.create_table(
        "messages",
        sa.Column("tracking_id", sa.String(36), nullable=False),
        sa.Column("campaign", sa.String(320), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("message_id", sa.String(998), nullable=True),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("sent_at", TS, nullable=True),
        sa.Column("delivered_at", TS, nullable=True),
        sa.Column("deferred_at", TS, nullable=True),
        sa.Column("first_opened_at", TS, nullable=True),
        sa.Column("first_human_opened_at", TS, nullable=True),
        sa.Column("first_clicked_at", TS, nullable=True),
        sa.Column("first_human_clicked_at", TS, nullable=True),
        sa.Column("bounced_at", TS, nullable=True),
        sa.Column("bounce_kind", sa.String(4), nullable=True),
        sa.Column("complained_at", TS, nullable=True),
        sa.Column("unsubscribed_at", TS, nullable=True),
        sa.Column("open_count", sa.Integer(), nullable=False),
        sa.Column("click_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("tracking_id"),
    )
    op.create_index("ix_messages_recipient_sent", "messages", ["recipient", "sent_at"])
    op.create_index("ix_messages_campaign", "messages", ["campaign"])
    op.create_table(
        "open_buckets",
        sa.Column("campaign", sa.String(320), nullable=False),
        sa.Column("hour", TS, nullable=False),
        sa.Column("opens", sa.Integer(), nullable=False),
        sa.Column("human_opens", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("campaign", "hour"),
    )


def downgrade() -> None:
    for table in (
        "open_buckets",
        "messages",
        "message_links",
        "link_stats",
        "events",
        "campaigns",
        "campaign_stats",
        "campaign_recipients",
    ):
        op.drop_table(table)
