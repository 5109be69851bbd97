"""Mail nobody here wrote, through one real proxy: CPython's email test data and the mail
gem's fixtures (tests/peer_corpora/mime/, vendored byte for byte).

Each message is sent as an app sends a file's bytes (``smtplib.sendmail``: line endings as
stored, LF for most), relayed to a capturing upstream, and the copy is compared with the
original by an independent reader, Python's ``email`` package (``policy=default``), never
by the proxy's own helpers: accepted; CRLF only; every leaf but the HTML the same bytes
(attachments decoded byte-identical); signed and encrypted mail untouched below its
header block; encapsulated messages (``message/rfc822``, digest parts) the same headers
and leaves; every web link in the HTML tracked, but the documented exclusions. One
nats-server, upstream and proxy serve the whole module.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
from collections.abc import AsyncIterator, Iterator
from email import policy
from email.message import Message
from email.parser import BytesParser
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
from prometheus_client import generate_latest

from mailbeacon.app.embedded_nats import EmbeddedNats
from mailbeacon.contract import signing
from smtp_proxy import metrics as proxy_metrics
from tests.proxy.test_proxy_smtp import RunningProxy, proxy_running
from tests.support import SECRET, SmtpSink, metric_value

pytestmark = pytest.mark.slow  # peer corpora

CORPUS = Path(__file__).resolve().parents[1] / "peer_corpora" / "mime"
MESSAGES = sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*") if p.suffix in (".txt", ".eml"))
SITE_URL = "https://track.example.test"
RECIPIENT = "ann@example.com"

# Not valid mail: each is accepted and relayed exactly as received (the Message-ID and Date a
# submission server adds aside), untracked and counted in _rewrite_failures_total.
NOT_MAIL = {
    # The header block never ends: every line is a header field, there is no body.
    "cpython/msg_35.txt": "no empty line between header block and body",
    # A line of the header block that is no field at all: readers disagree on where the
    # header block ends, so nothing is changed.
    "cpython/msg_19.txt": "a header line without a colon",
    "mail-rb/error_emails/multiple_references_with_one_invalid.eml": "a folded line without leading space",
    "mail-rb/rfc2822/example13.eml": "a header line without a colon ('__')",
}
# A field name with a space: strict readers (Python's email) start the body there, others
# read on. What the proxy adds goes before that line, so every reader finds it; the body a
# lenient reader sees is the one compared (the original without that line).
CUT_HEADER_BLOCK = {
    "mail-rb/plain_emails/raw_email_incorrect_header.eml": b"quite Delivered-To: xxx@xxx.xxx\r\n"
}
# boundary=----=_NextPart_... unquoted, with "=" in it: policy.default finds no parts, mail
# clients (and the proxy, and compat32) do. Read with compat32.
LENIENT_READING = {
    "mail-rb/plain_emails/raw_email_bad_time.eml",
    "mail-rb/mime_emails/raw_email_with_illegal_boundary.eml",
}
# An <a href=" never closed: HTMLParser finds no link in the original; the pixel and the
# honeypot, put before the last </body>, land inside that open attribute. Links not compared.
BROKEN_HTML = {"mail-rb/error_emails/cant_parse_from.eml"}
SIGNED_TYPES = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
        "application/pkcs7-signature",
        "application/x-pkcs7-signature",
        "application/pgp-signature",
    }
)


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sink() -> AsyncIterator[SmtpSink]:
    server = await SmtpSink().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def proxy(
    nats_url: str, sink: SmtpSink, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningProxy]:
    async with proxy_running(
        tmp_path_factory.mktemp("proxy"), nats_url, sink, site_url=SITE_URL, default_campaign="default/corpus"
    ) as running:
        yield running


# -- what the proxy receives and what an independent reader makes of it ------------------------


def on_the_wire(stored: bytes) -> bytes:
    """The message the proxy relays when an app sends these bytes: smtplib ends it with CRLF;
    a LF, and CRs right before it, end a line; any other CR is a line break upstream."""
    data = stored if stored.endswith(b"\r\n") else stored + b"\r\n"
    return re.sub(rb"\r*\n|\r", b"\r\n", data)


def parse(data: bytes, lenient: bool = False) -> Message:
    return BytesParser(policy=policy.compat32 if lenient else policy.default).parsebytes(data)


def leaves(message: Message) -> list[Message]:
    """Non-multipart parts in order, encapsulated messages' included."""
    payload = message.get_payload()
    if isinstance(payload, list):
        return [leaf for part in payload if isinstance(part, Message) for leaf in leaves(part)]
    return [message]


