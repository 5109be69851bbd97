"""The message corpus through the real proxy (smtplib → proxy → SMTP sink) and what comes out.

For every message in tests/proxy/corpus/: one copy per recipient, attachments byte-identical,
every trackable link tracked exactly once with a valid signature resolving to the
original destination, untracked links exactly as written, the pixel and the honeypot
present once, control headers gone. Expectations are hand-written in expected.json.
"""

from __future__ import annotations

import asyncio
import email
import html
import json
import re
import smtplib
import uuid
from email.message import Message
from email.policy import compat32
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from mailbeacon.contract import signing
from tests.proxy.test_proxy_smtp import count_events, proxy_running
from tests.support import SECRET, SmtpSink

CORPUS = Path(__file__).parent / "corpus"
EXPECTATIONS = json.loads((CORPUS / "expected.json").read_text())
SITE_URL: str = EXPECTATIONS["site_url"]
MESSAGES: dict[str, dict[str, object]] = EXPECTATIONS["messages"]
RECIPIENTS = ["ann@example.com", "ben@example.com"]


def on_the_wire(raw: bytes) -> bytes:
    """What the proxy receives for ``raw``: smtplib sends CRLF line endings."""
    data = re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", raw)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def send_raw(port: int, raw: bytes, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.sendmail("sender@shop.example.com", recipients, raw, mail_options=["SMTPUTF8", "BODY=8BITMIME"])


def leaves(message: Message, into_rfc822: bool) -> list[Message]:
    """Non-multipart parts in order (optionally not descending into attached messages)."""
    if message.get_content_type() == "message/rfc822" and not into_rfc822:
        return [message]
    if message.is_multipart():
        payload = message.get_payload()
        assert isinstance(payload, list)
        return [leaf for part in payload for leaf in leaves(part, into_rfc822)]
    return [message]


def is_inline(part: Message, subtype: str) -> bool:
    disposition = str(part.get("Content-Disposition", "")).split(";")[0].strip().lower()
    return part.get_content_type() == f"text/{subtype}" and disposition != "attachment"


def fingerprint(part: Message) -> tuple[list[tuple[str, str]], object]:
    """A part's own headers and its body exactly as encoded (the proxy's headers left out)."""
    headers = [(k, str(v)) for k, v in part.items() if not k.lower().startswith("x-mailbeacon-")]
    payload = part.get_payload()
    if isinstance(payload, list):
        payload = [p.as_string() for p in payload]
    return headers, payload


def decoded_text(part: Message) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return str(part.get_payload())
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def header_block_end(data: bytes) -> int:
    match = re.search(rb"\r?\n\r?\n", data)
    return match.end() if match else len(data)


def click_destinations(markup: str, tracking_id: str) -> tuple[list[str], int]:
    """Destinations of this copy's click links (signature verified) and how many were honeypots."""
    destinations, honeypots = [], 0
    prefix = f"{SITE_URL}/track/click/{tracking_id}/"
    for value in re.findall(r"""href\s*=\s*["']([^"']*)["']""", markup, re.IGNORECASE):
        url = html.unescape(value)
        if not url.startswith(prefix):
            continue
        query = parse_qs(urlsplit(url).query)
        destination, signature = query["url"][0], query["sig"][0]
        assert signing.verify_click([SECRET.encode()], tracking_id, destination, signature), url
        if destination == signing.HONEYPOT_URL:
            honeypots += 1
        else:
            destinations.append(destination)
    return destinations, honeypots


def without_added_headers(original: bytes, relayed: bytes) -> bytes:
    """The copy minus the Message-ID and Date the proxy adds (in front) when the app sent none."""
    head = original[: header_block_end(original)]
    for name, missing in (
        (b"Message-ID", re.search(rb"(?im)^message-id:", head) is None),
        (b"Date", re.search(rb"(?im)^date:", head) is None),
    ):
        if missing and b"DKIM-Signature" not in head and re.search(rb"\r?\n\r?\n", original):
            line, _, rest = relayed.partition(b"\n")
            assert line.startswith(name + b": "), (name, line)
            relayed = rest
    return relayed


def check_copy(name: str, original: bytes, relayed: bytes, expected: dict[str, object]) -> str:
    relayed = without_added_headers(original, relayed)
    if expected["unparsable"]:
        assert relayed == original, name  # relayed exactly as received
        return ""
    source = email.message_from_bytes(original, policy=compat32)
    copy = email.message_from_bytes(relayed, policy=compat32)
    tracking_id = str(uuid.UUID(str(copy["X-Mailbeacon-Tracking-ID"])))
    assert copy["X-Campaign"] is None

    if not expected["rewritten"]:
        assert relayed[header_block_end(relayed) :] == original[header_block_end(original) :], name

    # Attachments and every part we do not track: the same headers and the same encoded bytes.
    out_parts = [fingerprint(part) for part in leaves(copy, into_rfc822=False)]
    for part in leaves(source, into_rfc822=False):
        if is_inline(part, "html"):
            continue
        if (
            is_inline(part, "plain")
            and expected["pixel"]
            and not any(is_inline(p, "html") for p in leaves(source, into_rfc822=False))
        ):
            continue  # the text part a text-only message is given an HTML alternative for
        if part.get_content_maintype() == "multipart":
            continue  # a multipart without boundary: its body is compared whole above
        assert fingerprint(part) in out_parts, f"{name}: {part.get_content_type()} changed"

    markups = [decoded_text(p) for p in leaves(copy, into_rfc822=False) if is_inline(p, "html")]
    markup = "\n".join(markups)
    destinations, honeypots = click_destinations(markup, tracking_id)
    assert destinations == expected["tracked"], name
    assert markup.count(f"{SITE_URL}/track/pixel/{tracking_id}/") == expected["pixel"], name
    assert honeypots == expected["pixel"], name  # one hidden honeypot link per tracked HTML copy
    everything = "\n".join(decoded_text(p) for p in leaves(copy, into_rfc822=True))
    for untouched in expected["untracked"]:  # type: ignore[attr-defined]
        assert untouched in everything, f"{name}: {untouched!r} was changed"
    return tracking_id


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MESSAGES))
async def test_corpus_message_through_the_proxy(
    name: str, tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    raw = (CORPUS / f"{name}.eml").read_bytes()
    async with proxy_running(
        tmp_path, nats_url, sink, site_url=SITE_URL, default_campaign="default/corpus"
    ) as proxy:
        await asyncio.to_thread(send_raw, proxy.port, on_the_wire(raw), RECIPIENTS)
        assert [m.recipients for m in sink.messages] == [[r] for r in RECIPIENTS]
        expected = MESSAGES[name]
        ids = {check_copy(name, on_the_wire(raw), m.content, expected) for m in sink.messages}
        assert len(ids) == (1 if expected["unparsable"] else 2)  # each copy has its own tracking id
        counts = await count_events(nats_url, "sent")
        assert counts == 2


def test_corpus_has_the_shapes_the_issue_asks_for() -> None:
    assert len(MESSAGES) >= 30
    names = set(MESSAGES)
    for kind in (
        "broken_",
        "iso_2022_jp",
        "windows_1252",
        "iso_8859_1",
        "related",
        "outlook_vml",
        "text_only",
    ):
        assert any(n.startswith(kind) for n in names), kind
