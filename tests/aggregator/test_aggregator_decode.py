"""The aggregator's fast event decoding accepts exactly what the contract accepts, with its values.

:func:`aggregator.ingest.decode.decode` skips pydantic for events of the plain shape. Here it is
checked against ``Event.from_json`` (the contract) on generated payloads: well-formed
events, events with every field replaced by values of other JSON types, odd times and
ids, escapes, other encodings and random byte damage. Whenever the contract rejects a
payload the aggregator must too; whenever it accepts one, every field must be equal.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aggregator.ingest.decode import Incoming, InvalidEvent, decode
from mailbeacon.contract.events import Event, EventType

FIELDS = Incoming._fields
OPTIONAL_TEXT = ("tracking_id", "campaign", "recipient", "ip", "user_agent", "url", "reason", "machine_kind")

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def timestamps(draw: st.DrawFn) -> Any:
    moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    offset = timezone(timedelta(minutes=draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))))
    text = moment.replace(tzinfo=offset).isoformat(
        timespec=draw(st.sampled_from(["seconds", "milliseconds", "microseconds"]))
    )
    return draw(
        st.sampled_from(
            [
                text,
                text.replace("+00:00", "Z"),
                text.replace("T", " "),
                text[:19],  # naive
                text[:10],  # a date
                text.replace("+", "-"),
                text + "0",
                text[:19] + ".1234567+00:00",
                text[:17] + "60+00:00",
                moment.timestamp() if moment.year > 1970 else text,
                draw(json_values),
            ]
        )
    )


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed event in any of its valid shapes, then maybe damaged."""
    event: dict[str, Any] = {
        "event_id": draw(st.one_of(st.just(uuid.uuid4().hex), st.text(min_size=1, max_size=12))),
        "type": draw(st.sampled_from([t.value for t in EventType])),
    }
    for name in OPTIONAL_TEXT:
        if draw(st.booleans()):
            # Long values around the store's column sizes, which the contract cuts to.
            long = st.sampled_from([31, 32, 33, 64, 65, 320, 321, 1000, 1001, 4001, 8001]).map("Ab@x".__mul__)
            event[name] = draw(st.one_of(st.none(), st.text(max_size=10), long))
    if draw(st.booleans()):
        tid = uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))
        event["tracking_id"] = draw(
            st.sampled_from([str(tid), str(tid), str(tid).upper(), tid.hex, f"{{{tid}}}"])
        )
    if draw(st.booleans()):
        event["recipient"] = draw(
            st.sampled_from(["  Ann@Example.COM ", "", "   ", "bob@x.example", "Ä@x.example"])
        )
    if draw(st.booleans()):
        event["bounce_kind"] = draw(st.sampled_from([None, "hard", "soft"]))
    if draw(st.booleans()):
        event["machine"] = draw(st.booleans())
    if draw(st.booleans()):
        event["source"] = draw(st.sampled_from(["pixel", "webhook:ses", "proxy", "s" * 33]))
    if draw(st.booleans()):
        flat = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8))
        event["metadata"] = draw(st.dictionaries(st.text(max_size=5), flat | json_values, max_size=3))
    if draw(st.integers(0, 3)):
        moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
        offset = timezone(timedelta(minutes=draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))))
        spec = draw(st.sampled_from(["seconds", "milliseconds", "microseconds"]))
        event["occurred_at"] = moment.replace(tzinfo=offset).isoformat(timespec=spec)
    if draw(st.booleans()):
        # Damage: values of other JSON types, other spellings, fields dropped.
        if draw(st.booleans()):
            event["occurred_at"] = draw(timestamps())
        if draw(st.booleans()):
            event["machine"] = draw(st.sampled_from([None, 0, 1, "true", "yes", 2]))
        if draw(st.booleans()):
            event["bounce_kind"] = draw(st.sampled_from(["HARD", "", 1]))
        for _ in range(draw(st.integers(0, 2))):
            name = draw(st.sampled_from([*FIELDS, "extra"]))
            if draw(st.booleans()):
                event.pop(name, None)
            else:
                event[name] = draw(json_values)
    return event


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    event = draw(events())
    text = json.dumps(event, ensure_ascii=draw(st.booleans()))
    data = text.encode(draw(st.sampled_from(["utf-8"] * 9 + ["utf-16"])))
    if draw(st.integers(0, 19)) == 0 and data:  # byte damage
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    return data


def contract(data: bytes) -> Event | None:
    try:
        return Event.from_json(data)
    except (ValidationError, ValueError, OverflowError):
        return None