def text_of(part: Message) -> str:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    try:
        return data.decode(part.get_content_charset() or "us-ascii", "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def is_inline_html(part: Message) -> bool:
    return part.get_content_type() == "text/html" and part.get_content_disposition() != "attachment"


def fingerprint(part: Message, headers: bool) -> tuple[object, ...]:
    """A leaf's type and its body exactly as encoded (with its own header lines when asked)."""
    raw_headers = [(k, v) for k, v in part.raw_items() if not k.lower().startswith("x-mailbeacon-")]
    return part.get_content_type(), part.get_payload(), (raw_headers if headers else None)


def encapsulated(message: Message) -> list[tuple[object, ...]]:
    """Every message/rfc822 part (digest parts included): its header fields and its leaves."""
    found: list[tuple[object, ...]] = []
    for part in message.walk():
        if part.get_content_type() == "message/rfc822":
            payload = part.get_payload()
            assert isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], Message)
            inner = payload[0]
            found.append(
                (list(inner.raw_items()), [fingerprint(leaf, headers=True) for leaf in leaves(inner)])
            )
    return found


def is_signed(message: Message) -> bool:
    return any(part.get_content_type() in SIGNED_TYPES for part in message.walk())


class Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        href = values.get("href")
        if tag in ("a", "area") and href is not None:
            self.links.append((href, values))


def hrefs(message: Message) -> list[tuple[str, dict[str, str | None]]]:
    found = []
    for part in leaves(message):
        if is_inline_html(part):
            parser = Hrefs()
            parser.feed(text_of(part))
            found.extend(parser.links)
    return found


def browser_url(href: str) -> str:
    return re.sub(r"[\t\r\n]", "", href).strip()


def trackable(href: str, attrs: dict[str, str | None], unsubscribe_urls: set[str]) -> bool:
    """The rule of docs/proxy.md "What changes in a copy": web links, less mailto:/tel:/anchors, unsubscribe links and the
    List-Unsubscribe URLs, links at the tracker, data-notrack and +notrack, control characters."""
    url = browser_url(href)
    if not re.match(r"https?://", url, re.IGNORECASE) or "data-notrack" in attrs:
        return False
    if re.search(r"[\x00-\x1f\x7f]", url) or url.startswith(SITE_URL) or url in unsubscribe_urls:
        return False
    return re.search(r"unsubscribe|opt-?out", url, re.IGNORECASE) is None


def destination(href: str, tracking_id: str) -> str | None:
    """Where a click link of this copy leads (its signature checked), or None for another link."""
    if not href.startswith(f"{SITE_URL}/track/click/{tracking_id}/"):
        return None
    query = parse_qs(urlsplit(href).query)
    url, signature = query["url"][0], query["sig"][0]
    assert signing.verify_click([SECRET.encode()], tracking_id, url, signature), href
    return url


def metrics() -> str:
    return generate_latest(proxy_metrics.REGISTRY).decode()


# -- the test --------------------------------------------------------------------------------


