"""Events from NATS payloads, exactly as :class:`mailbeacon.contract.events.Event` validates them, faster.

Validating with pydantic costs several times what parsing the JSON does, and nearly
every event on the stream has the plain shape our own components publish. Such an
event is decoded with ``json.loads`` and checks that accept only values pydantic would
accept unchanged (strings where strings are due, real booleans, canonical tracking ids,
RFC 3339 times with an offset, flat metadata). Anything else, valid or not, goes through
``Event.from_json`` itself, so the contract alone decides every unusual case: the fast
path never accepts an event the contract rejects, and gives the same values when both
accept (``tests/aggregator/test_aggregator_decode.py`` checks the two against each other).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from pydantic import ValidationError

from mailbeacon.contract import codec
from mailbeacon.contract.events import Event, EventType, utcnow
from mailbeacon.contract.jsondepth import EVENT_ENVELOPE_DEPTH, nests_deeper_than
from mailbeacon.contract.settings import MAX_JSON_DEPTH_CEILING

_TYPES = {t.value: t for t in EventType}
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# The RFC 3339 form ``datetime.fromisoformat`` and pydantic read alike (no leap seconds,
# at most microseconds, an explicit offset).
_RFC3339 = re.compile(
    r"\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)",
    re.ASCII,
)
# The text fields the contract cuts to size, read in this order (``source``, which has a
# default, is read on its own); longer values take the contract's path.
_TEXT_FIELDS = ("campaign", "ip", "user_agent", "url", "reason", "machine_kind")
codec.require_fields(
    sorted((*_TEXT_FIELDS, "source")), sorted(codec.CUT_TEXT_FIELDS), "the fast decoder's text"
)
_TEXT_LIMITS_IN_ORDER = tuple(codec.TEXT_LIMITS[name] for name in _TEXT_FIELDS)
_SOURCE_LIMIT = codec.TEXT_LIMITS["source"]
_RECIPIENT_LIMIT = codec.TEXT_LIMITS["recipient"]
_EVENT_ID_LIMIT = codec.EVENT_ID_MAX_LENGTH
_FLAT = (str, int, bool, type(None))
_DEPTH_LIMIT = MAX_JSON_DEPTH_CEILING + EVENT_ENVELOPE_DEPTH


class EventFields(Protocol):
    """What ingest reads from an event: :class:`Event` and :class:`Incoming` both have it."""

    @property
    def event_id(self) -> str: ...
    @property
    def type(self) -> EventType: ...
    @property
    def tracking_id(self) -> str | None: ...
    @property
    def campaign(self) -> str | None: ...
    @property
    def recipient(self) -> str | None: ...
    @property
    def occurred_at(self) -> datetime: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def user_agent(self) -> str | None: ...
    @property
    def url(self) -> str | None: ...
    @property
    def bounce_kind(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def machine(self) -> bool: ...
    @property
    def machine_kind(self) -> str | None: ...
    @property
    def source(self) -> str: ...
    @property
    def metadata(self) -> dict[str, Any]: ...


class Incoming(NamedTuple):
    """A validated event, with the fields and values of :class:`Event`."""

    event_id: str
    type: EventType
    tracking_id: str | None
    campaign: str | None
    recipient: str | None
    occurred_at: datetime
    ip: str | None
    user_agent: str | None
    url: str | None
    bounce_kind: str | None
    reason: str | None
    machine: bool
    machine_kind: str | None
    source: str
    metadata: dict[str, Any]


# Every field of the contract, in its order: one added to Event must be read here too.
codec.require_fields(Incoming._fields, codec.FIELDS, "aggregator.ingest.decode.Incoming")


class InvalidEvent(ValueError):
    """The payload is not an event the aggregator can store."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_loads = json.JSONDecoder(parse_constant=_reject_constant).decode


