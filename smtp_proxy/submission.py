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

from smtp_proxy.mime import Buffer

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DATE = re.compile(rb"^date[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DKIM = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def message_id_domain(envelope_sender: str) -> str:
    """The sender's domain, when it is one a Message-ID may carry."""
    domain = envelope_sender.rpartition("@")[2].strip("<> ")
    return domain.lower() if "." in domain and _DOMAIN.match(domain) else "mailbeacon.invalid"


def complete_headers(raw: Buffer, envelope_sender: str, now: datetime) -> Buffer:
    """``raw`` with ``Message-ID`` and ``Date`` added in front when it has none.

    A DKIM-signed message is left exactly as it is: a signature may cover a header by
    its absence, and adding one would break it. So is one whose header block never ends
    (it is relayed unchanged, as unparsable). The common case (both present) costs a
    scan of the header block and no copy.
    """
    end = _HEADER_END.search(raw)
    if end is None:
        return raw  # no header block ends: not a message we can say anything about
    head = bytes(raw[: end.end()])
    if _DKIM.search(head):
        return raw
    has_id, has_date = _MESSAGE_ID.search(head), _DATE.search(head)
    if has_id and has_date:
        return raw
    eol = b"\r\n" if b"\r\n" in head else b"\n"
    added = b""
    if not has_id:
        added += b"Message-ID: " + make_msgid(domain=message_id_domain(envelope_sender)).encode() + eol
    if not has_date:
        added += b"Date: " + format_datetime(now).encode() + eol
    return added + bytes(raw)
