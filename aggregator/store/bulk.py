"""Set-based SQL on both databases: a batch of literal rows as one relation.

Ingest works on whole batches: "insert these 2,000 events", "fill the first open of
these 800 messages where it is still empty". Each such statement reads its rows from a
relation, so the statement text never depends on the batch size (prepared once, cached)
and no per-row round trips happen:

- PostgreSQL: large row sets are staged with ``COPY`` (binary) into a temporary table;
  small ones are bound as ``unnest(CAST(:a AS text[]), ...)``, one array per column.
- SQLite: ``json_each(:rows)`` over one JSON document of row arrays, or ``executemany``.

Statements run on the driver connection (asyncpg / aiosqlite) inside the transaction
SQLAlchemy opened: at tens of thousands of events a second, per-statement and per-row
overhead of the ORM layer is the bottleneck. They use SQL both dialects understand
(``ON CONFLICT``, ``RETURNING``, ``UPDATE ... FROM``; SQLite 3.35 or newer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator.store.attribution import CLOCK_SKEW
from aggregator.store.times import sqlite_time

T = TypeVar("T")
Kind = Literal["text", "ts", "bool", "int", "json"]
Column = tuple[str, Kind]

_PG_TYPE: dict[Kind, str] = {
    "text": "text",
    "ts": "timestamptz",
    "bool": "boolean",
    "int": "bigint",
    "json": "text",
}


def json_text(value: Any) -> str:
    """JSON as the events table keeps it (compact; anything else as its text)."""
    return json.dumps(value, separators=(",", ":"), default=str)


_SQLITE_CONVERT: dict[Kind, Callable[[Any], Any]] = {"ts": sqlite_time, "json": json_text}
_PG_CONVERT: dict[Kind, Callable[[Any], Any]] = {"json": json_text}
_UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@lru_cache(maxsize=512)
def _numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """``:name`` placeholders as asyncpg's ``$1``, and the names in order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED.sub(number, sql), tuple(names)


def _converted(
    columns: Sequence[Column], rows: Iterable[Sequence[Any]], table: dict[Kind, Callable[[Any], Any]]
) -> list[tuple[Any, ...]]:
    converting = [(i, c) for i, (_, kind) in enumerate(columns) if (c := table.get(kind))]
    if not converting:
        return [tuple(row) for row in rows]
    out = []
    for row in rows:
        values = list(row)
        for i, convert in converting:
            if values[i] is not None:
                values[i] = convert(values[i])
        out.append(tuple(values))
    return out


async def overlapped(statement: Awaitable[T], meanwhile: Callable[[], object]) -> T:
    """Await ``statement`` while running ``meanwhile``, plain Python, as the database works on it.

    The statement is started first (one turn of the loop sends it: asyncpg writes a cached
    statement before it first waits, aiosqlite hands it to its thread), so the two overlap.
    """
    running = asyncio.ensure_future(statement)
    try:
        await asyncio.sleep(0)
        meanwhile()
    except BaseException:
        # The connection is mid-statement: let it finish before the failure unwinds the transaction.
        with contextlib.suppress(BaseException):
            await running
        raise
    return await running


@dataclass(frozen=True)
class Rows:
    """Literal rows as a ``FROM`` item: ``sql`` goes after FROM, ``v[column]`` names a column."""

    sql: str
    params: dict[str, Any]
    alias: str = "v"

    def __getitem__(self, column: str) -> str:
        return f"{self.alias}.{column}"


