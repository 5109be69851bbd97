"""Times as the aggregator reads and writes them: one parser, one formatter.

Stored times are UTC. SQLite keeps them as text in SQLAlchemy's form (naive, UTC);
PostgreSQL as ``timestamptz``. Everything that reads a time from outside (query
parameters, cursors, SQLite text) goes through :func:`parse_moment`, so an
out-of-range time is one clear ``ValueError`` everywhere instead of an
``OverflowError`` deep in a driver.
"""

from __future__ import annotations

from datetime import UTC, datetime


def parse_moment(value: str) -> datetime:
    """An ISO 8601 / RFC 3339 time as an aware UTC datetime (naive means UTC).

    ``ValueError`` when it is no time, or one that has no UTC equivalent between the
    years 1 and 9999 (``0001-01-01T00:00:00+14:00`` is in year 0 in UTC).
    """
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(f"{value!r} is outside the years 1 to 9999 in UTC") from exc


def as_utc(moment: datetime | str) -> datetime:
    """A stored time as an aware UTC datetime.

    SQLite hands back naive datetimes (always UTC here), or the stored text when a plain
    SQL statement read it; PostgreSQL hands back aware datetimes.
    """
    if isinstance(moment, str):
        return parse_moment(moment)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def sqlite_time(moment: datetime) -> str:
    """How SQLAlchemy stores a (UTC) datetime in SQLite, so stored strings compare and sort."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(sep=" ", timespec="microseconds")  # several times faster than strftime


def iso_utc(moment: datetime | str | None) -> str | None:
    """A stored time as the API shows it (RFC 3339, UTC, microseconds, ``Z``)."""
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if moment else None
