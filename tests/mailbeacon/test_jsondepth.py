"""JSON depth measured on the bytes equals the depth of what a JSON reader builds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbeacon.contract.jsondepth import json_depth, nests_deeper_than

# Text full of what could fool a byte scan: brackets, quotes and backslashes inside strings.
TRICKY = st.text(alphabet=st.sampled_from(list('[]{}"\\ab\u00e9\u2028\n')), max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=4),
    max_leaves=40,
)


def depth(value: Any) -> int:
    """The reference: nesting of the parsed value, with an explicit stack."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            stack.extend((child, level) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_depth_of_the_bytes_is_the_depth_of_the_value(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    expected = depth(value)
    assert json_depth(text) == json_depth(text.encode()) == expected
    for limit in {0, max(expected - 1, 0), expected, expected + 1}:
        assert nests_deeper_than(text.encode(), limit) is (expected > limit)


def test_far_too_deep_text_is_measured_without_recursion() -> None:
    assert json_depth(b"[" * 1_000_000) == 1_000_000
    assert nests_deeper_than(b"[" * 1_000_000 + b"]" * 1_000_000, 64)
    assert not nests_deeper_than(b"[]" * 500_000, 64)
    assert json_depth('"[[[[" ') == 0 and json_depth('["\\\\", "\\"["]') == 1
