"""Shapes of real mail the rewrite must respect: signed and encrypted mail (RFC 1847, S/MIME,
PGP/MIME), digests (RFC 2046 5.1.5), a text part's own last line break, empty text, and a
header block that strict readers end early. Copies are made as the proxy makes them
(:class:`MessageCopies`) and read back with Python's email package (``policy=default``)."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from mailbeacon.contract.campaigns import TrackingSwitches
from smtp_proxy.rewrite.copies import CopyOptions, MessageCopies
from smtp_proxy.rewrite.mime import Part
from smtp_proxy.rewrite.optout import TrackSwitches
from smtp_proxy.rewrite.submission import missing_headers

SITE = "https://t.example.test"
OPTIONS = CopyOptions(SITE, [b"shapes-key"])
TID = "33333333-3333-4333-8333-333333333333"
HEAD = b"From: news@shop.example.com\r\nTo: ann@example.com\r\nSubject: shapes\r\nMIME-Version: 1.0\r\n"
LINK = b'<html><body><a href="https://shop.example.com/sale">Sale</a></body></html>\r\n'


def copies_of(raw: bytes, **campaign: object) -> MessageCopies:
    return MessageCopies(raw, Part.parse(raw), OPTIONS, TrackingSwitches(**campaign), TrackSwitches())


def copy_of(raw: bytes, **campaign: object) -> bytes:
    copies = copies_of(raw, **campaign)
    copy = b"".join(bytes(piece) for piece in copies.content("ann@example.com", TID))
    assert copies.prepare_error is None and copies.render_error is None
    return copy


def read(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def is_tracked(copy: bytes) -> bool:
    return f"{SITE}/track/".encode() in body_of(copy)


# -- signed and encrypted mail -------------------------------------------------------------

PGP_SIGNED = HEAD + (
    b'Content-Type: multipart/signed; boundary="sig"; protocol="application/pgp-signature"; micalg=pgp-sha256\r\n'
    b"\r\n--sig\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + LINK
    + b"\r\n--sig\r\nContent-Type: application/pgp-signature; name=signature.asc\r\n\r\n"
    b"-----BEGIN PGP SIGNATURE-----\r\niQEzBAEBCAAdFiEE\r\n-----END PGP SIGNATURE-----\r\n\r\n--sig--\r\n"
)  # fmt: skip
SMIME_OPAQUE = HEAD + (
    b'Content-Type: application/pkcs7-mime; smime-type=signed-data; name="smime.p7m"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwGggCSABIIBNg==\r\n"
)
PGP_ENCRYPTED = HEAD + (
    b'Content-Type: multipart/encrypted; boundary="enc"; protocol="application/pgp-encrypted"\r\n\r\n'
    b"--enc\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
    b"--enc\r\nContent-Type: application/octet-stream\r\n\r\n-----BEGIN PGP MESSAGE-----\r\nhQEMA\r\n"
    b"-----END PGP MESSAGE-----\r\n--enc--\r\n"
)
# A list footer next to a signed part: RFC 1847 covers only the signed part, but the
# message was signed to be read as sent.
SIGNED_WITH_FOOTER = HEAD + (
    b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n--outer\r\n'
    + PGP_SIGNED[len(HEAD) :]
    + b"--outer\r\nContent-Type: text/html\r\n\r\n" + LINK + b"--outer--\r\n"
)  # fmt: skip
INLINE_PGP = HEAD + (
    b"Content-Type: text/plain\r\n\r\n-----BEGIN PGP SIGNED MESSAGE-----\r\nHash: SHA256\r\n\r\n"
    b"See https://shop.example.com/sale\r\n-----BEGIN PGP SIGNATURE-----\r\niQEz\r\n-----END PGP SIGNATURE-----\r\n"
)


@pytest.mark.parametrize(
    "raw",
    [PGP_SIGNED, SMIME_OPAQUE, PGP_ENCRYPTED, SIGNED_WITH_FOOTER, INLINE_PGP],
    ids=lambda r: str(len(r)),
)
def test_signed_and_encrypted_mail_keeps_its_body_byte_for_byte(raw: bytes) -> None:
    copies = copies_of(raw)
    assert copies.left_untracked_signed and not copies.left_untracked_for_dkim
    copy = copy_of(raw)
    assert body_of(copy) == body_of(raw)  # no pixel, no click link, no added alternative
    assert not is_tracked(copy)
    assert read(copy)["X-Mailbeacon-Tracking-ID"] == TID


def test_signed_mail_still_gets_the_header_fields_of_its_copy() -> None:
    # Only the signed part is signed: the top-level header block may carry the copy's fields.
    copy = copy_of(PGP_SIGNED, unsubscribe_header=True)
    message = read(copy)
    assert message["X-Mailbeacon-Tracking-ID"] == TID
    assert message["List-Unsubscribe"] == f"<{SITE}/track/unsubscribe/{TID}/>"
    assert body_of(copy) == body_of(PGP_SIGNED)


def test_unsigned_mail_is_tracked_as_before() -> None:
    unsigned = PGP_SIGNED.replace(b"multipart/signed", b"multipart/mixed").replace(
        b"application/pgp-signature; name", b"text/plain; name"
    )
    assert not copies_of(unsigned).left_untracked_signed
    assert is_tracked(copy_of(unsigned))


# -- digests -------------------------------------------------------------------------------

DIGEST = HEAD + (
    b"Content-Type: multipart/digest; boundary=D\r\n\r\n"
    b"--D\r\n\r\nFrom: a@example.com\r\nSubject: one\r\n\r\nsee https://shop.example.com/one\r\n"
    b"--D\r\n\r\nFrom: b@example.com\r\nSubject: two\r\n\r\nsee https://shop.example.com/two\r\n"
    b"--D--\r\n"
)


def test_digest_parts_without_a_content_type_are_messages_not_text() -> None:
    copy = copy_of(DIGEST)
    assert body_of(copy) == body_of(DIGEST)  # nothing to track: no text part to convert
    parts = list(read(copy).iter_parts())
    assert [p.get_content_type() for p in parts] == ["message/rfc822", "message/rfc822"]
    inner = parts[0].get_content()  # the encapsulated message, parsed
    assert isinstance(inner, EmailMessage)
    assert inner["Subject"] == "one" and inner.get_content() == "see https://shop.example.com/one"


def test_a_digest_part_that_says_text_plain_is_text() -> None:
    digest = DIGEST.replace(b"--D\r\n\r\nFrom: a@", b"--D\r\nContent-Type: text/plain\r\n\r\nFrom: a@")
    assert is_tracked(copy_of(digest))  # that part gets its HTML alternative


# -- text parts given an HTML alternative ----------------------------------------------------


@pytest.mark.parametrize("text", [b"Hello https://shop.example.com/\r\n", b"Hello\r\n\r\n\r\n", b"no break"])
def test_the_text_part_keeps_its_last_line_breaks(text: bytes) -> None:
    single = HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text
    nested = HEAD + (
        b"Content-Type: multipart/mixed; boundary=M\r\n\r\n--M\r\nContent-Type: text/plain\r\n\r\n"
        + text + b"\r\n--M\r\nContent-Type: image/gif\r\n\r\nR0lGODlh\r\n--M--\r\n"
    )  # fmt: skip
    for raw in (single, nested):
        copy = read(copy_of(raw))
        text_part = copy.get_body(("plain",))
        assert text_part is not None and copy.get_body(("html",)) is not None
        assert text_part.get_payload() == read(raw).get_body(("plain",)).get_payload()  # type: ignore[union-attr]


@pytest.mark.parametrize("body", [b"", b"\r\n", b" \r\n\t\r\n"])
def test_an_empty_text_body_gets_no_alternative_and_no_pixel(body: bytes) -> None:
    raw = HEAD + b"Content-Type: text/plain\r\n\r\n" + body
    copy = copy_of(raw)
    assert body_of(copy) == body and not is_tracked(copy)


def test_the_first_text_part_with_text_is_the_one_converted() -> None:
    raw = HEAD + (
        b"Content-Type: multipart/mixed; boundary=M\r\n\r\n--M\r\n\r\n\r\n--M\r\nContent-Type: text/plain\r\n\r\n"
        b"Hello https://shop.example.com/\r\n--M--\r\n"
    )
    copy = read(copy_of(raw))
    first, second = copy.iter_parts()
    assert first.get_content_type() == "text/plain" and first.get_payload() == ""
    assert second.get_content_type() == "multipart/alternative"


# -- header blocks a strict reader ends early -------------------------------------------------

STRICT_END = (
    b"Received: from a by b; Wed, 23 Feb 2005 17:51:49 -0500\r\n"
    b"quite Delivered-To: xxx@example.com\r\n"  # a space in the name: strict readers stop here
    b"From: news@shop.example.com\r\nSubject: early end\r\n\r\nHello https://shop.example.com/\r\n"
)


def test_what_the_proxy_adds_goes_before_the_line_strict_readers_stop_at() -> None:
    copy = copy_of(STRICT_END)
    head = copy.split(b"\r\n\r\n", 1)[0]
    assert head.index(b"X-Mailbeacon-Tracking-ID:") < head.index(b"quite Delivered-To:")
    assert head.index(b"Content-Type: multipart/alternative") < head.index(b"quite Delivered-To:")
    assert b"\r\nquite Delivered-To: xxx@example.com\r\nFrom: news@shop.example.com\r\n" in head
    message = read(copy)  # a strict reader: our fields are fields, the rest its preamble
    assert message["X-Mailbeacon-Tracking-ID"] == TID
    assert message.get_content_type() == "multipart/alternative"
    assert message.get_body(("plain",)).get_content() == "Hello https://shop.example.com/\r\n"  # type: ignore[union-attr]


def test_an_mbox_from_line_stays_first_and_gets_nothing_in_front() -> None:
    raw = b"From news@shop.example.com Mon May  2 16:07:05 2005\r\n" + STRICT_END.split(b"\r\n", 2)[2]
    copy = copy_of(raw)
    assert copy.startswith(b"From news@shop.example.com Mon May  2 16:07:05 2005\r\nFrom: news@")
    assert read(copy)["X-Mailbeacon-Tracking-ID"] == TID  # Python reads the line as the envelope
    assert missing_headers(raw, "news@shop.example.com", __import__("datetime").datetime.now()) == b""


def test_a_folded_line_first_leaves_the_message_alone() -> None:
    raw = b" folded: nothing to fold onto\r\nSubject: x\r\n\r\n" + LINK
    copies = copies_of(raw)
    assert copies.prepare_error is not None
    assert b"".join(bytes(p) for p in copies.content("ann@example.com", TID)) == raw
