"""The codec module hands the hand-written event codecs the contract: fields, order, defaults, limits."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic_core import to_json

from mailbeacon.contract import codec
from mailbeacon.contract.events import Event, EventType

TID = "3d6f0f8e-9b1c-4c8e-8f3a-6a2b1c0d9e01"


def filled(pieces: tuple[str, ...], values: list[str]) -> bytes:
    assert len(pieces) == len(values) + 1
    return (
        "".join(piece + value for piece, value in zip(pieces, values, strict=False)) + pieces[-1]
    ).encode()


def test_pieces_filled_with_every_field_are_the_event_json() -> None:
    event = Event(
        event_id="e-1",
        type=EventType.BOUNCED,
        tracking_id=TID,
        campaign="spring",
        recipient="ann@example.com",
        occurred_at=datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC),
        ip="198.51.100.7",
        user_agent='Mozilla "quoted" \u00e9',
        url="https://shop.example.com/a?b=c",
        bounce_kind="hard",
        reason="550 5.1.1 no such user",
        machine=True,
        machine_kind="prefetch",
        source="webhook:generic",
        metadata={"esp": "x", "n": 3},
    )
    dumped = event.model_dump(mode="json")
    pieces = codec.json_pieces(codec.FIELDS)
    assert filled(pieces, [to_json(dumped[name]).decode() for name in codec.FIELDS]) == event.to_json()
    # Quoted slots take the text itself.
    quoted = codec.json_pieces(codec.FIELDS, quoted=("event_id", "source"))
    values = [
        dumped[name] if name in ("event_id", "source") else to_json(dumped[name]).decode()
        for name in codec.FIELDS
    ]
    assert filled(quoted, values) == event.to_json()


def test_fields_not_filled_in_are_written_with_their_defaults() -> None:
    moment = datetime(2026, 3, 1, tzinfo=UTC)
    pieces = codec.json_pieces(("event_id", "type", "occurred_at", "metadata"), quoted=("event_id", "type"))
    json = filled(pieces, ["e-2", "opened", '"2026-03-01T00:00:00Z"', "{}"])
    assert json == Event(event_id="e-2", type=EventType.OPENED, occurred_at=moment).to_json()


def test_a_writer_must_fill_what_has_no_fixed_default_and_keep_the_contracts_order() -> None:
    with pytest.raises(ValueError, match="occurred_at"):  # its default is the time of validation
        codec.json_pieces(("event_id", "type", "metadata"))
    with pytest.raises(ValueError, match="order"):
        codec.json_pieces(("type", "event_id", "occurred_at", "metadata"))
    with pytest.raises(ValueError, match="order"):
        codec.json_pieces(("event_id", "type", "occurred_at", "metadata", "no_such_field"))


def test_a_reader_whose_fields_differ_from_the_contract_is_refused() -> None:
    codec.require_fields(list(codec.FIELDS), codec.FIELDS, "reader")
    with pytest.raises(RuntimeError, match="reader"):
        codec.require_fields(codec.FIELDS[:-1], codec.FIELDS, "reader")


def test_every_text_field_the_contract_cuts_has_a_limit() -> None:
    assert set(codec.CUT_TEXT_FIELDS) <= set(codec.TEXT_LIMITS) <= set(codec.FIELDS)
    # Validation cuts to exactly those limits, so a codec using them agrees with it.
    for name in codec.CUT_TEXT_FIELDS:
        limit = codec.TEXT_LIMITS[name]
        event = Event.model_validate({"event_id": "e", "type": "opened", name: "x" * (limit + 1)})
        assert getattr(event, name) == "x" * limit
    assert (
        Event(event_id="e", type=EventType.SENT, recipient="a" * 400).recipient
        == "a" * codec.TEXT_LIMITS["recipient"]
    )
    with pytest.raises(ValueError):
        Event(event_id="e" * (codec.EVENT_ID_MAX_LENGTH + 1), type=EventType.SENT)
