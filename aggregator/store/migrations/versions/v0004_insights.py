"""Insights: clients, devices, machines, mailbox providers and clicks over time.

``messages`` gains the recipient's domain (filled here from the recipient, by the same
rule as aggregator.store.domains.domain_of) and the client and device of its first person's
open (filled here from the stored events' user agents, aggregator.store.readers);
``open_buckets`` gains clicks; ``campaign_breakdowns`` and ``domain_stats`` keep
the new counts; ``pruned_events`` keeps, per row, a person's open's client and device,
a machine's kind and the earliest exact time, so a recount after retention still finds them.

The new counts of existing campaigns are not computed here: every campaign is listed in
``pending_recounts``, and ``mailbeacon migrate`` (or an aggregator migrating at start)
recounts each from its stored events right after this revision is committed (the
statistics' ``refresh``), one campaign per transaction, removing it from the list. Events
pruned before this revision kept no user agent: their people's opens count as client
``Other``, device ``unknown``, their machines as kind ``unknown``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

TS = sa.DateTime(timezone=True)
_OLD_PRUNED_KEY = ["tracking_id", "type", "hour", "machine", "bounce_kind", "url_hash"]
_NEW_PRUNED_KEY = [*_OLD_PRUNED_KEY, "client", "device", "machine_kind"]


def _domain_sql(dialect: str) -> str:
    """What follows the last '@' of ``recipient``, '' when there is none."""
    if dialect == "postgresql":
        return "CASE WHEN position('@' in recipient) > 0 THEN substring(recipient from '[^@]*$') ELSE '' END"
    # rtrim(x, every character of x but '@') leaves x up to its last '@'.
    return (
        "CASE WHEN instr(recipient, '@') > 0 THEN "
        "substr(recipient, length(rtrim(recipient, replace(recipient, '@', ''))) + 1) ELSE '' END"
    )


def _pruned_table(name: str, new: bool) -> None:
    columns: list[sa.Column[Any]] = [
        sa.Column("tracking_id", sa.String(36), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("hour", TS, nullable=False),
        sa.Column("machine", sa.Boolean(), nullable=False),
        sa.Column("bounce_kind", sa.String(4), nullable=False),
        sa.Column("url_hash", sa.String(64), nullable=False),
    ]
    if new:
        columns += [
            sa.Column("client", sa.String(64), nullable=False),
            sa.Column("device", sa.String(8), nullable=False),
            sa.Column("machine_kind", sa.String(64), nullable=False),
            sa.Column("first_at", TS, nullable=True),
        ]
    columns += [
        sa.Column("campaign", sa.String(320), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
    ]
    op.create_table(name, *columns, sa.PrimaryKeyConstraint(*(_NEW_PRUNED_KEY if new else _OLD_PRUNED_KEY)))


def _rebuild_pruned(new: bool) -> None:
    """pruned_events with the new key (or the old one again), its rows carried over."""
    op.drop_index("ix_pruned_events_campaign", table_name="pruned_events")
    op.rename_table("pruned_events", "pruned_events_before")
    if op.get_bind().dialect.name == "postgresql":
        # Index names are per schema: the new table's key takes the usual name.
        op.execute("ALTER INDEX pruned_events_pkey RENAME TO pruned_events_before_pkey")
    _pruned_table("pruned_events", new)
    old = ", ".join(_OLD_PRUNED_KEY)
    if new:
        op.execute(
            f"INSERT INTO pruned_events ({old}, client, device, machine_kind, first_at, campaign, recipient, url, n) "
            f"SELECT {old}, '', '', '', hour, campaign, recipient, url, n FROM pruned_events_before"
        )
    else:
        op.execute(
            f"INSERT INTO pruned_events ({old}, campaign, recipient, url, n) "
            f"SELECT {old}, min(campaign), min(recipient), min(url), sum(n) FROM pruned_events_before "
            f"GROUP BY {old}"
        )
    op.drop_table("pruned_events_before")
    op.create_index("ix_pruned_events_campaign", "pruned_events", ["campaign"])


def _fill_readers() -> None:
    """Each copy's client and device of its first person's open, from the stored events (opens
    pruned before this revision kept no user agent: client Other, device unknown)."""
    from aggregator.store.readers import OTHER, UNKNOWN_DEVICE, reader_of
    from aggregator.store.times import as_utc

    bind = op.get_bind()
    live = bind.execute(
        sa.text(
            "SELECT e.tracking_id, e.occurred_at, e.user_agent FROM events e JOIN (SELECT tracking_id, "
            "min(occurred_at) AS at FROM events WHERE applied = :yes AND type = 'opened' AND machine = :no "
            "GROUP BY tracking_id) f ON f.tracking_id = e.tracking_id AND f.at = e.occurred_at "
            "WHERE e.applied = :yes AND e.type = 'opened' AND e.machine = :no"
        ),
        {"yes": True, "no": False},
    )
    first: dict[str, tuple[Any, str, str]] = {}
    candidates = [(tid, (as_utc(at), *reader_of(agent))) for tid, at, agent in live]
    pruned = bind.execute(
        sa.text("SELECT tracking_id, hour FROM pruned_events WHERE type = 'opened' AND machine = :no"),
        {"no": False},
    )
    candidates += [(tid, (as_utc(hour), OTHER, UNKNOWN_DEVICE)) for tid, hour in pruned]
    for tid, candidate in candidates:
        if tid not in first or candidate < first[tid]:
            first[tid] = candidate
    rows = [
        {"tid": tid, "client": client, "device": device} for tid, (_, client, device) in sorted(first.items())
    ]
    for start in range(0, len(rows), 5000):
        bind.execute(
            sa.text(
                "UPDATE messages SET human_client = :client, human_device = :device WHERE tracking_id = :tid"
            ),
            rows[start : start + 5000],
        )


def upgrade() -> None:
    with op.batch_alter_table("messages") as messages:
        messages.add_column(sa.Column("domain", sa.String(320), nullable=True))
        messages.add_column(sa.Column("human_client", sa.String(64), nullable=True))
        messages.add_column(sa.Column("human_device", sa.String(8), nullable=True))
        messages.add_column(sa.Column("replaced_client", sa.String(64), nullable=True))
        messages.add_column(sa.Column("replaced_device", sa.String(8), nullable=True))
    op.execute(f"UPDATE messages SET domain = {_domain_sql(op.get_bind().dialect.name)}")
    with op.batch_alter_table("open_buckets") as buckets:
        buckets.add_column(sa.Column("clicks", sa.Integer(), server_default="0", nullable=False))
        buckets.add_column(sa.Column("human_clicks", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "campaign_breakdowns",
        sa.Column("campaign", sa.String(320), nullable=False),
        sa.Column("facet", sa.String(8), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("unique_opens", sa.Integer(), nullable=False),
        sa.Column("opens", sa.Integer(), nullable=False),
        sa.Column("clicks", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("campaign", "facet", "name"),
    )
    op.create_table(
        "domain_stats",
        sa.Column("campaign", sa.String(320), nullable=False),
        sa.Column("domain", sa.String(320), nullable=False),
        *(
            sa.Column(name, sa.Integer(), nullable=False)
            for name in ("sent", "delivered", "bounced", "complained", "unique_opens", "human_unique_opens")
        ),
        sa.PrimaryKeyConstraint("campaign", "domain"),
    )
    op.create_index("ix_domain_stats_rank", "domain_stats", ["campaign", "sent"])
    op.create_table(
        "pending_recounts",
        sa.Column("campaign", sa.String(320), nullable=False),
        sa.PrimaryKeyConstraint("campaign"),
    )
    _rebuild_pruned(new=True)
    _fill_readers()
    op.execute("INSERT INTO pending_recounts (campaign) SELECT campaign FROM campaign_stats")


def downgrade() -> None:
    _rebuild_pruned(new=False)
    op.drop_table("pending_recounts")
    op.drop_index("ix_domain_stats_rank", table_name="domain_stats")
    op.drop_table("domain_stats")
    op.drop_table("campaign_breakdowns")
    with op.batch_alter_table("open_buckets") as buckets:
        buckets.drop_column("human_clicks")
        buckets.drop_column("clicks")
    with op.batch_alter_table("messages") as messages:
        for column in ("replaced_device", "replaced_client", "human_device", "human_client", "domain"):
            messages.drop_column(column)
