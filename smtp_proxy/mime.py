"""Byte-preserving MIME structure: split, walk and splice messages without re-serialising them.

Python's email package re-folds headers and re-encodes parts when it writes a message
back, which would alter attachments and break signatures. Here a message is cut into
header block, body and multipart segments at the exact byte offsets, so any part that
is not changed is copied through untouched.
"""

from __future__ import annotations

import base64
import binascii
import email
import re
from dataclasses import dataclass
from email.message import Message
from email.policy import compat32

_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class Part:
    headers: bytes  # the header block, each line with its own line ending
    separator: bytes  # the blank line between headers and body
    body: bytes
    parsed: Message  # headers only, for reading content type and parameters

    @classmethod
    def parse(cls, raw: bytes) -> Part:
        if raw.startswith(b"\r\n") or raw.startswith(b"\n"):
            eol = b"\r\n" if raw.startswith(b"\r\n") else b"\n"
            headers, separator, body = b"", eol, raw[len(eol) :]
        else:
            match = _HEADER_END.search(raw)
            if match is None:
                headers, separator, body = raw, b"", b""
            else:
                first_eol = raw[match.start() : match.start() + (2 if raw[match.start()] == 13 else 1)]
                headers = raw[: match.start() + len(first_eol)]
                separator = raw[match.start() + len(first_eol) : match.end()]
                body = raw[match.end() :]
        parsed = email.message_from_bytes(headers, policy=compat32)
        return cls(headers, separator, body, parsed)

    def to_bytes(self) -> bytes:
        return self.headers + self.separator + self.body

    @property
    def eol(self) -> bytes:
        return b"\r\n" if b"\r\n" in (self.separator or self.headers[:2000] or b"\r\n") else b"\n"

    @property
    def content_type(self) -> str:
        return self.parsed.get_content_type()

    @property
    def is_attachment(self) -> bool:
        disposition = str(self.parsed.get("Content-Disposition", "")).split(";")[0].strip().lower()
        return disposition == "attachment"

    @property
    def transfer_encoding(self) -> str:
        return str(self.parsed.get("Content-Transfer-Encoding", "7bit")).strip().lower()

    @property
    def charset(self) -> str:
        return str(self.parsed.get_content_charset() or "us-ascii")

    @property
    def boundary(self) -> bytes | None:
        value = self.parsed.get_boundary()
        return value.encode("ascii", "surrogateescape") if value else None


def header_lines(block: bytes) -> list[bytes]:
    """Header fields with their folded continuation lines kept together."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def remove_headers(block: bytes, should_remove: set[str], prefixes: tuple[str, ...] = ()) -> bytes:
    kept = []
    for field in header_lines(block):
        name = field_name(field)
        if name in should_remove or (prefixes and name.startswith(prefixes)):
            continue
        kept.append(field)
    return b"".join(kept)


def set_header(block: bytes, name: str, value: str, eol: bytes) -> bytes:
    """Replace (or add) one header field, leaving every other field byte-for-byte."""
    line = f"{name}: {value}".encode() + eol
    return remove_headers(block, {name.lower()}) + line


def split_multipart(body: bytes, boundary: bytes) -> list[tuple[bool, bytes]]:
    """Segments of a multipart body as ``(is_part, bytes)``; joining them gives ``body`` back.

    Delimiter lines (with the line break before them, which RFC 2046 counts as part of
    the delimiter), preamble and epilogue are non-part segments.
    """
    delimiter = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.MULTILINE)
    segments: list[tuple[bool, bytes]] = []
    position = 0
    inside = False
    for match in delimiter.finditer(body):
        start = match.start()
        if body[max(start - 2, 0) : start] == b"\r\n":
            content_end = start - 2
        elif body[max(start - 1, 0) : start] == b"\n":
            content_end = start - 1
        else:
            content_end = start
        content_end = max(content_end, position)
        segments.append((inside, body[position:content_end]))
        line_end = match.end() + (1 if body[match.end() : match.end() + 1] == b"\n" else 0)
        segments.append((False, body[content_end:line_end]))
        position = line_end
        if match.group(1):  # the closing delimiter: the rest is epilogue
            inside = False
            break
        inside = True
    segments.append((inside, body[position:]))
    return [segment for segment in segments if segment[1] or segment[0]]


def decode_body(part: Part) -> bytes:
    encoding = part.transfer_encoding
    if encoding == "base64":
        data = re.sub(rb"[^A-Za-z0-9+/]", b"", part.body)  # line breaks, padding, junk
        if len(data) % 4 == 1:
            data = data[:-1]  # a lone trailing character carries no whole byte
        return base64.b64decode(data + b"=" * (-len(data) % 4))
    if encoding == "quoted-printable":
        return binascii.a2b_qp(part.body)
    return part.body


def _wrap(data: bytes, width: int, eol: bytes) -> bytes:
    return eol.join(data[i : i + width] for i in range(0, len(data), width)) + (eol if data else b"")


def encode_body(data: bytes, encoding: str, eol: bytes) -> bytes:
    if encoding == "base64":
        return _wrap(base64.b64encode(data), 76, eol)
    if encoding == "quoted-printable":
        normalised = data.replace(b"\r\n", b"\n")
        encoded = binascii.b2a_qp(normalised, istext=True)
        return encoded.replace(b"\n", eol) if eol != b"\n" else encoded
    return data


def longest_line(data: bytes) -> int:
    return max((len(line) for line in data.splitlines()), default=0)
