"""Alembic environment: always driven by :mod:`aggregator.store.migrate` on a connection it opened.

The connection arrives already inside a transaction holding the migration lock, so every
revision runs in that one transaction (both PostgreSQL and SQLite have transactional DDL):
a failed upgrade leaves the schema as it was.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from aggregator.store import models  # noqa: F401  (registers the tables on SQLModel.metadata)

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `mailbeacon migrate`, not the alembic command line")

context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    # SQLite alters tables by copying them; batch mode does that for later revisions.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
