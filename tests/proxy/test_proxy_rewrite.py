"""Rewriting as a pure function: property tests over random HTML and random MIME trees, and unit cases.

Every copy is made the way the proxy makes it for a recipient (:class:`MessageCopies`,
with provider correlation and DKIM handling), not by a shortcut of its own.
"""

from __future__ import annotations

import email
import html
import json
import re
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from urllib.parse import parse_qs, urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbeacon.contract import signing
from mailbeacon.contract.campaigns import TrackingSwitches
from smtp_proxy.relay.data_stream import smtp_data
from smtp_proxy.rewrite.copies import CopyOptions, MessageCopies
from smtp_proxy.rewrite.html_links import honeypot_tag, pixel_tag, quote_attr
from smtp_proxy.rewrite.leaves import RewriteError
from smtp_proxy.rewrite.mime import Part
from smtp_proxy.rewrite.optout import NOTHING, TrackSwitches, switches_from_header

SITE = "https://t.example.test"
KEYS = [b"property-key"]
TID = "0b6a3f0e-7c1d-4e2f-9a3b-5c6d7e8f9a0b"
OPTIONS = CopyOptions(SITE, KEYS)


def copies_of(
    raw: bytes, options: CopyOptions = OPTIONS, campaign: TrackingSwitches | None = None
) -> MessageCopies:
    """The message as the proxy's handler prepares it for its recipients."""
    return MessageCopies(raw, Part.parse(raw), options, campaign or TrackingSwitches(), TrackSwitches())


def copy_for(copies: MessageCopies, tracking_id: str = TID, recipient: str = "ann@example.com") -> bytes:
    return b"".join(bytes(piece) for piece in copies.content(recipient, tracking_id))


# -- random HTML -------------------------------------------------------------------------

words = st.text(
    alphabet=st.characters(blacklist_characters="<>&\"'\r", blacklist_categories=("Cs",)), max_size=12
)
paths = st.text(alphabet="abcdefghij0123456789-_./%~", max_size=10)
web_urls = st.builds(
    lambda scheme, host, path, query: (
        f"{scheme}://{host}.example.com/{path}" + (f"?a={query}&b=2" if query else "")
    ),
    st.sampled_from(["http", "https", "HTTPS"]),
    st.sampled_from(["shop", "blog", "x-1"]),
    paths,
    st.one_of(st.none(), paths),
)
other_urls = st.sampled_from(["mailto:a@example.com", "tel:+1555", "#top", "{{ url }}", "/relative", ""])


@st.composite
def link(draw: st.DrawFn) -> str:
    url = draw(st.one_of(web_urls, other_urls))
    tag = draw(st.sampled_from(["a", "A", "area", "v:roundrect"]))
    quote = draw(st.sampled_from(['"', "'"]))
    before = draw(st.sampled_from(["", ' class="btn"', " style='x:y'", "\n"]))
    href = draw(st.sampled_from(["href", "HREF", "Href"]))
    return f"<{tag}{before} {href}={quote}{quote_attr(url, quote)}{quote}>{html.escape(draw(words))}</{tag}>"


fragments = st.one_of(
    words.map(html.escape),
    link(),
    st.sampled_from(
        ["<p>", "</p>", "<br>", "<!--[if mso]>", "<![endif]-->", '<img src="cid:x">', "\n", "\u00e9\u20ac"]
    ),
)
documents = st.builds(
    lambda parts, wrapped: (
        ("<html><body>" + "".join(parts) + "</body></html>") if wrapped else "".join(parts)
    ),
    st.lists(fragments, max_size=25),
    st.booleans(),
)


