"""Message-ID and Date, added the way a submission server does when an app leaves them out."""

from __future__ import annotations

import asyncio
import email
import smtplib
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from smtp_proxy.rewrite.submission import added_message_id, message_id_domain, missing_headers
from tests.proxy.test_proxy_smtp import proxy_running, read_events
from tests.support import SmtpSink

NOW = datetime(2026, 11, 27, 21, 40, tzinfo=UTC)


def test_missing_headers_are_made_with_the_message_line_endings() -> None:
    bare = b"From: app@shop.example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    lines = missing_headers(bare, "app@shop.example.com", NOW)
    assert added_message_id(lines) == lines.split(b"\r\n")[0][12:].decode()
    added = lines.split(b"\r\n")
    assert added[0].startswith(b"Message-ID: <") and added[0].endswith(b"@shop.example.com>")
    assert added[1] == b"Date: Fri, 27 Nov 2026 21:40:00 +0000" and added[2] == b""
    lf = missing_headers(b"Subject: x\n\nbody\n", "", NOW)
    assert lf.count(b"\r") == 0 and b"@mailbeacon.invalid>\n" in lf


def test_present_headers_and_signed_messages_are_left_as_they_are() -> None:
    whole = b"Message-ID: <a@b.example>\r\nDATE: Fri, 27 Nov 2026 20:00:00 +0000\r\n\r\nx\r\n"
    assert missing_headers(whole, "a@b.example", NOW) == b""
    view = memoryview(b"Date: Fri, 27 Nov 2026 20:00:00 +0000\r\n\r\nx\r\n")
    assert missing_headers(view, "", NOW).startswith(b"Message-ID: <")
    assert b"Date" not in missing_headers(view, "", NOW)
    headers_only = b"From: a@b.example\r\nSubject: no body\r\n"
    assert missing_headers(headers_only, "a@b.example", NOW) == b""
    signed = b"DKIM-Signature: v=1; h=from:subject:message-id\r\nSubject: x\r\n\r\nx\r\n"
    assert missing_headers(signed, "a@b.example", NOW) == b""
    # A header named in the body, or one that merely starts alike, does not count.
    body_only = b"Subject: x\r\nX-Message-ID-Hint: 1\r\n\r\nMessage-ID: <in@body>\r\n"
    assert missing_headers(body_only, "", NOW).startswith(b"Message-ID: <")


def test_the_message_id_domain_comes_from_the_sender_when_it_is_one() -> None:
    assert message_id_domain("News@Shop.Example.com") == "shop.example.com"
    for odd in ("", "postmaster", "a@localhost", "a@bad domain.com", "a@-x.com"):
        assert message_id_domain(odd) == "mailbeacon.invalid", odd


async def test_the_sent_event_carries_the_message_id_every_copy_got(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    raw = (
        b"From: app@shop.example.com\r\nTo: a@example.com\r\nSubject: bare\r\n"
        b"X-Campaign: conversations\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n"
    )
    async with proxy_running(tmp_path, nats_url, sink, default_campaign="default/conversations") as proxy:

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.sendmail("app@shop.example.com", ["a@example.com", "b@example.com"], raw)

        await asyncio.to_thread(send)
        copies = [email.message_from_bytes(m.content) for m in sink.messages]
        ids = {copy["Message-ID"] for copy in copies}
        assert len(copies) == 2 and len(ids) == 1 and next(iter(ids)).endswith("@shop.example.com>")
        assert all(
            abs((parsedate_to_datetime(c["Date"]) - datetime.now(UTC)).total_seconds()) < 60 for c in copies
        )
        sent = await read_events(nats_url, "sent")
    assert {event.metadata["message_id"] for event in sent} == ids


async def test_untracked_mail_gets_them_too_and_unparsable_mail_does_not(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    untracked = b"From: app@shop.example.com\r\nSubject: receipt\r\n\r\nthanks\r\n"
    headers_only = b"From: app@shop.example.com\r\nSubject: no body\r\n"
    async with proxy_running(tmp_path, nats_url, sink) as proxy:  # no default campaign

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.sendmail("app@shop.example.com", ["a@example.com"], untracked)
                smtp.sendmail("app@shop.example.com", ["a@example.com"], headers_only)

        await asyncio.to_thread(send)
    first, second = (m.content for m in sink.messages)
    assert first.startswith(b"Message-ID: <") and first.endswith(untracked)
    assert b"\r\nDate: " in first[: -len(untracked)]
    assert second == headers_only
