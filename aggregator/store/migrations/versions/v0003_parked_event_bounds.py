"""Parked events: found by address and arrival, and by age.

Address-only events attach only to copies relayed by their time plus a clock skew, their
time being bounded by their arrival (``received_at``): the parked index by address gains
``received_at``, so a new copy reads only the events that arrived shortly before it. A
second partial index orders the parked events waiting for a message by ``received_at``,
for their expiry (``PARKED_EVENT_TTL_HOURS``) and their cap (``PARKED_EVENT_LIMIT``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_WAITING = "applied = {false} AND type NOT IN ('sent', 'failed')"


def upgrade() -> None:
    op.drop_index("ix_events_parked", table_name="events")
    op.create_index(
        "ix_events_parked",
        "events",
        ["recipient", "received_at"],
        sqlite_where=sa.text("applied = 0"),
        postgresql_where=sa.text("applied = false"),
    )
    op.create_index(
        "ix_events_parked_since",
        "events",
        ["received_at", "id"],
        sqlite_where=sa.text(_WAITING.format(false=0)),
        postgresql_where=sa.text(_WAITING.format(false="false")),
    )


def downgrade() -> None:
    op.drop_index("ix_events_parked_since", table_name="events")
    op.drop_index("ix_events_parked", table_name="events")
    op.create_index(
        "ix_events_parked",
        "events",
        ["recipient"],
        sqlite_where=sa.text("applied = 0"),
        postgresql_where=sa.text("applied = false"),
    )
