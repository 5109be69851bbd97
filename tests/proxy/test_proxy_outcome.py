"""The reply policy of docs/proxy.md "What the app is told (SMTP replies)", row by row, as a pure function."""

from __future__ import annotations

from smtp_proxy.relay.outcome import decide
from smtp_proxy.relay.upstream import CopyResult

CAMPAIGN = "default/news"
IDS = ["00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"]


def results(*codes: int) -> list[CopyResult]:
    return [CopyResult(f"r{i}@example.com", code, f"{code} reply") for i, code in enumerate(codes)]


def kinds(codes: tuple[int, ...]) -> tuple[str, list[str]]:
    outcome = decide(results(*codes), CAMPAIGN, IDS[: len(codes)], "<m@example.com>")
    return outcome.reply[:3], [f"{e.type.value}:{e.recipient}" for e in outcome.events]


def test_every_row_of_the_reply_table() -> None:
    assert kinds((250, 250)) == ("250", ["sent:r0@example.com", "sent:r1@example.com"])
    # Some accepted, the rest refused (permanently, or temporarily past the retry window).
    assert kinds((250, 550)) == ("250", ["sent:r0@example.com", "failed:r1@example.com"])
    assert kinds((250, 451)) == ("250", ["sent:r0@example.com", "failed:r1@example.com"])
    # Nothing accepted, one refusal temporary: the app retries the whole message, and the
    # retry records every copy (a failed event now would count r1 twice).
    assert kinds((451, 550)) == ("451", [])
    assert kinds((421, 421)) == ("421", [])
    # Nothing accepted, all refusals permanent: final, so recorded.
    assert kinds((550, 553)) == ("550", ["failed:r0@example.com", "failed:r1@example.com"])
