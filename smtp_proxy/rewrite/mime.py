"""Byte-preserving MIME structure: split, walk and splice messages without re-serialising them.

Python's email package re-folds headers and re-encodes parts when it writes a message
back, which would alter attachments and break signatures. Here a message is cut into
header block, body and multipart segments at the exact byte offsets, so any part that
is not changed is copied through untouched. Bodies are ``memoryview`` slices of the
received message: a 25 MB attachment is never copied while the message is split.
"""

from __future__ import annotations

import base64
import binascii
import email
import re
from dataclasses import dataclass
from email.message import Message
from email.policy import compat32
from functools import cached_property

Buffer = bytes | memoryview

_HEADER_END = re.compile(rb"\r?\n\r?\n")


_CONTENT_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


@dataclass
class Part:
    headers: bytes  # the header block, each line with its own line ending
    separator: bytes  # the blank line between headers and body
    body: memoryview
    # The type without a Content-Type field: message/rfc822 in a multipart/digest (RFC 2046 5.1.5).
    default_type: str = "text/plain"

    @classmethod
    def parse(cls, raw: Buffer, default_type: str = "text/plain") -> Part:
        view = memoryview(raw)
        head = bytes(view[:2])
        if head == b"\r\n" or head[:1] == b"\n":
            eol = b"\r\n" if head == b"\r\n" else b"\n"
            return cls(b"", eol, view[len(eol) :], default_type)
        match = _HEADER_END.search(view)
        if match is None:
            return cls(bytes(view), b"", view[len(view) :], default_type)
        start = match.start()
        first_eol = 2 if view[start] == 13 else 1
        headers = bytes(view[: start + first_eol])
        separator = bytes(view[start + first_eol : match.end()])
        return cls(headers, separator, view[match.end() :], default_type)

    @cached_property
    def parsed(self) -> Message:
        """All header fields, parsed by the email package (only where they are all needed)."""
        return email.message_from_bytes(self.headers, policy=compat32)

    @cached_property
    def _content_fields(self) -> dict[str, str]:
        # Walking every part needs just these three fields; reading them directly is
        # several times faster than a full header parse per part.
        found: dict[str, str] = {}
        for field in header_lines(self.headers):
            name = field_name(field)
            if name in _CONTENT_FIELDS and name not in found:
                found[name] = field_value(field)
        return found

    @cached_property
    def _params(self) -> dict[str, str] | None:
        """Content-Type parameters, or None when they need RFC 2231 decoding."""
        params: dict[str, str] = {}
        for match in _PARAM.finditer(self._content_fields.get("content-type", "")):
            key, value = match.group(1).lower(), match.group(2).strip()
            if key.endswith("*") or "=?" in value:
                return None
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params.setdefault(key, value)
        return params

    def to_bytes(self) -> bytes:
        return self.headers + self.separator + bytes(self.body)

    @property
    def eol(self) -> bytes:
        sample = self.separator or self.headers[:2000]
        return b"\r\n" if b"\r\n" in sample or not sample else b"\n"

    @property
    def content_type(self) -> str:
        value = self._content_fields.get("content-type")
        if value is None:
            return self.default_type
        content_type = value.split(";", 1)[0].strip().lower()
        return content_type if content_type.count("/") == 1 else "text/plain"  # RFC 2045 5.2

    @property
    def is_attachment(self) -> bool:
        disposition = self._content_fields.get("content-disposition", "")
        return disposition.split(";")[0].strip().lower() == "attachment"

    @property
    def transfer_encoding(self) -> str:
        return self._content_fields.get("content-transfer-encoding", "7bit").strip().lower() or "7bit"

    @property
    def charset(self) -> str:
        params = self._params
        charset = self.parsed.get_content_charset() if params is None else params.get("charset", "").lower()
        return str(charset or "us-ascii")

    @property
    def boundary(self) -> bytes | None:
        params = self._params
        value = self.parsed.get_boundary() if params is None else params.get("boundary", "").rstrip()
        return value.encode("ascii", "surrogateescape") if value else None


def header_lines(block: bytes) -> list[bytes]:
    """Header fields with their folded continuation lines kept together.

    Each field is one slice of the block, cut once its last continuation line is known:
    growing a field line by line would copy it again for every line, which turns a
    header folded over many thousand lines into seconds of work on the event loop.
    """
    fields: list[bytes] = []
    start = position = 0
    for line in block.splitlines(keepends=True):
        if position and line[:1] not in (b" ", b"\t"):
            fields.append(block[start:position])
            start = position
        position += len(line)
    if position > start:
        fields.append(block[start:position])
    return fields


# A field as RFC 5322 writes it: printable ASCII but the colon, then the colon. Strict
# readers (Python's email among them) take the first line that is not one (nor folded
# onto one) for the start of the body.
_STRICT_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def mbox_line(fields: list[bytes]) -> int:
    """1 when the block starts with an mbox "From " line (readers take it for the envelope,
    as Python's and Ruby's do, and it stays where it is), else 0."""
    return 1 if fields and fields[0].startswith(b"From ") else 0


def strict_end(fields: list[bytes]) -> int | None:
    """The index of the first field a strict reader would not read as one, or None."""
    for index in range(mbox_line(fields), len(fields)):
        if not _STRICT_FIELD.match(fields[index]):
            return index
    return None


