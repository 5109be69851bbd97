"""DATA with bare LF line endings, as ``smtplib.sendmail(..., msg.as_bytes())`` sends it, and
the end of DATA no client can move (SMTP smuggling): :class:`DataReader` and a real proxy."""

from __future__ import annotations

import asyncio
import os
import re
import smtplib
import socket
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st

from mailbeacon.contract import signing
from smtp_proxy.relay.data_stream import smtp_data
from smtp_proxy.session.data_reader import DataReader
from tests.proxy.test_proxy_smtp import proxy_running
from tests.support import SECRET, SmtpSink

MAX_LINE = 999


def read_all(chunks: list[bytes], max_size: int = 0) -> tuple[bytes | None, bytes | None, DataReader]:
    """The message DataReader makes of ``chunks``, what followed the end of DATA (in that read
    and those not made yet), and the reader."""
    reader = DataReader(MAX_LINE, max_size)
    content = b""
    for index, chunk in enumerate(chunks):
        lines, after = reader.feed(chunk)
        content += lines
        if after is not None:
            return (None if reader.refused else content), after + b"".join(chunks[index + 1 :]), reader
    return None, None, reader


def reference(stream: bytes) -> tuple[bytes, bytes] | None:
    """The rules stated line by line (Postfix's reading): lines end at LF, a CR before it
    belongs to the line break; only a dot line ended by CRLF after a line ended by CRLF
    (or first) ends DATA; every other leading dot is a doubled one."""
    content = b""
    position, after_crlf = 0, True
    while True:
        end = stream.find(b"\n", position)
        if end < 0:
            return None
        line = stream[position : end + 1]
        position = end + 1
        crlf = line.endswith(b"\r\n")
        text = line[:-2] if crlf else line[:-1]
        if text == b"." and crlf and after_crlf:
            return content, stream[position:]
        if text.startswith(b"."):
            text = text[1:]
        content += text + b"\r\n"
        after_crlf = crlf


# -- the reader as a pure function -----------------------------------------------------------


def test_bare_lf_lines_become_crlf_and_a_long_message_is_not_one_long_line() -> None:
    body = b"".join(b"line %d of an LF-only message\n" % i for i in range(3000))  # ~90 KB
    content, after, reader = read_all([b"Subject: lf\n\n" + body + b"\r\n.\r\nQUIT\r\n"])
    assert not reader.refused
    assert content == (b"Subject: lf\n\n" + body + b"\r\n").replace(b"\n", b"\r\n").replace(b"\r\r", b"\r")
    assert after == b"QUIT\r\n"


def test_dots_are_unstuffed_on_lf_lines_too() -> None:
    content, _, _ = read_all([b"Subject: dots\n\n..leading\n...two\r\n..\nend\r\n.\r\n"])
    assert content == b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\nend\r\n"


def test_the_line_limit_counts_each_normalised_line() -> None:
    for ending in (b"\n", b"\r\n"):
        fits = b"x" * MAX_LINE + ending
        content, _, reader = read_all([b"Subject: l\n\n" + fits * 3 + b"\r\n.\r\n"])
        assert not reader.refused and content is not None and content.count(b"x" * MAX_LINE + b"\r\n") == 3
        _, after, reader = read_all(
            [b"Subject: l\n\n" + fits + b"y" * (MAX_LINE + 1) + ending + b"\r\n.\r\nNOOP\r\n"]
        )
        assert reader.too_long and after == b"NOOP\r\n"  # read to the end, then refused


def test_a_bare_cr_is_text_not_a_line_break() -> None:
    # Postfix keeps a bare CR inside the line: it neither ends a line nor the message.
    content, _, _ = read_all([b"Subject: cr\r\n\r\na\rb\r.\rc\r\n.\r\n"])
    assert content == b"Subject: cr\r\n\r\na\rb\r.\rc\r\n"
    _, _, reader = read_all([b"Subject: cr\r\n\r\n" + b"x\r" * 600 + b"\r\n.\r\n"])
    assert reader.too_long  # one line of 1,200 bytes


def test_the_size_limit_counts_crlf_line_endings() -> None:
    message = b"Subject: s\n\n" + b"x\n" * 100
    assert read_all([message + b"\r\n.\r\n"], max_size=len(message) + 102 + 2)[0] is not None
    _, after, reader = read_all([message + b"\r\n.\r\n"], max_size=len(message) + 101)
    assert reader.too_much and after == b""


# Lone dots next to a bare LF or CR: a stricter server downstream, or a laxer one, would
# end the message there. None of them ends it here; the text after is the message's.
SMUGGLED = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r\r\n"]


def test_only_crlf_dot_crlf_ends_data() -> None:
    for lone_dot in SMUGGLED:
        stream = b"Subject: s\r\n\r\nhello" + lone_dot + b"MAIL FROM:<evil@example.com>\r\n"
        content, after, _ = read_all([stream])
        assert content is None and after is None, lone_dot  # still reading the message
        content, after, _ = read_all([stream + b"bye\r\n.\r\n"])
        assert content is not None and b"MAIL FROM:<evil@example.com>\r\nbye\r\n" in content, lone_dot
        assert after == b""


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b"..", b".", b"\r", b"\n", b"\r\n", b"b" * 400]), max_size=60),
    st.lists(st.integers(min_value=1, max_value=40), max_size=10),
)
def test_any_bytes_in_any_chunks_read_as_the_line_rules_say(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces) + b"\r\n.\r\nRSET\r\n"
    chunks, position = [], 0
    for cut in cuts:
        chunks.append(stream[position : position + cut])
        position += cut
    chunks.append(stream[position:])
    content, after, reader = read_all([chunk for chunk in chunks if chunk])
    expected = reference(stream)
    assert expected is not None
    lines = expected[0].split(b"\r\n")
    if max(map(len, lines)) > MAX_LINE:
        assert reader.too_long and after == expected[1]
    else:
        assert (content, after) == expected


