"""The aggregator's side of suppressions that needs no server (the rest: test_end_to_end_suppressions)."""

from __future__ import annotations

import pytest

from aggregator import metrics
from aggregator.ingest import suppressions as recorder_module
from aggregator.ingest.suppressions import SuppressionRecorder


def test_a_flood_of_parked_unsubscribes_keeps_the_newest_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone can POST the public unsubscribe URL of a copy that never existed: such events
    park forever, and must not crowd out a genuine one parked a moment before its sent."""
    monkeypatch.setattr(recorder_module, "MAX_WATCHED", 3)
    recorder = SuppressionRecorder(db=None, suppressions=None)  # type: ignore[arg-type]
    before = metrics.SUPPRESSION_WATCH_OVERFLOW._value.get()
    for i in range(5):
        recorder._watch(f"forged-{i}", float(i))
    recorder._watch("genuine", 9.0)
    assert list(recorder.watched) == ["forged-3", "forged-4", "genuine"]
    assert metrics.SUPPRESSION_WATCH_OVERFLOW._value.get() - before == 3