def strip_tracking(markup: str, tracking_id: str) -> tuple[str, list[str]]:
    """Undo the proxy's changes: tracked hrefs back to their destination, pixel and honeypot out."""
    markup = markup.replace(pixel_tag(signing.pixel_url(SITE, tracking_id)), "", 1)
    markup = markup.replace(honeypot_tag(signing.honeypot_url(SITE, KEYS, tracking_id)), "", 1)
    destinations: list[str] = []

    def back(match: re.Match[str]) -> str:
        quote, value = match.group(1), match.group(2)
        query = parse_qs(urlsplit(html.unescape(value)).query)
        url, sig = query["url"][0], query["sig"][0]
        assert signing.verify_click(KEYS, tracking_id, url, sig)
        destinations.append(url)
        return quote + quote_attr(url, quote) + quote

    prefix = re.escape(f"{SITE}/track/click/{tracking_id}/")
    markup = re.sub(rf"""(["'])({prefix}[^"']*)\1""", back, markup)
    return markup, destinations


def html_message(markup: str, encoding: str, charset: str = "utf-8") -> bytes:
    part = MIMEText(markup, "html", charset)
    if encoding != "base64":
        del part["Content-Transfer-Encoding"]
        part.set_payload(
            markup.encode(charset).decode("ascii", "surrogateescape") if encoding == "8bit" else markup
        )
        if encoding == "quoted-printable":
            from email.encoders import encode_quopri

            part.set_payload(markup.encode(charset))
            encode_quopri(part)
        else:
            part["Content-Transfer-Encoding"] = encoding
    part["Subject"] = "property"
    return part.as_bytes()


def decoded_html(content: bytes) -> str:
    message = email.message_from_bytes(content, policy=compat32)
    for part in message.walk():
        if part.get_content_type() == "text/html":
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            return data.decode(part.get_content_charset() or "utf-8")
    raise AssertionError("no HTML part")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, st.sampled_from(["8bit", "quoted-printable", "base64"]))
def test_random_html_round_trips(markup: str, encoding: str) -> None:
    raw = html_message(markup, encoding)
    copies = copies_of(raw)
    out = decoded_html(copy_for(copies))
    assert copies.prepared is not None and copies.render_error is None
    restored, destinations = strip_tracking(out, TID)
    assert restored == markup  # removing the tracking gives back the input, character for character
    assert destinations == copies.prepared.links  # every trackable link tracked exactly once, in order
    assert out.count(signing.pixel_url(SITE, TID)) == 1
    assert all(u.lower().startswith("http") and "://" in u for u in destinations)


# -- random MIME trees -------------------------------------------------------------------

charsets = st.sampled_from(["utf-8", "iso-8859-1", "windows-1252", "iso-2022-jp", "us-ascii"])


@st.composite
def leaf(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(["html", "plain", "binary", "image", "html-attachment"]))
    if kind == "binary":
        return MIMEApplication(draw(st.binary(max_size=300)), Name="data.bin")
    if kind == "image":
        return MIMEBase("image", "png")  # an empty inline image
    charset = draw(charsets)
    text = draw(documents)
    try:
        text.encode(charset)
    except UnicodeEncodeError:
        charset = "utf-8"
    part = MIMEText(text, "html" if kind.startswith("html") else "plain", charset)
    if kind == "html-attachment":
        part.add_header("Content-Disposition", "attachment", filename="page.html")
    return part


def tree(children: st.SearchStrategy[list[Message]]) -> st.SearchStrategy[Message]:
    return st.builds(
        lambda subtype, parts: MIMEMultipart(subtype, _subparts=parts),
        st.sampled_from(["mixed", "alternative", "related"]),
        children,
    )


mime_trees = st.recursive(leaf(), lambda inner: tree(st.lists(inner, min_size=1, max_size=4)), max_leaves=8)


def leaves(message: Message) -> list[Message]:
    if message.is_multipart():
        return [part for sub in message.get_payload() for part in leaves(sub)]  # type: ignore[union-attr]
    return [message]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mime_trees, st.booleans())