def send(port: int, stored: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        return smtp.sendmail(
            "app@shop.example.com", [RECIPIENT], stored, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name", MESSAGES)
async def test_peer_message_through_the_proxy(name: str, proxy: RunningProxy, sink: SmtpSink) -> None:
    stored = (CORPUS / name).read_bytes()
    before, known = metrics(), len(sink.messages)
    refused = await asyncio.to_thread(send, proxy.port, stored)
    assert refused == {}  # accepted (smtplib raises on a 4xx/5xx for the only recipient)
    assert [m.recipients for m in sink.messages[known:]] == [[RECIPIENT]]
    relayed = sink.messages[known].content
    after = metrics()

    def counted(metric: str, **labels: str) -> float:
        return metric_value(after, metric, **labels) - metric_value(before, metric, **labels)

    assert re.search(rb"\r(?!\n)|(?<!\r)\n", relayed) is None, "CRLF line endings only"
    wire = on_the_wire(stored)
    if name in NOT_MAIL:
        assert relayed.endswith(wire)  # as received, behind at most a Message-ID and Date
        assert counted("mailbeacon_proxy_rewrite_failures_total") == 1
        return
    assert counted("mailbeacon_proxy_rewrite_failures_total") == 0
    lenient = name in LENIENT_READING
    original, copy = parse(wire, lenient), parse(relayed, lenient)
    if name in CUT_HEADER_BLOCK:
        line = CUT_HEADER_BLOCK[name]
        assert b"\r\n" + line in relayed  # still there, byte for byte
        original = parse(wire.replace(line, b""))
    tracking_id = str(copy["X-Mailbeacon-Tracking-ID"])
    assert re.fullmatch(r"[0-9a-f-]{36}", tracking_id), "the tracking id is a header field"
    assert "X-Campaign" not in copy

    # Every leaf but the inline HTML: the same type and encoded body; the same header lines
    # too, but for a single-part message's own (the copy's header block is the message's).
    nested = original.is_multipart()
    expected = [fingerprint(leaf, nested) for leaf in leaves(original) if not is_inline_html(leaf)]
    kept = [fingerprint(leaf, nested) for leaf in leaves(copy) if not is_inline_html(leaf)]
    if not nested and copy.is_multipart():
        kept = [fingerprint(leaf, False) for leaf in leaves(copy) if not is_inline_html(leaf)]
    assert kept == expected
    # Attachments decode to the same bytes.
    assert [
        leaf.get_payload(decode=True) for leaf in leaves(copy) if leaf.get_content_maintype() != "text"
    ] == [leaf.get_payload(decode=True) for leaf in leaves(original) if leaf.get_content_maintype() != "text"]
    assert encapsulated(copy) == encapsulated(original)

    links = hrefs(copy)
    why = "signed" if is_signed(original) else "dkim_signed" if "DKIM-Signature" in original else None
    for reason in ("signed", "dkim_signed"):
        assert counted("mailbeacon_proxy_untracked_messages_total", why=reason) == (reason == why)
    if why is not None:
        body_at = re.search(rb"\r\n\r\n", wire)
        assert body_at is not None
        assert relayed.endswith(wire[body_at.end() :]), "signed mail: the body byte for byte"
        assert links == hrefs(original) and f"{SITE_URL}/track/" not in relayed.decode("latin-1")
        return
    if name in BROKEN_HTML:
        return
    unsubscribe = set(re.findall(r"<(https?://[^>\s]+)>", str(original.get("List-Unsubscribe", ""))))
    honeypots = [href for href, _ in links if destination(href, tracking_id) == signing.HONEYPOT_URL]
    links = [(href, attrs) for href, attrs in links if href not in honeypots]
    if any(is_inline_html(leaf) for leaf in leaves(original)):
        # Each link of the original HTML, in order: tracked to where it led, or as written.
        originals = hrefs(original)
        assert len(links) == len(originals)
        for (href, attrs), (was, _) in zip(links, originals, strict=True):
            if trackable(was, attrs, unsubscribe):
                assert destination(href, tracking_id) == browser_url(was), (href, was)
            else:
                assert href == was
    for href, attrs in links:  # an HTML alternative made from text: its web links tracked
        assert destination(href, tracking_id) is not None or not trackable(href, attrs, unsubscribe), href


def test_the_corpus_is_there_and_holds_the_shapes_the_issue_names() -> None:
    assert len(MESSAGES) == 49 + 103
    signed = {name for name in MESSAGES if is_signed(parse(on_the_wire((CORPUS / name).read_bytes())))}
    assert signed == {
        "cpython/msg_33.txt",
        "cpython/msg_45.txt",
        "cpython/msg_48.txt",
        "mail-rb/mime_emails/raw_email_with_nested_attachment.eml",
        "mail-rb/mime_emails/sig_only_email.eml",
        # multipart/mixed with a detached S/MIME signature (the first also DKIM-signed)
        "mail-rb/mime_emails/raw_email2.eml",
        "mail-rb/mime_emails/raw_email7.eml",
    }
    assert set(NOT_MAIL) | set(CUT_HEADER_BLOCK) | LENIENT_READING | BROKEN_HTML <= set(MESSAGES)
