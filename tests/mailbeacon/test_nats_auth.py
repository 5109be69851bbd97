"""NATS credentials and TLS as settings, used by both NATS clients (issue 16, defect 2).

Against real nats-server processes that want a user and password, a token, an nkey, TLS with a
client certificate (plus a token), or a ``.creds`` file in operator (JWT) mode: the publishing
path of the proxy and tracker (nats-py, provisioning, :class:`EventPublisher`) stores events, and
the aggregator ingests them through its lean connection (:mod:`aggregator.ingest.wire`), which writes
its own ``CONNECT``: it must log in (and do TLS) by itself, or the aggregator could not reach a
secured NATS at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from aggregator.ingest.consumer import EventConsumer
from aggregator.ingest.wire import WireConnection
from aggregator.read.statistics import read_statistics
from aggregator.store.db import open_database
from aggregator.store.migrate import migrate
from mailbeacon.bus.jetstream import connect, provision
from mailbeacon.bus.nats_auth import NatsLogin, NatsLoginError, read_creds
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.events import Event, EventType, new_event_id
from mailbeacon.contract.settings import Settings
from tests.nats_secured import MODES, Secured, operator_mode, secured_nats
from tests.support import eventually, make_settings

CAMPAIGN = "secured/nats"


@pytest.fixture(params=MODES)
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Secured]:
    with secured_nats(request.param, tmp_path / "nats") as server:
        yield server


@pytest.mark.slow
async def test_events_are_published_and_ingested_through_a_secured_nats(
    secured: Secured, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, nats_url=secured.url, **secured.settings)
    login = NatsLogin.from_settings(settings)
    # The proxy's and tracker's path: connect, provision, publish and wait for the acks.
    nc = await connect(settings.nats.url or "", "test-publisher", login)
    db = open_database(f"sqlite:///{tmp_path / 'stats.db'}")
    await migrate(db)
    consumer = EventConsumer(nc.jetstream(), db, batch_size=50, login=login)
    try:
        js = nc.jetstream()
        await provision(js, settings)
        publisher = EventPublisher(js)
        tid = str(uuid.uuid4())
        await publisher.publish(
            Event(
                event_id=new_event_id(),
                type=EventType.SENT,
                tracking_id=tid,
                campaign=CAMPAIGN,
                recipient="ann@example.com",
                source="proxy",
            )
        )
        await publisher.publish(
            Event(event_id=new_event_id(), type=EventType.OPENED, tracking_id=tid, source="pixel")
        )
        # The aggregator's path: its feed logs in over the lean connection, not nats-py's.
        await consumer.start()
        assert type(consumer.feed._link).__name__ == "_WireLink"

        async def stored() -> bool:
            stats = await read_statistics(db, CAMPAIGN)
            return stats.get("sent_count") == 1 and stats.get("unique_opens") == 1

        await eventually(stored)
        await publisher.close()
    finally:
        await consumer.stop()
        await db.dispose()
        await nc.close()


async def test_the_servers_refuse_a_client_without_the_login(secured: Secured) -> None:
    """The servers above are really secured: the lean connection without the login is refused
    (authorization violation, or a certificate it cannot verify)."""
    anonymous = WireConnection(lambda: secured.url, "test", lambda *a: None, connect_timeout=3)
    with pytest.raises((ConnectionError, OSError)):
        await anonymous.start()
    await anonymous.stop()


def test_credentials_given_as_settings_become_nats_py_options(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    assert NatsLogin.from_settings(Settings(nats_user="mb", nats_password="pw")).nats_py_options() == {
        "user": "mb",
        "password": "pw",
    }
    assert NatsLogin.from_settings(Settings(nats_token="tok")).nats_py_options() == {"token": "tok"}
    assert NatsLogin.from_settings(Settings(nats_nkey_seed_file=seed)).nats_py_options() == {
        "nkeys_seed": str(seed)
    }
    assert NatsLogin().nats_py_options() == {}  # anonymous and plain: nothing changes
    # Never printed: the password is a SecretStr in the settings.
    assert "pw" not in repr(Settings(nats_user="mb", nats_password="pw"))


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"nats_user": "mb"}, "go together"),
        ({"nats_password": "pw"}, "go together"),
        ({"nats_user": "mb", "nats_password": "pw", "nats_token": "tok"}, "one NATS login"),
        ({"nats_token": "tok", "nats_creds_file": "/x.creds"}, "one NATS login"),
        ({"nats_tls_cert_file": "/tls.crt"}, "go together"),
    ],
)
def test_contradictory_nats_logins_are_refused_at_start(values: dict[str, str], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        Settings(**values)


def test_creds_files_are_read_as_nsc_writes_them(tmp_path: Path) -> None:
    _, creds = operator_mode(tmp_path)
    jwt, seed = read_creds(creds)
    assert jwt.count(".") == 2 and seed.startswith(b"SU")
    (tmp_path / "broken.creds").write_text("not a creds file")
    with pytest.raises(NatsLoginError, match=r"not a NATS \.creds file"):
        read_creds(tmp_path / "broken.creds")
