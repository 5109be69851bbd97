"""Bringing the SQL schema up to date with the Alembic migrations, from any number of processes.

``mailbeacon migrate`` and (with ``MIGRATE_ON_START``) every aggregator at start-up run
:func:`migrate`. All revisions run in one transaction that first takes a migration lock
(a PostgreSQL advisory lock; on SQLite the ``BEGIN IMMEDIATE`` write lock), so replicas
starting together wait for each other and the later ones find nothing left to do.

A revision that adds statistics lists the campaigns to recount in ``pending_recounts``;
after the schema is committed, :func:`recount_pending` recounts each (``refresh``) in a
transaction of its own that also removes it from the list, so an interrupted upgrade
resumes where it stopped at the next ``migrate`` (or start of an aggregator).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import delete, inspect, select, text

from aggregator.read import statistics
from aggregator.store.db import Database
from aggregator.store.models import PENDING

MIGRATIONS = Path(__file__).parent / "migrations"
# The first revision is the schema that the first slice created with ``create_all``.
BASELINE = "0001"
_ADVISORY_LOCK = 0x6D62_6167  # "mbag": any constant shared by every aggregator


class SchemaOutOfDate(RuntimeError):
    """The database is not at the revision this code needs; the message says what to run."""


def _config(connection: Any = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS}")
    return head


def _current(connection: Any) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Any, target: str) -> tuple[str | None, str | None]:
    before = _current(connection)
    config = _config(connection)
    if before is None and inspect(connection).has_table("campaign_stats"):
        command.stamp(config, BASELINE)  # made by create_all before migrations existed
        before = BASELINE
    command.upgrade(config, target)
    return before, _current(connection)


async def migrate(db: Database, target: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to ``target``, then recount what the upgrade asked for; returns the revisions before and after."""
    async with db.writing() as conn:
        if db.dialect == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK})
        before, after = await conn.run_sync(_upgrade, target)
    if after == head_revision():
        await recount_pending(db)
    return before, after


async def recount_pending(db: Database) -> int:
    """Recount every campaign a migration listed, one transaction each; returns how many.

    Replicas doing it at once share the list (PostgreSQL: ``SKIP LOCKED``); an increment
    made meanwhile by ingest is part of the recount, which replaces the stored numbers.
    """
    done = 0
    while True:
        async with db.writing() as conn:
            pick = select(PENDING.c.campaign).order_by(PENDING.c.campaign).limit(1)
            if db.dialect == "postgresql":
                pick = pick.with_for_update(skip_locked=True)
            campaign = await conn.scalar(pick)
            if campaign is None:
                return done
            await statistics.refresh_in(conn, db, campaign)
            await conn.execute(delete(PENDING).where(PENDING.c.campaign == campaign))
        done += 1


def _downgrade(connection: Any, target: str) -> str | None:
    command.downgrade(_config(connection), target)
    return _current(connection)


async def downgrade(db: Database, target: str) -> str | None:
    """Step the schema back to ``target`` (``base`` drops everything); for rollbacks of a release."""
    async with db.writing() as conn:
        if db.dialect == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK})
        return await conn.run_sync(_downgrade, target)


async def current_revision(db: Database) -> str | None:
    async with db.read_engine.connect() as conn:
        return await conn.run_sync(_current)


async def ensure_schema(db: Database, migrate_on_start: bool) -> None:
    """Migrate when asked; otherwise refuse to run on a schema this code does not know (and
    finish the recounts an interrupted ``mailbeacon migrate`` left)."""
    if migrate_on_start:
        await migrate(db)
        return
    current, head = await current_revision(db), head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"the database schema is at revision {current or '(none)'} but this aggregator needs {head}: "
            "run `mailbeacon migrate` first, or set MAILBEACON_MIGRATE_ON_START=true"
        )
    await recount_pending(db)
