"""NATS JetStream: connection and idempotent provisioning (publishing: :mod:`mailbeacon.bus.publisher`).

Every component calls :func:`provision` at start; it creates the stream, the durable
consumer and the campaign and suppression KV buckets when missing and leaves them alone when they
already match, so replicas can start in any order.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as RequestTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError, ServerError, ServiceUnavailableError
from nats.js.kv import KeyValue

from mailbeacon.bus.nats_auth import NatsLogin
from mailbeacon.contract.events import SUBJECT_PREFIX
from mailbeacon.contract.settings import Settings

log = logging.getLogger(__name__)

STREAM = "MAILBEACON_EVENTS"
CONSUMER = "aggregator"
KV_BUCKET = "mailbeacon_campaigns"
# (campaign, recipient) pairs that must not get mail again: see mailbeacon.suppressions.
SUPPRESSIONS_BUCKET = "mailbeacon_suppressions"
# Signed webhook requests already taken, shared by every tracker worker and replica (the
# tracker's replay guard); each key lives as long as its request could still be accepted.
REPLAY_BUCKET = "mailbeacon_webhook_replay"
# Clocks disagree a little: a request stamped this far ahead is still accepted, so it can be
# replayed this much longer than the age window.
CLOCK_SKEW_SECONDS = 300.0
ALL_EVENTS = f"{SUBJECT_PREFIX}.>"
# The aggregator may hold a batch for a while on a slow database; redelivery before
# the commit would only cost a duplicate (dropped by event_id), never a wrong count.
CONSUMER_ACK_WAIT_SECONDS = 60.0


def server_urls(url: str) -> list[str]:
    """NATS_URL as a list of servers: one URL, or a cluster's URLs separated by commas
    (as the NATS CLI and the Go client take them; nats-py wants a list)."""
    return [part.strip() for part in url.split(",") if part.strip()]


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) without passwords or tokens, for logs and terminals."""
    return ",".join(_redact_one(part) for part in server_urls(url))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{netloc}"))


async def connect(url: str, name: str, login: NatsLogin | None = None) -> NATS:
    """nats-py connected to ``url`` (reconnecting forever), with ``login``'s credentials and TLS
    (:meth:`NatsLogin.from_settings`)."""
    shown = redact_url(url)
    client = NATS()

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        if client.is_closed:  # our own close(): nothing an operator needs to hear about
            log.debug("nats: closed connection to %s", shown)
        else:
            log.warning("nats: disconnected from %s", shown)

    async def on_reconnect() -> None:
        # In a cluster this may be another server of the list than the one that was lost.
        current = client.connected_url
        log.info("nats: reconnected to %s", _redact_one(current.geturl()) if current else shown)

    await client.connect(
        servers=server_urls(url),
        name=name,
        connect_timeout=2,
        # Half a second between attempts: pixel/click buffers drain soon after NATS is back.
        # nats-py annotates this as int but sleeps on it as given.
        reconnect_time_wait=0.5,  # type: ignore[arg-type]
        max_reconnect_attempts=-1,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **(login or NatsLogin()).nats_py_options(),
    )
    return client


def client_of(js: JetStreamContext) -> NATS:
    """The connection a JetStream context publishes on.

    ``JetStreamContext`` keeps its client in the private ``_nc`` and has no public accessor
    (nats-py 2.16); this is the only place that reads it (tests/mailbeacon/test_nats_internals.py). The
    publisher needs the client to write raw frames and to know whether the connection is up,
    the aggregator's pull feed for its inbox and server address; passing the client along
    beside every context instead would change each component's constructors for one object.
    """
    return js._nc


def stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=[ALL_EVENTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.nats.stream_max_age_days * 86400,
        duplicate_window=settings.nats.stream_duplicate_window_seconds,
        num_replicas=settings.nats.stream_replicas,
    )


def consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=ALL_EVENTS,
        ack_wait=CONSUMER_ACK_WAIT_SECONDS,
        max_ack_pending=20000,
    )


def takes_fast_batches(js: JetStreamContext) -> bool:
    """Whether the connected server knows fast-ingest batches (nats-server 2.14+)."""
    version = client_of(js).connected_server_version  # 0.0.0 while unknown
    return (version.major, version.minor) >= (2, 14)