class Bulk:
    """Builds and runs set-based statements on one connection, inside its open transaction."""

    def __init__(self, driver: Any, dialect: str) -> None:
        self.driver = driver  # asyncpg.Connection or aiosqlite.Connection
        self.postgres = dialect == "postgresql"
        self._staged: set[str] = set()

    @classmethod
    async def of(cls, conn: AsyncConnection, dialect: str) -> Bulk:
        """Statements on ``conn``'s driver connection, inside ``conn``'s transaction."""
        if conn.in_transaction() and dialect == "postgresql":
            # SQLAlchemy's asyncpg adapter opens the server-side transaction lazily, on its
            # first statement; without this, driver statements would each commit on their own.
            # (On SQLite the BEGIN IMMEDIATE listener has already opened it.)
            await conn.exec_driver_sql("SELECT 1")
        raw = await conn.get_raw_connection()
        return cls(raw.driver_connection, dialect)

    @property
    def true(self) -> str:
        # SQLite stores booleans as 0/1; its partial-index predicates are written that way too.
        return "true" if self.postgres else "1"

    @property
    def false(self) -> str:
        return "false" if self.postgres else "0"

    @property
    def parked_events(self) -> str:
        """``events`` read through the partial index of parked rows.

        SQLite's planner (without statistics) would otherwise walk the whole table in id
        order or the tracking-id index; PostgreSQL picks the partial index by itself.
        """
        return "events" if self.postgres else "events INDEXED BY ix_events_parked"

    @property
    def waiting_events(self) -> str:
        """``events`` read through the partial index of parked events that wait for a
        message, oldest first (``ix_events_parked_since``)."""
        return "events" if self.postgres else "events INDEXED BY ix_events_parked_since"

    def latest_relay(self, occurred_at: str, received_at: str) -> str:
        """SQL for :func:`aggregator.store.attribution.latest_relay` of an address-only event's time
        (its stated time, at the latest its arrival, which is its ``received_at``).

        SQLite's date functions keep milliseconds: the bound is rounded up by up to 1.5 ms, so
        as a filter in front of :meth:`aggregator.ingest.transaction.Transaction.resolve` it never
        leaves out an event that may belong to a copy.
        """
        seconds = int(CLOCK_SKEW.total_seconds())
        if self.postgres:
            return f"(LEAST({occurred_at}, {received_at}) + interval '{seconds} seconds')"
        return f"(strftime('%Y-%m-%d %H:%M:%f', min({occurred_at}, {received_at}), '+{seconds} seconds') || '999')"

    def source(
        self, columns: Sequence[Column], rows: Sequence[Sequence[Any]], *, ready: bool = False
    ) -> Rows:
        """The rows as a relation ``v`` with the given column names and kinds.

        ``ready`` rows already hold what the driver takes (SQLite: times and JSON as text).
        """
        names = ", ".join(name for name, _ in columns)
        if self.postgres:
            params: dict[str, Any] = {}
            arrays = []
            converted = rows if ready else _converted(columns, rows, _PG_CONVERT)
            for i, (_, kind) in enumerate(columns):
                params[f"v_{i}"] = [row[i] for row in converted]
                arrays.append(f"CAST(:v_{i} AS {_PG_TYPE[kind]}[])")
            return Rows(f"unnest({', '.join(arrays)}) AS v({names})", params)
        document = json.dumps(
            rows if ready else _converted(columns, rows, _SQLITE_CONVERT), separators=(",", ":")
        )
        picks = ", ".join(f"json_extract(value, '$[{i}]') AS {name}" for i, (name, _) in enumerate(columns))
        return Rows(f"(SELECT {picks} FROM json_each(:v)) AS v", {"v": document})

    async def staged(
        self, table: str, columns: Sequence[Column], rows: Sequence[Sequence[Any]], *, ready: bool = False
    ) -> Rows:
        """Like :meth:`source`, for thousands of rows, staged in a temporary table: binary
        ``COPY`` on PostgreSQL (emptied at commit), ``executemany`` on SQLite (emptied here).

        SQLite before 3.45 parses a JSON document again for every ``json_extract``, so a
        wide JSON source costs a parse per column per row; a temporary table costs none.
        """
        names = [name for name, _ in columns]
        if self.postgres:
            if table not in self._staged:
                definition = ", ".join(f"{name} {_PG_TYPE[kind]}" for name, kind in columns)
                await self.driver.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {table} ({definition}) ON COMMIT DELETE ROWS"
                )
                self._staged.add(table)
            await self.driver.copy_records_to_table(
                table, records=rows if ready else _converted(columns, rows, _PG_CONVERT), columns=names
            )
            return Rows(f"{table} AS v", {})
        if table not in self._staged:
            await self.driver.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} ({', '.join(names)})")
            await self.driver.execute(f"DELETE FROM temp.{table}")
            self._staged.add(table)
        else:
            await self.driver.execute(f"DELETE FROM temp.{table}")
        await self.driver.executemany(
            f"INSERT INTO temp.{table} VALUES ({', '.join('?' * len(columns))})",
            rows if ready else _converted(columns, rows, _SQLITE_CONVERT),
        )
        return Rows(f"temp.{table} AS v", {})

    async def copy_unless_taken(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> bool:
        """PostgreSQL: ``COPY`` driver-ready rows into ``table``; False, with nothing copied,
        when a row's unique key is taken (the rest of the transaction goes on: a savepoint).

        The rows go in their given order, so concurrent copies wait on each other's keys in
        one order and never deadlock.
        """
        await self.driver.execute("SAVEPOINT copy_rows")
        try:
            await self.driver.copy_records_to_table(table, records=rows, columns=list(columns))
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
            await self.driver.execute("ROLLBACK TO SAVEPOINT copy_rows")
            return False
        await self.driver.execute("RELEASE SAVEPOINT copy_rows")
        return True

    async def planning_for_few_rows(self) -> None:
        """Make this transaction's statements find rows by key, never by scanning.

        Ingest touches a few thousand messages of millions; with statistics that lag
        behind a fast-growing table PostgreSQL's planner hashes whole tables instead
        (measured: 3x slower per batch at 60,000 messages, growing with the table).
        Transaction-local, so reads elsewhere plan as usual.
        """
        if self.postgres:
            await self.driver.execute(
                "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
            )

    def one_of(self, expression: str, values: Iterable[str]) -> tuple[str, dict[str, Any]]:
        """``expression IN (values)`` as one parameter, for any number of text values."""
        listed = list(values)
        if self.postgres:
            return f"{expression} = ANY(CAST(:ids AS text[]))", {"ids": listed}
        return f"{expression} IN (SELECT value FROM json_each(:ids))", {"ids": json.dumps(listed)}

    def json_value(self, expression: str) -> str:
        """A source column holding JSON text, as the ``metadata`` JSON column wants it."""
        return f"CAST({expression} AS json)" if self.postgres else expression

    def lock_clause(self, skip_locked: bool = False) -> str:
        """Row locks on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serializes writers."""
        if not self.postgres:
            return ""
        return " FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE"

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """SQLite's bulk path: ``executemany`` with positional (``?``) parameters."""
        await self.driver.executemany(sql, rows)

    async def run(self, sql: str, params: dict[str, Any] | None = None) -> list[Sequence[Any]]:
        """The rows the statement returned (RETURNING or SELECT), as tuples."""
        params = params or {}
        if self.postgres:
            text, names = _numbered(sql)
            return list(await self.driver.fetch(text, *(params[n] for n in names)))
        cursor = await self.driver.execute(sql, params)
        try:
            return list(await cursor.fetchall())
        finally:
            await cursor.close()
