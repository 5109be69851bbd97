"""Database engines for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger(__name__)


def async_url(url: str) -> str:
    """Map the URLs operators write to the async drivers we ship."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database {backend!r}: use sqlite:///... or postgresql://...")


def sqlite_url(data_dir: Path) -> str:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return f"sqlite:///{(data_dir / 'mailbeacon.db').resolve()}"


def protect_sqlite_file(path: Path) -> None:
    """The database holds recipients' addresses, IPs and user agents: the file (and the
    -wal and -shm files SQLite makes with the file's own mode) readable by this user only.
    A directory made for it is this user's alone; an existing one is left as it is (it may be
    the working directory or a home: not ours to change, and the files are closed anyway)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # also an older file made 0644 by an earlier release
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm", "-journal"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.chmod(0o600)
    except OSError as exc:  # not ours to change (a mounted volume): SQLite says more if it matters
        log.warning("could not restrict access to the database file %s: %s", path, exc.strerror)


def _switch_to_wal(cursor: Any) -> None:
    """WAL once per database file. The switch takes an exclusive lock, and SQLite does not
    wait on the busy timeout for it when replicas starting together on a new file all try
    it at once; so skip it when done, and retry briefly when another replica holds it."""
    for attempt in range(100):
        cursor.execute("PRAGMA journal_mode")
        if str(cursor.fetchone()[0]).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # the driver adapter's OperationalError, whatever its class
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)  # once, at connect: the other replica's switch takes milliseconds


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    # The busy timeout lets replicas take turns; it comes first because switching a new
    # database to WAL takes an exclusive lock that replicas starting together contend for.
    # WAL lets the API read while ingest writes.
    cursor.execute("PRAGMA busy_timeout=30000")
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Index pages stay in memory across transactions: ingest touches random pages of the
    # event-id and tracking-id indexes, which the default 2 MiB cache keeps re-reading.
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.execute("PRAGMA mmap_size=268435456")
    # Checkpoint every 64 MiB of WAL instead of every 4 MiB: ingest dirties thousands of
    # index pages per batch, and a page changed by many batches between two checkpoints is
    # copied into the database once (measured: a third less commit time at a million events).
    cursor.execute("PRAGMA wal_autocheckpoint=16384")
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@dataclass
class Database:
    """``engine`` for writes, ``read_engine`` for queries (the same engine on PostgreSQL)."""

    engine: AsyncEngine
    read_engine: AsyncEngine
    dialect: str
    # SQLite has one writer at a time; transactions of this process queue here instead of in
    # SQLite's busy handler, which sleeps and retries (other processes still wait there).
    write_lock: asyncio.Lock | None = None

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (committed on success, rolled back on error)."""
        if self.write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self.write_lock, self.engine.begin() as conn:
            yield conn

    @property
    def insert(self) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT."""
        return postgresql.insert if self.dialect == "postgresql" else sqlite.insert

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()


def open_database(url: str) -> Database:
    driver_url = async_url(url)
    if driver_url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            protect_sqlite_file(Path(database))
        writer = create_async_engine(driver_url, connect_args={"timeout": 30})
        reader = create_async_engine(driver_url, connect_args={"timeout": 30})
        for engine in (writer, reader):
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)

        # SQLite's deferred BEGIN upgrades to a write lock late and then fails at once when
        # another writer holds it; BEGIN IMMEDIATE waits for the lock up front instead.
        @event.listens_for(writer.sync_engine, "connect")
        def _no_autobegin(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(writer.sync_engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return Database(writer, reader, "sqlite", asyncio.Lock())
    engine = create_async_engine(driver_url, pool_size=10, max_overflow=10, pool_pre_ping=True)
    return Database(engine, engine, "postgresql")
