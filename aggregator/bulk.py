"""Set-based SQL on both databases: a batch of literal rows as one relation.

Ingest works on whole batches: "insert these 2,000 events", "set the first open of these
800 messages where it is still empty". Each such statement reads its rows from a
relation bound as a handful of parameters, so the statement text never depends on the
batch size (prepared once, cached) and no per-row round trips happen:

- PostgreSQL: ``unnest(CAST(:a AS text[]), CAST(:b AS timestamptz[]), ...)``, one array
  per column (asyncpg sends arrays in binary).
- SQLite: ``json_each(:rows)`` over one JSON document of row arrays.

Statements otherwise use plain SQL that both dialects understand (``ON CONFLICT``,
``RETURNING``, ``UPDATE ... FROM``; SQLite 3.35 or newer).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

Kind = Literal["text", "ts", "bool", "int", "json"]
Column = tuple[str, Kind]

_PG_ARRAY: dict[Kind, str] = {
    "text": "text[]",
    "ts": "timestamptz[]",
    "bool": "boolean[]",
    "int": "bigint[]",
    "json": "text[]",  # cast to json where the target column needs it
}


def sqlite_time(moment: datetime) -> str:
    """How SQLAlchemy stores a (UTC) datetime in SQLite, so stored strings compare and sort."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def as_utc(moment: datetime | str) -> datetime:
    """A stored time as an aware UTC datetime.

    SQLite hands back naive datetimes (always UTC here), or the stored text when a plain
    SQL statement read it; PostgreSQL hands back aware datetimes.
    """
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


_SQLITE_CONVERT: dict[Kind, Callable[[Any], Any]] = {
    "ts": sqlite_time,
    "json": _json_text,
}
_PG_CONVERT: dict[Kind, Callable[[Any], Any]] = {"json": _json_text}


@dataclass(frozen=True)
class Rows:
    """Literal rows as a ``FROM`` item: ``sql`` goes after FROM, ``alias`` names its columns."""

    sql: str
    params: dict[str, Any]
    alias: str

    def __getitem__(self, column: str) -> str:
        return f"{self.alias}.{column}"


class Bulk:
    """Builds and runs set-based statements on one connection (inside its transaction)."""

    def __init__(self, conn: AsyncConnection, dialect: str) -> None:
        self.conn = conn
        self.postgres = dialect == "postgresql"
        self._names = 0

    def _alias(self) -> str:
        self._names += 1
        return f"v{self._names}"

    @property
    def true(self) -> str:
        # SQLite stores booleans as 0/1; its partial-index predicates are written that way too.
        return "true" if self.postgres else "1"

    @property
    def false(self) -> str:
        return "false" if self.postgres else "0"

    def source(self, columns: Sequence[Column], rows: Sequence[Sequence[Any]]) -> Rows:
        """The rows as a relation with the given column names and kinds."""
        alias = self._alias()
        names = ", ".join(name for name, _ in columns)
        if self.postgres:
            params: dict[str, Any] = {}
            arrays = []
            for i, (_, kind) in enumerate(columns):
                convert = _PG_CONVERT.get(kind)
                key = f"{alias}_{i}"
                params[key] = [convert(row[i]) if convert and row[i] is not None else row[i] for row in rows]
                arrays.append(f"CAST(:{key} AS {_PG_ARRAY[kind]})")
            return Rows(f"unnest({', '.join(arrays)}) AS {alias}({names})", params, alias)
        converters = [_SQLITE_CONVERT.get(kind) for _, kind in columns]
        document = json.dumps(
            [
                [c(v) if c is not None and v is not None else v for c, v in zip(converters, row, strict=True)]
                for row in rows
            ],
            separators=(",", ":"),
            default=str,
        )
        picks = ", ".join(f"json_extract(value, '$[{i}]') AS {name}" for i, (name, _) in enumerate(columns))
        return Rows(f"(SELECT {picks} FROM json_each(:{alias})) AS {alias}", {alias: document}, alias)

    def one_of(self, expression: str, values: Iterable[str]) -> tuple[str, dict[str, Any]]:
        """``expression IN (values)`` as one parameter, for any number of text values."""
        alias = self._alias()
        listed = list(values)
        if self.postgres:
            return f"{expression} = ANY(CAST(:{alias} AS text[]))", {alias: listed}
        return f"{expression} IN (SELECT value FROM json_each(:{alias}))", {alias: json.dumps(listed)}

    def json_value(self, expression: str) -> str:
        """A source column holding JSON text, as the ``metadata`` JSON column wants it."""
        return f"CAST({expression} AS json)" if self.postgres else expression

    def lock_clause(self, skip_locked: bool = False) -> str:
        """Row locks on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serializes writers."""
        if not self.postgres:
            return ""
        return " FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE"

    def sqlite_row(self, columns: Sequence[Column], row: Sequence[Any]) -> tuple[Any, ...]:
        """A row as SQLite's driver takes it for ``executemany`` (times and JSON as text)."""
        return tuple(
            value if value is None or (convert := _SQLITE_CONVERT.get(kind)) is None else convert(value)
            for (_, kind), value in zip(columns, row, strict=True)
        )

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """The driver's ``executemany`` with positional (``?``) parameters: SQLite's bulk path."""
        await self.conn.exec_driver_sql(sql, rows)

    async def run(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        """The rows the statement returned (RETURNING or SELECT), as SQLAlchemy rows."""
        result = await self.conn.execute(text(sql), params or {})
        return list(result.all()) if result.returns_rows else []

    async def execute(self, sql: str, params: dict[str, Any] | None = None) -> int:
        result = await self.conn.execute(text(sql), params or {})
        return int(result.rowcount or 0)