def split_at_strict_end(block: bytes) -> tuple[bytes, bytes]:
    """The header block cut where a strict reader's header block ends (the rest may be b"")."""
    fields = header_lines(block)
    end = strict_end(fields)
    if end is None:
        return block, b""
    cut = sum(map(len, fields[:end]))
    return block[:cut], block[cut:]


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def field_value(field: bytes) -> str:
    """The unfolded value of one header field."""
    value = field.split(b":", 1)[1] if b":" in field else b""
    return re.sub(rb"\r?\n[ \t]", b" ", value).strip().decode("utf-8", "surrogateescape")


def remove_headers(
    block: bytes, should_remove: set[str], prefixes: tuple[str, ...] = (), keep: frozenset[str] = frozenset()
) -> bytes:
    kept = []
    for field in header_lines(block):
        name = field_name(field)
        if name not in keep and (name in should_remove or (prefixes and name.startswith(prefixes))):
            continue
        kept.append(field)
    return b"".join(kept)


def set_header(block: bytes, name: str, value: str, eol: bytes) -> bytes:
    """Replace (or add) one header field, leaving every other field byte-for-byte."""
    line = f"{name}: {value}".encode() + eol
    return remove_headers(block, {name.lower()}) + line


_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*\r?(?:\n|\Z)")


def split_multipart(body: Buffer, boundary: bytes) -> list[tuple[bool, memoryview]]:
    """Segments of a multipart body as ``(is_part, bytes)``; joining them gives ``body`` back.

    Delimiter lines (with the line break before them, which RFC 2046 counts as part of
    the delimiter), preamble and epilogue are non-part segments.
    """
    view = memoryview(body)
    # A pure literal lets the regex engine skip through large parts at memchr speed;
    # whether a hit is a whole delimiter line is checked after.
    needle = re.compile(re.escape(b"--" + boundary))
    segments: list[tuple[bool, memoryview]] = []
    position = 0
    inside = False
    for hit in needle.finditer(view):
        start = hit.start()
        if start > 0 and view[start - 1] != 10:  # not at the start of a line
            continue
        tail = _DELIMITER_TAIL.match(view, hit.end())
        if tail is None:
            continue
        before = bytes(view[max(start - 2, 0) : start])
        if before == b"\r\n":
            content_end = start - 2
        elif before.endswith(b"\n"):
            content_end = start - 1
        else:
            content_end = start
        content_end = max(content_end, position)
        segments.append((inside, view[position:content_end]))
        segments.append((False, view[content_end : tail.end()]))
        position = tail.end()
        if tail.group(1):  # the closing delimiter: the rest is epilogue
            inside = False
            break
        inside = True
    segments.append((inside, view[position:]))
    return [segment for segment in segments if len(segment[1]) or segment[0]]


def decode_body(part: Part) -> bytes:
    encoding = part.transfer_encoding
    if encoding == "base64":
        data = b"".join(map(_base64_alphabet_only, _runs(part.body)))  # line breaks, padding, junk
        if len(data) % 4 == 1:
            data = data[:-1]  # a lone trailing character carries no whole byte
        return base64.b64decode(data + b"=" * (-len(data) % 4))
    if encoding == "quoted-printable":
        return binascii.a2b_qp(bytes(part.body))
    return bytes(part.body)


def _wrap(data: bytes, width: int, eol: bytes) -> bytes:
    return eol.join(data[i : i + width] for i in range(0, len(data), width)) + (eol if data else b"")


def encode_body(data: bytes, encoding: str, eol: bytes) -> bytes:
    if encoding == "base64":
        return _wrap(base64.b64encode(data), 76, eol)
    if encoding == "quoted-printable":
        runs = _line_runs(data)
        return b"".join(_quoted_printable(run, eol, i < len(runs) - 1) for i, run in enumerate(runs))
    return data


# Each of these C calls holds the GIL from start to end (binascii.b2a_qp: ~8 ms per MB),
# so a rewrite running in a worker thread would stop the proxy's event loop for as long:
# large bodies go through them in runs of about a megabyte (docs/proxy.md "Limits").
_RUN = 1 << 20
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def _runs(data: Buffer) -> list[memoryview]:
    view = memoryview(data)
    return [view[start : start + _RUN] for start in range(0, len(view), _RUN)]


def _base64_alphabet_only(run: Buffer) -> bytes:
    return _NOT_BASE64.sub(b"", run)


def _line_runs(data: bytes) -> list[bytes]:
    """``data`` in runs of about ``_RUN`` bytes, each ending after a line break where there
    is one (a line longer than a run is cut, never between CR and LF)."""
    runs: list[bytes] = []
    start = 0
    while len(data) - start > _RUN:
        end = data.rfind(b"\n", start, start + _RUN) + 1
        if end <= start:
            end = start + _RUN - (data[start + _RUN - 1] == 13)  # keep a CR with its LF
        runs.append(data[start:end])
        start = end
    runs.append(data[start:])
    return runs


def _quoted_printable(run: bytes, eol: bytes, more: bool) -> bytes:
    encoded = binascii.b2a_qp(run.replace(b"\r\n", b"\n"), istext=True)
    if more and run[-1:] != b"\n":
        encoded += b"=\n"  # the run ends inside a line: a soft line break joins it to the next
    return encoded.replace(b"\n", eol) if eol != b"\n" else encoded


def longest_line(data: bytes) -> int:
    return max((len(line) for line in data.splitlines()), default=0)
