"""Recipient copies as the proxy builds them: link URLs as browsers read them, the app's
List-Unsubscribe, DKIM re-signing, and header blocks too large to be scanned per copy."""

from __future__ import annotations

import email
import html
import re
import time
from collections.abc import Callable
from email.message import Message
from email.policy import compat32
from urllib.parse import parse_qs, urlsplit

import dkim
import pytest

from mailbeacon.contract import signing
from mailbeacon.contract.campaigns import TrackingSwitches
from smtp_proxy.rewrite import mime
from smtp_proxy.rewrite.copies import CopyOptions, MessageCopies
from smtp_proxy.rewrite.dkim_sign import DkimSigner
from smtp_proxy.rewrite.mime import Part
from smtp_proxy.rewrite.optout import TrackSwitches
from tests.proxy.test_proxy_relay import rsa_key

SITE = "https://t.example.test"
KEYS = [b"copies-key"]
OPTIONS = CopyOptions(SITE, KEYS)
IDS = ["11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"]


def prepare(raw: bytes, options: CopyOptions = OPTIONS, **campaign: object) -> MessageCopies:
    copies = MessageCopies(raw, Part.parse(raw), options, TrackingSwitches(**campaign), TrackSwitches())
    assert copies.prepare_error is None
    return copies


def copy_for(copies: MessageCopies, tracking_id: str = IDS[0]) -> bytes:
    copy = b"".join(bytes(piece) for piece in copies.content("ann@example.com", tracking_id))
    assert copies.render_error is None
    return copy


def html_mail(markup: str, headers: str = "") -> bytes:
    return (
        "From: news@shop.example.com\r\nTo: ann@example.com\r\nSubject: links\r\n" + headers
        + "Content-Type: text/html; charset=utf-8\r\n\r\n" + markup + "\r\n"
    ).encode()  # fmt: skip


def clicks(copy: bytes, tracking_id: str = IDS[0]) -> list[str]:
    """Destinations of the copy's click links (signatures verified), the honeypot left out."""
    found = []
    for _, value in re.findall(r"""href=(["'])(.*?)\1""", copy.decode()):
        url = html.unescape(value)
        if url.startswith(f"{SITE}/track/click/{tracking_id}/"):
            query = parse_qs(urlsplit(url).query)
            assert signing.verify_click(KEYS, tracking_id, query["url"][0], query["sig"][0])
            if query["url"][0] != signing.HONEYPOT_URL:
                found.append(query["url"][0])
    return found


# -- link URLs as a browser reads them ---------------------------------------------------


def test_tabs_and_line_breaks_in_link_urls_are_dropped_as_browsers_do() -> None:
    markup = (
        '<a href="https://shop.example.com/&#10;sale">entity line feed</a>'
        '<a href="https://shop.example.com/\r\n  spring?a=1&amp;b=2">literal line break</a>'
        "<a href='https://shop.example.com/&#13;&#9;summer'>carriage return and tab</a>"
        '<a href="&#10;https://shop.example.com/autumn&#10;">around it</a>'
    )
    copy = copy_for(prepare(html_mail(markup)))
    assert clicks(copy) == [
        "https://shop.example.com/sale",
        "https://shop.example.com/  spring?a=1&b=2",
        "https://shop.example.com/summer",
        "https://shop.example.com/autumn",
    ]
    assert "\n" not in "".join(clicks(copy)) and "&#10;" not in copy.decode()


def test_links_with_other_control_characters_are_left_alone() -> None:
    untouched = [
        '<a href="https://shop.example.com/&#1;x">start of heading</a>',
        '<a href="https://shop.example.com/&#x7f;x">delete</a>',
        '<a href="https://shop.example.com/\x0bx">vertical tab</a>',
    ]
    copy = copy_for(prepare(html_mail("".join([*untouched, '<a href="https://shop.example.com/ok">ok</a>']))))
    assert clicks(copy) == ["https://shop.example.com/ok"]
    for link in untouched:
        assert link.encode() in copy  # exactly as written: not ours to sign


# -- List-Unsubscribe --------------------------------------------------------------------


def headers_of(copy: bytes) -> Message:
    return email.message_from_bytes(copy, policy=compat32)