def _fast(data: bytes) -> Incoming | None:
    """The event when it has the plain shape, else None (then pydantic decides)."""
    if b"\\u" in data:  # escapes (surrogates, control characters) are the contract's business
        return None
    try:
        obj = _loads(data.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; depth: see decode()
        return None
    if type(obj) is not dict:
        return None
    get = obj.get
    event_id = get("event_id")
    kind = get("type")
    if type(event_id) is not str or not 0 < len(event_id) <= _EVENT_ID_LIMIT or type(kind) is not str:
        return None
    if not event_id.isprintable():  # DEL reaches here unescaped; the contract refuses it
        return None
    event_type = _TYPES.get(kind)
    if event_type is None:
        return None
    text = [get(name) for name in _TEXT_FIELDS]
    for value, limit in zip(text, _TEXT_LIMITS_IN_ORDER, strict=True):
        if value is not None and (type(value) is not str or len(value) > limit):
            return None
    tracking_id = get("tracking_id")
    if tracking_id is not None and (
        type(tracking_id) is not str or not _CANONICAL_UUID.fullmatch(tracking_id)
    ):
        return None
    recipient = get("recipient")
    if recipient is not None:
        if type(recipient) is not str:
            return None
        recipient = recipient.strip().lower() if recipient else None
        if recipient is not None and len(recipient) > _RECIPIENT_LIMIT:
            return None
    bounce_kind = get("bounce_kind")
    if bounce_kind is not None and bounce_kind != "hard" and bounce_kind != "soft":
        return None
    machine = get("machine", False)
    source = get("source", "proxy")
    metadata = get("metadata", {})
    if type(machine) is not bool or type(source) is not str or type(metadata) is not dict:
        return None
    if len(source) > _SOURCE_LIMIT:
        return None
    for value in metadata.values():
        if not isinstance(value, _FLAT):  # floats, lists, objects: pydantic's reading decides
            return None
    if "occurred_at" in obj:
        stamp = obj["occurred_at"]
        if type(stamp) is not str or not _RFC3339.fullmatch(stamp):
            return None
        try:
            occurred_at = datetime.fromisoformat(stamp).astimezone(UTC)
        except (ValueError, OverflowError):
            return None
    else:
        occurred_at = utcnow()
    campaign, ip, user_agent, url, reason, machine_kind = text
    return Incoming(
        event_id,
        event_type,
        tracking_id,
        campaign,
        recipient,
        occurred_at,
        ip,
        user_agent,
        url,
        bounce_kind,
        reason,
        machine,
        machine_kind,
        source,
        metadata,
    )


def _storable(metadata: dict[str, Any]) -> bool:
    try:
        json.dumps(metadata, allow_nan=False)
    except ValueError:
        return False
    return True


def decode(data: bytes) -> Incoming:
    """The event in a NATS payload; :class:`InvalidEvent` when it is not a valid, storable one."""
    fast = _fast(data)
    if fast is not None:
        return fast
    # The contract's JSON reader, and whatever walks the metadata after it (surrogate
    # checks, IP scrubbing), recurse: bound them before they run. Every event a tracker can
    # take (MAX_JSON_DEPTH at most its ceiling, the record two levels down) passes.
    if nests_deeper_than(data, _DEPTH_LIMIT):
        raise InvalidEvent(f"event nests deeper than {_DEPTH_LIMIT} levels")
    try:
        e = Event.from_json(data)
    except (ValidationError, ValueError, OverflowError) as exc:
        raise InvalidEvent(str(exc)) from exc
    if not _storable(e.metadata):
        # NaN or infinity pass the contract's JSON reading but no database stores them as JSON.
        raise InvalidEvent("metadata holds a number JSON cannot represent (NaN or infinity)")
    return Incoming(
        e.event_id,
        e.type,
        e.tracking_id,
        e.campaign,
        e.recipient,
        e.occurred_at,
        e.ip,
        e.user_agent,
        e.url,
        e.bounce_kind,
        e.reason,
        e.machine,
        e.machine_kind,
        e.source,
        e.metadata,
    )