async def ensure_stream(js: JetStreamContext, settings: Settings) -> None:
    wanted = stream_config(settings)
    # Fast batches let the tracker publish its pixel and click events with one
    # acknowledgement per batch (mailbeacon.bus.fast_batch); older servers do not know them.
    fast = settings.nats.stream_fast_batches and takes_fast_batches(js)
    wanted.allow_batched = True if fast else None
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(config=wanted)
        log.info("created stream %s", STREAM)
        return
    have = info.config
    # Retention is changed only by a process that was told it (STREAM_MAX_AGE_DAYS,
    # STREAM_DUPLICATE_WINDOW_SECONDS): a proxy sidecar in an app's pod, configured by the
    # app's team, must not reset what the release's tracker and aggregator set, nor the two
    # flip it back and forth on every restart.
    told = settings.nats.model_fields_set
    max_age = wanted.max_age if "stream_max_age_days" in told else have.max_age
    window = wanted.duplicate_window if "stream_duplicate_window_seconds" in told else have.duplicate_window
    retention_changed = (
        have.subjects != wanted.subjects or have.max_age != max_age or have.duplicate_window != window
    )
    turn_on_fast = fast and not have.allow_batched
    if not (retention_changed or turn_on_fast):
        return
    # Storage and replicas cannot be changed in place; retention settings can. Fast batches
    # are only ever turned on: servers before 2.14 cannot run such a stream any more.
    update = StreamConfig.from_response(have.as_dict())
    update.subjects = wanted.subjects
    update.max_age = max_age
    update.duplicate_window = window
    update.allow_batched = True if (fast or have.allow_batched) else None
    try:
        await js.update_stream(config=update)
    except Exception as exc:
        if retention_changed:
            raise
        # A component not allowed to change the stream (a sidecar's narrower credentials)
        # goes on without fast batches.
        log.warning("could not allow fast batches on stream %s (%s); events go one by one", STREAM, exc)
        return
    log.info("updated stream %s", STREAM)


async def ensure_consumer(js: JetStreamContext) -> None:
    try:
        await js.consumer_info(STREAM, CONSUMER)
    except NotFoundError:
        await js.add_consumer(STREAM, config=consumer_config())
        log.info("created consumer %s", CONSUMER)


async def _ensure_bucket(js: JetStreamContext, settings: Settings, bucket: str, history: int) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        config = KeyValueConfig(bucket=bucket, history=history, replicas=settings.nats.stream_replicas)
        return await js.create_key_value(config=config)


async def ensure_campaign_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    return await _ensure_bucket(js, settings, KV_BUCKET, history=5)


async def ensure_suppression_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    # Only the latest value of a key matters; a suppression is kept until someone deletes it.
    return await _ensure_bucket(js, settings, SUPPRESSIONS_BUCKET, history=1)


def replay_window_seconds(settings: Settings) -> float:
    """How long a signed webhook request can be accepted after it arrived: the longest age
    window plus the clock skew allowed ahead of it."""
    return (
        max(settings.tracker.webhook_max_age_seconds, settings.tracker.sns_max_age_seconds)
        + CLOCK_SKEW_SECONDS
    )


async def ensure_replay_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The replay guard's bucket, its keys expiring after the replay window."""
    ttl = replay_window_seconds(settings)
    try:
        kv = await js.key_value(REPLAY_BUCKET)
    except BucketNotFoundError:
        config = KeyValueConfig(
            bucket=REPLAY_BUCKET, history=1, ttl=ttl, replicas=settings.nats.stream_replicas
        )
        return await js.create_key_value(config=config)
    # Only ever lengthened: a shorter TTL than some tracker's age window would let a replay
    # through once its key expired, and two trackers told different windows must not take
    # turns shortening it.
    info = await js.stream_info(f"KV_{REPLAY_BUCKET}")
    if (info.config.max_age or 0) < ttl:
        update = StreamConfig.from_response(info.config.as_dict())
        update.max_age = ttl
        try:
            await js.update_stream(config=update)
        except Exception as exc:
            # A component not allowed to change it (a sidecar's narrower credentials) goes on.
            log.warning("could not lengthen the replay guard's TTL to %ss (%s)", int(ttl), exc)
            return kv
        log.info("replay guard keys now expire after %ss", int(ttl))
    return kv


async def provision(js: JetStreamContext, settings: Settings) -> KeyValue:
    """Stream, consumer and the KV buckets; returns the campaign bucket."""
    await ensure_stream(js, settings)
    await ensure_consumer(js)
    await ensure_suppression_bucket(js, settings)
    await ensure_replay_bucket(js, settings)
    return await ensure_campaign_bucket(js, settings)


# What JetStream answers while it cannot serve yet: nothing (a cluster electing its meta
# leader, a server under load, JetStream not enabled yet) or "temporarily unavailable".
# Anything else (no permission, a stream configured otherwise) is not waited out.
NOT_READY = (RequestTimeoutError, NoRespondersError, ServiceUnavailableError, ServerError)


async def provision_patiently(
    js: JetStreamContext, settings: Settings, first_delay: float = 0.5, max_delay: float = 5.0
) -> KeyValue:
    """:func:`provision`, tried again until JetStream answers: a starting proxy or aggregator
    waits, not ready, instead of exiting with a traceback (the tracker waits the same way)."""
    delay = first_delay
    while True:
        try:
            return await provision(js, settings)
        except NOT_READY as exc:
            log.warning(
                "JetStream not ready (%s); provisioning again in %.1f s",
                str(exc) or type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