def test_upstream_gets_crlf_only_and_crs_before_a_lf_are_its_line_break() -> None:
    # A bare CR kept as text on the way in is a line break on the way out; CRs right before
    # a LF are part of that one line break (Postfix strips them), not an empty line that
    # would end the header block early for the upstream alone.
    pieces = [b"Subject: x\r\r\nTo: b@example.com\r\n", b"\r\nbody\r\r\na\rb\r.\r\n"]
    assert b"".join(smtp_data(pieces)) == b"Subject: x\r\nTo: b@example.com\r\n\r\nbody\r\na\r\nb\r\n..\r\n"


# -- through a real proxy --------------------------------------------------------------------


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs.extend(value for name, value in attrs if name == "href" and value)


def lf_only_message() -> tuple[EmailMessage, list[str], bytes]:
    links = [f"https://shop.example.com/product/{i}?ref=mail" for i in range(10)]
    paragraphs = [
        f'<p style="margin:0 0 12px 0">Paragraph {i}: {"lorem ipsum dolor sit amet " * 6}'
        f'<a href="{links[i % 10]}">see product {i % 10}</a></p>'
        for i in range(200)
    ]
    markup = "<html><body>\n" + "\n".join(paragraphs) + "\n</body></html>\n"
    assert len(markup) > 50_000
    message = EmailMessage()
    message["From"] = "news@shop.example.com"
    message["To"] = "ann@example.com"
    message["Subject"] = "LF only"
    message["X-Campaign"] = "conversations"
    message.set_content("Our products: https://shop.example.com/")
    message.add_alternative(markup, subtype="html")
    blob = os.urandom(20_000) + b"\r\n\n\r.\r\n"  # line-break and dot bytes inside: base64 keeps them
    message.add_attachment(blob, maintype="application", subtype="octet-stream", filename="data.bin")
    return message, links, blob


async def test_smtplib_sendmail_of_as_bytes_goes_through(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    message, links, blob = lf_only_message()
    raw = message.as_bytes()
    assert b"\r\n" not in raw and len(raw) > 50_000  # what smtplib sends: LF only, 50 KB
    async with proxy_running(tmp_path, nats_url, sink) as proxy:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                return smtp.sendmail("news@shop.example.com", ["ann@example.com"], raw)

        assert await asyncio.to_thread(send) == {}  # accepted
    relayed = sink.messages[0].content
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", relayed) is None  # CRLF line endings only
    copy = BytesParser(policy=policy.default).parsebytes(relayed)
    tracking_id = str(copy["X-Mailbeacon-Tracking-ID"])
    attachment = next(iter(copy.iter_attachments()))
    assert attachment.get_content() == blob
    html_part = copy.get_body(("html",))
    assert html_part is not None
    parser = Links()
    parser.feed(html_part.get_content())
    prefix = f"{proxy.settings.site_url}/track/click/{tracking_id}/"
    destinations = []
    for href in parser.hrefs:
        assert href.startswith(prefix), href  # every link is tracked
        query = parse_qs(urlsplit(href).query)
        assert signing.verify_click([SECRET.encode()], tracking_id, query["url"][0], query["sig"][0])
        destinations.append(query["url"][0])
    assert destinations[:-1] == [links[i % 10] for i in range(200)]
    assert destinations[-1] == signing.HONEYPOT_URL


async def test_smuggled_dot_lines_stay_inside_the_message(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    async with proxy_running(tmp_path, nats_url, sink) as proxy:

        def conversation(lone_dot: bytes) -> list[bytes]:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
                reader = conn.makefile("rb")
                replies = [reader.readline()]
                for command in (
                    b"EHLO client.example",
                    b"MAIL FROM:<a@example.com>",
                    b"RCPT TO:<b@example.com>",
                ):
                    conn.sendall(command + b"\r\n")
                    while (line := reader.readline())[3:4] == b"-":
                        pass
                    replies.append(line)
                conn.sendall(b"DATA\r\n")
                replies.append(reader.readline())
                conn.sendall(
                    b"Subject: smuggling\r\n\r\nhello" + lone_dot
                    + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
                    + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
                )  # fmt: skip
                replies.append(reader.readline())
                conn.sendall(b"QUIT\r\n")
                replies.append(reader.readline())
                return [reply[:3] for reply in replies]

        for lone_dot in SMUGGLED:
            replies = await asyncio.to_thread(conversation, lone_dot)
            assert replies == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"], lone_dot
    assert len(sink.messages) == len(SMUGGLED)  # one message each: nothing smuggled out
    for received in sink.messages:
        assert received.recipients == ["b@example.com"]
        assert b"\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n" in received.content
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", received.content) is None
