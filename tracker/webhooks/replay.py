"""The webhook replay guard, one for every tracker worker and replica (docs/tracker.md "ESP webhooks").

An adapter names what makes a signed request unique (Mailgun's token, SNS's MessageId, a
hash of what SendGrid signed). That key is claimed in the NATS KV bucket
``mailbeacon_webhook_replay`` with ``create``, which fails when the key exists, so exactly
one claim wins whichever process makes it; keys expire with the age window, after which
the request is refused as stale anyway. The key's value is a hash of the request body:

- the key is new: the request is taken;
- the key was seen with the same body: the provider retrying (perhaps after an attempt
  that crashed between claiming and storing). It is taken again: its events carry the
  same ids, so JetStream (``Nats-Msg-Id``) and the aggregator (unique ``event_id``) store
  them once, and nothing is lost;
- the key was seen with another body: a replay with swapped content (Mailgun signs only
  timestamp and token, not the event): refused.

Without the bucket (NATS unreachable) nothing is accepted unchecked: the caller answers
503 and the provider retries.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mailbeacon.bus.jetstream import ensure_replay_bucket
from mailbeacon.contract.settings import Settings

log = logging.getLogger(__name__)


class Claim(enum.Enum):
    FIRST = "first"  # never seen: take it
    RETRY = "retry"  # seen with this very body: take it again, its events are deduplicated
    REPLAY = "replay"  # seen with another body: refuse it


class ReplayGuardUnavailable(Exception):
    """The shared bucket cannot be read or written: nothing may be accepted unchecked."""


def bucket_key(replay_key: str) -> str:
    """The KV key for a replay key: KV keys allow few characters, and a token is anyone's text."""
    return hashlib.sha256(replay_key.encode("utf-8", "surrogatepass")).hexdigest()


def body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest().encode()


def verdict(stored: bytes | None, digest: bytes) -> Claim:
    """What a claim that found ``stored`` under its key means for a request hashing to ``digest``."""
    return Claim.RETRY if stored == digest else Claim.REPLAY


class SharedReplayGuard:
    """Claims replay keys in the shared bucket, on the JetStream connection ``jetstream`` gives
    (None while NATS is unreachable)."""

    def __init__(self, settings: Settings, jetstream: Callable[[], JetStreamContext | None]) -> None:
        self.settings = settings
        self._jetstream = jetstream
        self._kv: KeyValue | None = None
        self._kv_js: JetStreamContext | None = None

    async def _bucket(self) -> KeyValue:
        js = self._jetstream()
        if js is None:
            raise ReplayGuardUnavailable("NATS is not connected")
        if self._kv is None or self._kv_js is not js:
            # Bound once per connection; provisioning again also recreates a bucket lost
            # with a NATS store that came back empty.
            self._kv = await ensure_replay_bucket(js, self.settings)
            self._kv_js = js
        return self._kv

    async def claim(self, replay_key: str, body: bytes) -> Claim:
        key, digest = bucket_key(replay_key), body_digest(body)
        try:
            kv = await self._bucket()
            for _ in range(3):
                try:
                    await kv.create(key, digest)
                    return Claim.FIRST
                except KeyWrongLastSequenceError:
                    pass
                try:
                    entry = await kv.get(key)
                except KeyNotFoundError:
                    continue  # expired (or purged) between the two calls: claim it again
                return verdict(entry.value, digest)
        except ReplayGuardUnavailable:
            raise
        except Exception as exc:  # any NATS failure: unknown, so not accepted
            self._kv = None
            raise ReplayGuardUnavailable(str(exc) or type(exc).__name__) from exc
        raise ReplayGuardUnavailable("the replay key kept changing")
