"""The event contract for the code that writes or reads event JSON without the model
(docs/architecture.md "The event contract").

:class:`~mailbeacon.contract.events.Event` is the one definition. Building and serializing
it costs more than the two busiest paths can pay, so the tracker writes each pixel and
click event's JSON itself (``tracker.engagement.engagement.engagement_message``) and the
aggregator reads the plain events with ``json.loads`` (``aggregator.ingest.decode``). Both
take from here what they must agree on with the model: the fields and their order, the
size limits, and the JSON of every field they do not fill in. Nothing here runs per
event: the encoder gets its JSON as literal pieces once, at import. The property tests
(``tests/tracker/test_tracker_hot_path.py``, ``tests/aggregator/test_aggregator_decode.py``) still hold both
to the model, byte for byte and value for value.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from pydantic_core import PydanticUndefined, to_json

from mailbeacon.contract.events import CUT_TEXT_FIELDS, EVENT_ID_MAX_LENGTH, TEXT_LIMITS, Event

__all__ = ["CUT_TEXT_FIELDS", "EVENT_ID_MAX_LENGTH", "FIELDS", "TEXT_LIMITS", "json_pieces", "require_fields"]

# The fields of an event, in the order Event writes them in JSON.
FIELDS: tuple[str, ...] = tuple(Event.model_fields)


def require_fields(names: Sequence[str], expected: Sequence[str], reader: str) -> None:
    """Refuse, at import, a hand-written codec whose field list no longer matches the contract's:
    a field added to Event must not be dropped silently on a fast path."""
    if tuple(names) != tuple(expected):
        raise RuntimeError(f"{reader} has the fields {tuple(names)}, the event contract {tuple(expected)}")


def _default_json(name: str) -> str:
    field = Event.model_fields[name]
    if field.default is PydanticUndefined or field.default_factory is not None:
        raise ValueError(f"the event field {name!r} has no fixed default: the writer must fill it in")
    return to_json(field.default).decode()


def json_pieces(slots: Sequence[str], quoted: Collection[str] = ()) -> tuple[str, ...]:
    """An event's JSON as the literal text between the values a writer fills in.

    ``slots`` are the fields the writer fills, in the contract's order; every other field is
    written with its default (``null`` for the optional ones). The writer puts the value of
    slot ``i`` between pieces ``i`` and ``i + 1`` as JSON, except for the ``quoted`` slots:
    text it made itself that needs no escaping (ids, times, names), whose quotes are part
    of the pieces. So ``"".join`` of the pieces interleaved with the values is the event's
    JSON exactly as ``Event.to_json`` writes it.
    """
    order = [name for name in FIELDS if name in slots]
    if list(slots) != order:
        raise ValueError(f"slots {tuple(slots)} are not event fields in the contract's order {tuple(order)}")
    pieces: list[str] = []
    current = "{"
    for index, name in enumerate(FIELDS):
        current += f'{"," if index else ""}"{name}":'
        if name in slots:
            quote = '"' if name in quoted else ""
            pieces.append(current + quote)
            current = quote
        else:
            current += _default_json(name)
    pieces.append(current + "}")
    return tuple(pieces)
