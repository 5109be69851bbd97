"""Set-based ingest, keyset-pagination time indexes, and the pruned-events archive.

``messages.newly_seen`` lets one conditional UPDATE per batch report which first-seen
columns it filled. The events list pages newest first by ``(occurred_at, id)``: the
campaign and type time indexes gain ``id``, and an index on time alone serves the
all-events view and pruning. ``pruned_events`` keeps pruned events in counted form so
statistics survive retention.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as messages:
        messages.add_column(sa.Column("newly_seen", sa.Integer(), server_default="0", nullable=False))
    op.drop_index("ix_events_campaign_time", table_name="events")
    op.drop_index("ix_events_type_time", table_name="events")
    op.create_index("ix_events_campaign_time", "events", ["campaign", "occurred_at", "id"])
    op.create_index("ix_events_type_time", "events", ["type", "occurred_at", "id"])
    op.create_index("ix_events_time", "events", ["occurred_at", "id"])
    op.create_table(
        "pruned_events",
        sa.Column("tracking_id", sa.String(36), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("machine", sa.Boolean(), nullable=False),
        sa.Column("bounce_kind", sa.String(4), nullable=False),
        sa.Column("url_hash", sa.String(64), nullable=False),
        sa.Column("campaign", sa.String(320), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("tracking_id", "type", "hour", "machine", "bounce_kind", "url_hash"),
    )
    op.create_index("ix_pruned_events_campaign", "pruned_events", ["campaign"])


def downgrade() -> None:
    op.drop_index("ix_pruned_events_campaign", table_name="pruned_events")
    op.drop_table("pruned_events")
    op.drop_index("ix_events_time", table_name="events")
    op.drop_index("ix_events_type_time", table_name="events")
    op.drop_index("ix_events_campaign_time", table_name="events")
    op.create_index("ix_events_type_time", "events", ["type", "occurred_at"])
    op.create_index("ix_events_campaign_time", "events", ["campaign", "occurred_at"])
    with op.batch_alter_table("messages") as messages:
        messages.drop_column("newly_seen")
