"""What a submission server adds to a message that lacks it (RFC 6409 8.2 and 8.3).

Apps that build mail by hand often leave out ``Message-ID`` and ``Date``. Without a
Message-ID the ``sent`` event has nothing to correlate the copy with the upstream's logs
or a bounce, and mailbox providers score such mail as spammy; without a Date the
recipient's client sorts it by arrival, if it shows it at all.
"""

from __future__ import annotations

import re
from datetime import datetime
from email.utils import format_datetime, make_msgid

from smtp_proxy.rewrite.mime import Buffer

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DATE = re.compile(rb"^date[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DKIM = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def message_id_domain(envelope_sender: str) -> str:
    """The sender's domain, when it is one a Message-ID may carry."""
    domain = envelope_sender.rpartition("@")[2].strip("<> ")
    return domain.lower() if "." in domain and _DOMAIN.match(domain) else "mailbeacon.invalid"


def missing_headers(raw: Buffer, envelope_sender: str, now: datetime) -> bytes:
    """The ``Message-ID`` and ``Date`` lines ``raw`` lacks, to go in front of each copy's headers.

    Returned as a piece of their own rather than a new message: a 25 MB message is not
    copied for two header lines. Nothing for a DKIM-signed message (a signature may cover
    a header by its absence, and adding one would break it), for one whose header block
    never ends (it is relayed unchanged, as unparsable), nor for one that starts with an
    mbox "From " line.
    """
    end = _HEADER_END.search(raw)
    if end is None or raw[:5] == b"From ":
        # No header block, or an mbox "From " line first: a line in front of that one
        # would make strict readers start the body there.
        return b""
    head = bytes(raw[: end.end()])
    if _DKIM.search(head):
        return b""
    eol = b"\r\n" if b"\r\n" in head else b"\n"
    added = b""
    if not _MESSAGE_ID.search(head):
        added += b"Message-ID: " + make_msgid(domain=message_id_domain(envelope_sender)).encode() + eol
    if not _DATE.search(head):
        added += b"Date: " + format_datetime(now).encode() + eol
    return added


def added_message_id(added: bytes) -> str | None:
    """The Message-ID among the lines :func:`missing_headers` made, if it made one."""
    for line in added.splitlines():
        if line.startswith(b"Message-ID: "):
            return line[12:].decode()
    return None