def test_the_apps_list_unsubscribe_is_kept() -> None:
    own = (
        "List-Unsubscribe: <mailto:leave@shop.example.com>, <https://shop.example.com/unsub?u=7>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    )
    raw = html_mail('<a href="https://shop.example.com/unsub?u=7">leave</a>', own)
    copy = copy_for(prepare(raw, unsubscribe_header=True))
    relayed = headers_of(copy)
    assert relayed.get_all("List-Unsubscribe") == [
        "<mailto:leave@shop.example.com>, <https://shop.example.com/unsub?u=7>"
    ]
    assert relayed.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    assert b"/track/unsubscribe/" not in copy
    assert b'href="https://shop.example.com/unsub?u=7"' in copy  # its URL never wrapped


def test_ours_is_added_only_where_the_app_has_none() -> None:
    stray_post = "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"  # without List-Unsubscribe
    copies = prepare(
        html_mail('<a href="https://shop.example.com/">x</a>', stray_post), unsubscribe_header=True
    )
    for tracking_id in IDS:
        relayed = headers_of(copy_for(copies, tracking_id))
        assert relayed.get_all("List-Unsubscribe") == [f"<{signing.unsubscribe_url(SITE, tracking_id)}>"]
        assert relayed.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    switched_off = headers_of(copy_for(prepare(html_mail("<p>x</p>"))))
    assert switched_off.get_all("List-Unsubscribe") is None


def test_ours_names_the_list_it_leaves_signed() -> None:
    raw = html_mail('<a href="https://shop.example.com/">x</a>')
    copies = MessageCopies(
        raw,
        Part.parse(raw),
        OPTIONS,
        TrackingSwitches(unsubscribe_header=True),
        TrackSwitches(),
        list_name="Spring Sale & Co",
    )
    url = str(headers_of(copy_for(copies)).get("List-Unsubscribe")).strip("<>")
    assert url.startswith(f"{SITE}/track/unsubscribe/{IDS[0]}/?list=Spring%20Sale%20%26%20Co&sig=")
    query = parse_qs(urlsplit(url).query)
    verifier = signing.ClickVerifier(KEYS)
    assert signing.list_name_verified(verifier, IDS[0], "Spring Sale & Co", query["sig"][0])
    assert not signing.list_name_verified(verifier, IDS[1], "Spring Sale & Co", query["sig"][0])  # per copy
    assert not signing.list_name_verified(verifier, IDS[0], "Another list", query["sig"][0])
    # A list signature is no click signature: its "destination" is no web address.
    assert not verifier.verify(IDS[0], "Spring Sale & Co", query["sig"][0])


# -- DKIM --------------------------------------------------------------------------------


def test_resigned_single_part_mail_has_one_content_type() -> None:
    app_key, _ = rsa_key()
    our_key, our_public = rsa_key()
    raw = html_mail('<a href="https://shop.example.com/">x</a>')
    signed = (
        dkim.sign(
            raw, b"app", b"shop.example.com", app_key, include_headers=[b"from", b"subject", b"content-type"]
        )
        + raw
    )
    options = CopyOptions(SITE, KEYS, dkim_signer=DkimSigner(our_key, "mb", "shop.example.com"))
    copy = copy_for(prepare(signed, options))
    relayed = headers_of(copy)
    assert relayed.get_all("Content-Type") == ["text/html; charset=utf-8"]
    assert [str(s) for s in relayed.get_all("DKIM-Signature") or []] == [
        str(relayed["DKIM-Signature"])
    ] and "s=mb;" in str(relayed["DKIM-Signature"]).replace(" ", "")
    assert clicks(copy) == ["https://shop.example.com/"]
    assert dkim.verify(copy, dnsfunc=lambda name, timeout=5: f"v=DKIM1; k=rsa; p={our_public}".encode())


# -- large header blocks -----------------------------------------------------------------


def folded_header(lines: int) -> bytes:
    """One header field folded over ``lines`` continuation lines (about 17 bytes each)."""
    return b"X-Trace: start\r\n" + b"".join(b" hop-%010d\r\n" % i for i in range(lines))


def multipart_mail(extra_headers: bytes) -> bytes:
    return (
        b"From: news@shop.example.com\r\nTo: ann@example.com\r\nSubject: big\r\n" + extra_headers
        + b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        + b"--b1\r\nContent-Type: text/plain\r\n\r\nhello https://shop.example.com/\r\n"
        + b"--b1\r\nContent-Type: text/html\r\n" + extra_headers
        + b'\r\n<a href="https://shop.example.com/">x</a>\r\n--b1--\r\n'
    )  # fmt: skip


@pytest.mark.parametrize(
    "shape",
    [multipart_mail, lambda extra: html_mail('<a href="https://shop.example.com/">x</a>', extra.decode())],
)
def test_a_large_folded_header_survives_every_copy(shape: Callable[[bytes], bytes]) -> None:
    big = folded_header(50_000)  # about 850 KB in one field
    raw = shape(big)
    copies = prepare(raw, CopyOptions(SITE, KEYS, provider="mailgun"), unsubscribe_header=True)
    for tracking_id in IDS:
        copy = copy_for(copies, tracking_id)
        assert copy.count(big) == raw.count(big)  # byte for byte, once wherever it was
        assert clicks(copy, tracking_id) == ["https://shop.example.com/"]
        assert f"X-Mailbeacon-Tracking-ID: {tracking_id}\r\n".encode() in copy


def test_copies_do_not_scan_the_header_block_again(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned: list[int] = []
    header_lines = mime.header_lines

    def counting(block: bytes) -> list[bytes]:
        scanned.append(len(block))
        return header_lines(block)

    monkeypatch.setattr(mime, "header_lines", counting)
    big = folded_header(5_000)
    for raw in (multipart_mail(big), html_mail('<a href="https://shop.example.com/">x</a>', big.decode())):
        for provider in ("generic", "sendgrid", "mailgun", "ses", "postmark"):
            copies = prepare(raw, CopyOptions(SITE, KEYS, provider=provider), unsubscribe_header=True)
            copy_for(copies, IDS[0])  # the first copy may settle what all copies share
            scanned.clear()
            for tracking_id in IDS:
                copy_for(copies, tracking_id)
            assert [size for size in scanned if size > len(big)] == [], provider


def test_preparing_grows_linearly_with_the_header_block() -> None:
    """Eight times the header costs about eight times the work (64 times when quadratic)."""

    def cost(lines: int) -> float:
        raw = multipart_mail(folded_header(lines))
        best = float("inf")
        for _ in range(3):  # the least disturbed of three runs
            started = time.perf_counter()
            copies = prepare(raw, CopyOptions(SITE, KEYS, provider="sendgrid"), unsubscribe_header=True)
            for tracking_id in IDS:
                copy_for(copies, tracking_id)
            best = min(best, time.perf_counter() - started)
        return best

    small, large = cost(10_000), cost(80_000)
    assert large / small < 24, (small, large)