def agree(data: bytes) -> None:
    expected = contract(data)
    if expected is not None:
        try:
            json.dumps(expected.metadata, allow_nan=False)
        except ValueError:
            expected = None  # NaN or infinity, at any depth: not storable, refused on purpose
    try:
        got = decode(data)
    except InvalidEvent:
        assert expected is None, f"rejected what the contract accepts: {data!r}"
        return
    assert expected is not None, f"accepted what the contract rejects: {data!r} -> {got}"
    for name in FIELDS:
        if name == "occurred_at" and b'"occurred_at"' not in data:
            # Defaulted to "now" by both; equal up to the moment of decoding.
            assert abs(got.occurred_at - expected.occurred_at) < timedelta(seconds=5)
            assert got.occurred_at.utcoffset() == timedelta(0)
            continue
        assert getattr(got, name) == getattr(expected, name), (name, data)
        assert type(getattr(got, name)) is type(getattr(expected, name)), (name, data)
    assert got.occurred_at.tzinfo is not None and got.occurred_at.utcoffset() == timedelta(0)


@pytest.mark.slow  # 2000 examples; tests/tracker/test_tracker_hot_path.py guards the encoder in the fast lane
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads())
@example(b'{"event_id":"a","type":"sent","event_id":"b"}')
@example(b'{"event_id":"a","type":"sent","metadata":{"x":NaN}}')
@example(b'{"event_id":"a","type":"sent","metadata":{"x":1e400}}')
@example(b'{"event_id":"a","type":"sent","recipient":"\\u00c5sa@example.com"}')
@example(b'{"event_id":"a","type":"sent","campaign":"\\ud800"}')
@example(b'{"event_id":"a","type":"sent","metadata":{"\\udcff":["\\ud800",{"k":"\\udfff"}]}}')
@example(b'{"event_id":"a","type":"sent","user_agent":"\\ud83d\\ude00 \\ud83d"}')
@example(b'{"event_id":"a\x7fb","type":"sent"}')
@example(b'{"event_id":"a\\u0000b","type":"sent"}')
@example(b'{"event_id":"a\\u007f","type":"sent"}')
@example(b'{"event_id":"a\\ud800","type":"sent"}')
@example(b'{"event_id":"a\\tb","type":"sent"}')
@example(b'{"event_id":"a","type":"sent","occurred_at":"0001-01-01T00:00:00+01:00"}')
@example(b'{"event_id":"a","type":"sent","occurred_at":"2026-02-30T00:00:00+00:00"}')
@example(b'{"event_id":"a","type":"sent","occurred_at":"\xd9\xa2026-03-02T08:00:00+00:00"}')
@example(b' {"event_id":"a","type":"opened","machine":true} ')
@example(b'{"event_id":"a","type":"opened","url":"' + b"u" * 8001 + b'"}')
@example(b'{"event_id":"a","type":"opened","recipient":"' + b"r" * 321 + b'"}')
@example(b'{"event_id":"a","type":"opened","source":"' + b"s" * 33 + b'"}')
@example(b'["event_id"]')
@example(b'{"event_id":"","type":"sent"}')
@example(b'{"event_id":"' + b"x" * 201 + b'","type":"sent"}')
def test_fast_decoding_agrees_with_the_contract(data: bytes) -> None:
    agree(data)


def test_published_events_take_the_fast_path() -> None:
    """What our components publish decodes without pydantic, to the same event."""
    event = Event(
        event_id="e1",
        type=EventType.CLICKED,
        tracking_id=str(uuid.uuid4()),
        campaign="news/march",
        recipient="ann@example.com",
        url="https://shop.example/a?b=c",
        ip="203.0.113.0",
        user_agent="Mozilla/5.0 (Ä)",
        machine=True,
        machine_kind="link_scanner",
        source="click",
        metadata={"message_id": "<x@y>", "attempt": 2},
    )
    from aggregator.ingest import decode as module

    fast = module._fast(event.to_json())
    assert fast is not None
    assert fast._asdict() == {name: getattr(event, name) for name in FIELDS}


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"{}",
        b'{"event_id":"a","type":"teleported"}',
        b'{"event_id":"a","type":"sent","metadata":{"x":NaN}}',
        # PostgreSQL refuses NUL in the id; DEL is plain JSON text the fast path sees as is.
        b'{"event_id":"a\\u0000b","type":"sent"}',
        b'{"event_id":"a\x7fb","type":"sent"}',
    ],
)
def test_invalid_payloads_are_refused_with_a_reason(payload: bytes) -> None:
    with pytest.raises(InvalidEvent) as refused:
        decode(payload)
    assert str(refused.value)