def test_random_mime_trees(message: Message, crlf: bool) -> None:
    message["Subject"] = "tree"
    message["X-Campaign"] = "control header"
    raw = message.as_bytes()
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    copies = copies_of(raw)
    out = email.message_from_bytes(copy_for(copies), policy=compat32)
    assert copies.prepare_error is None and copies.render_error is None
    assert out["X-Campaign"] is None and out["X-Mailbeacon-Tracking-ID"] == TID
    source_leaves, out_leaves = leaves(email.message_from_bytes(raw, policy=compat32)), leaves(out)
    inline_html = [
        p for p in source_leaves if p.get_content_type() == "text/html" and not p.get("Content-Disposition")
    ]
    if not inline_html:
        return  # a text alternative may have been added; the corpus checks that shape
    assert len(out_leaves) == len(source_leaves)
    pixels = 0
    for before, after in zip(source_leaves, out_leaves, strict=True):
        if before in inline_html:
            text = after.get_payload(decode=True).decode(after.get_content_charset() or "utf-8")  # type: ignore[union-attr]
            pixels += text.count(signing.pixel_url(SITE, TID))
            restored, _ = strip_tracking(text, TID)
            original = before.get_payload(decode=True).decode(before.get_content_charset() or "utf-8")  # type: ignore[union-attr]
            assert restored == original
        else:  # every other part, attachments above all, exactly as it was
            assert (after.items(), after.get_payload()) == (before.items(), before.get_payload())
    assert pixels == 1


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=600),
    st.sampled_from([b"", b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"]),
)
def test_arbitrary_bytes_never_crash(junk: bytes, prefix: bytes) -> None:
    raw = prefix + junk
    copies = copies_of(raw)
    copy = copy_for(copies)
    assert copies.render_error is None
    if copies.prepared is None:  # refused knowingly, never by surprise: relayed exactly as received
        assert isinstance(copies.prepare_error, RewriteError), repr(copies.prepare_error)
        assert copy == raw
    else:
        assert TID.encode() in copy


# -- unit cases --------------------------------------------------------------------------


def test_prepare_once_render_per_recipient() -> None:
    raw = html_message('<html><body><a href="https://shop.example.com/">x</a></body></html>', "8bit")
    prepared = copies_of(raw)
    ids = ["11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"]
    copies = [copy_for(prepared, tid) for tid in ids]
    for tid, copy in zip(ids, copies, strict=True):
        _, destinations = strip_tracking(decoded_html(copy), tid)
        assert destinations == ["https://shop.example.com/"]
        assert copy.count(tid.encode()) >= 3  # header, click, pixel, honeypot: all this copy's


def test_long_line_switches_to_quoted_printable() -> None:
    markup = "<p>" + "x" * 950 + '<a href="https://shop.example.com/a">a</a></p>'
    copy = copy_for(copies_of(html_message(markup, "8bit")))
    assert b"Content-Transfer-Encoding: quoted-printable" in copy
    assert b"Content-Transfer-Encoding: 8bit" not in copy
    assert max(len(line) for line in copy.splitlines()) <= 998


def test_lf_only_message_keeps_its_line_endings() -> None:
    raw = html_message('<a href="https://shop.example.com/">x</a>', "8bit")
    assert b"\r\n" not in raw
    assert b"\r\n" not in copy_for(copies_of(raw))


def test_tracking_switches_from_the_header() -> None:
    assert switches_from_header(None) == TrackSwitches()
    assert switches_from_header("off") == NOTHING
    assert switches_from_header("opens") == TrackSwitches(True, False)
    assert switches_from_header("clicks, opens") == TrackSwitches()
    assert switches_from_header("gibberish") == NOTHING  # when in doubt, do not track


def test_provider_correlation_headers() -> None:
    def relayed(headers: bytes, provider: str, **options: str) -> bytes:
        raw = headers + b"Content-Type: text/html\r\n\r\n<a href='https://shop.example.com/'>x</a>\r\n"
        copy = copy_for(copies_of(raw, CopyOptions(SITE, KEYS, provider=provider, **options)))
        return copy[: copy.index(b"\r\n\r\n") + 2]

    mailgun = relayed(b'Subject: x\r\nX-Mailgun-Variables: {"order": 7}\r\n', "mailgun").decode()
    assert f'X-Mailgun-Variables: {{"order": 7, "tracking_id": "{TID}"}}' in mailgun
    assert "X-Mailgun-Track: no" in mailgun and mailgun.count("X-Mailgun-Variables") == 1
    postmark = relayed(b"Subject: x\r\n", "postmark").decode()
    assert f"X-PM-Metadata-tracking_id: {TID}" in postmark and "X-PM-TrackOpens: false" in postmark
    assert "X-PM-TrackLinks: None" in postmark
    ses = relayed(b"X-SES-MESSAGE-TAGS: team=growth\r\n", "ses", ses_configuration_set="no-tracking").decode()
    assert f"X-SES-MESSAGE-TAGS: team=growth, tracking_id={TID}" in ses and ses.count("X-SES-MESSAGE") == 1
    assert "X-SES-CONFIGURATION-SET: no-tracking" in ses
    generic = relayed(b"Subject: x\r\n", "generic").decode()
    assert generic.startswith("Subject: x\r\n") and "X-SMTPAPI" not in generic and "X-PM-" not in generic
    long_app_header = b'X-SMTPAPI: {"category": [' + b", ".join(b'"c%d"' % i for i in range(200)) + b"]}\r\n"
    sendgrid = relayed(long_app_header, "sendgrid")
    assert max(len(line) for line in sendgrid.split(b"\r\n")) < 998  # folded as SendGrid asks
    relayed_message = email.message_from_bytes(sendgrid, policy=compat32)
    assert len(relayed_message.get_all("X-SMTPAPI") or []) == 1
    value = re.sub(r"\r?\n[ \t]", " ", str(relayed_message["X-SMTPAPI"]))
    assert json.loads(value)["unique_args"] == {"tracking_id": TID}


def test_smtp_data_stuffs_dots_and_fixes_line_endings() -> None:
    pieces = [b"Subject: x\n", b"\n.leading dot\r\nbare\rcr\n", memoryview(b"..two\r\nno final break")]
    assert b"".join(smtp_data(pieces)) == (
        b"Subject: x\r\n\r\n..leading dot\r\nbare\r\ncr\r\n...two\r\nno final break\r\n"
    )


header_values = st.builds(
    lambda ctype, params, spaced: ctype + "".join((" ; " if spaced else "; ") + p for p in params),
    st.sampled_from(
        ["text/html", "TEXT/Plain", "multipart/mixed", "Multipart/Alternative", "image/png", "bogus", ""]
    ),
    st.lists(
        st.sampled_from(
            [
                'boundary="==b1=="',
                "boundary=plain-b",
                'boundary="with \\"quote\\""',
                "charset=UTF-8",
                'charset="iso-8859-1"',
                "charset = windows-1252",
                "name=report.pdf",
                'boundary="trailing  "',
            ]
        ),
        max_size=3,
    ),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.none(), header_values),
    st.sampled_from([None, "base64", " Quoted-Printable ", "8bit"]),
    st.sampled_from([None, "attachment; filename=a.pdf", "inline", "ATTACHMENT"]),
    st.booleans(),
)
def test_fast_content_fields_agree_with_the_email_package(
    content_type: str | None, encoding: str | None, disposition: str | None, folded: bool
) -> None:
    lines = ["Subject: x"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}".replace("; ", ";\r\n\t" if folded else "; "))
    if encoding is not None:
        lines.append(f"Content-Transfer-Encoding: {encoding}")
    if disposition is not None:
        lines.append(f"Content-Disposition: {disposition}")
    from smtp_proxy.rewrite.mime import Part

    part = Part.parse(("\r\n".join(lines) + "\r\n\r\nbody").encode())
    reference = email.message_from_bytes(part.headers, policy=compat32)
    assert part.content_type == reference.get_content_type()
    assert part.charset == str(reference.get_content_charset() or "us-ascii")
    boundary = reference.get_boundary()
    assert part.boundary == (boundary.encode() if boundary else None)
    assert part.transfer_encoding == str(reference.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    assert part.is_attachment == (
        str(reference.get("Content-Disposition", "")).split(";")[0].strip().lower() == "attachment"
    )
