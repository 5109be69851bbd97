"""DATA from apps: the message as read from the socket, line endings normalised, dots unstuffed.

Apps send what their libraries write: Python's ``smtplib.sendmail(..., msg.as_bytes())``
sends LF-only lines, and so do other clients. Lines may end in CRLF or in a bare LF, which
becomes CRLF (Postfix 3.9's ``smtpd_forbid_bare_newline = normalize``). A bare CR is text,
as Postfix keeps it: it never ends a line. Only ``CRLF . CRLF`` ends DATA; a lone dot
after or before a bare LF is a line of the message, so no client can end a message where
a stricter server downstream would not (SMTP smuggling). The line limit counts each line
as normalised, without its line break.

Pure: :meth:`DataReader.feed` takes the bytes one socket read gave and returns what they
add to the message; the server only moves bytes.
"""

from __future__ import annotations

import itertools
import re

_BARE_LF = re.compile(rb"(?<!\r)\n")
_STUFFED_DOT = re.compile(rb"(?:^|(?<=\r\n))\.")


class DataReader:
    """One DATA transfer between socket reads.

    ``max_line`` is the longest line accepted, without its line break; ``max_size`` the
    largest message (counted with CRLF line endings, as RFC 1870 counts it), 0 for none.
    Once either is passed, the rest is read and dropped: RFC 5321 4.2.5 answers only
    after the whole message.
    """

    def __init__(self, max_line: int, max_size: int = 0) -> None:
        self.max_line = max_line
        # A run of 2 * step - 1 bytes without a LF holds a whole window [k * step, (k + 1) * step):
        # a line that may be too long is found with one memchr per window, not a split per line.
        self._step = (max_line + 2) // 2
        self.max_size = max_size
        self.size = 0
        self.too_long = False
        self.too_much = False
        self._window = b""  # the start of a line not yet complete
        # Whether the window starts right after a CRLF (DATA's own line counts): only
        # there can a dot line end the message.
        self._after_crlf = True

    @property
    def refused(self) -> bool:
        return self.too_long or self.too_much

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """The message bytes ``chunk`` completes, and, once DATA ended, what came after it.

        The second value is None while DATA goes on; at its end it is whatever the client
        sent ahead of our reply (pipelining), for the command reader. Nothing is returned
        for the message once it is refused.
        """
        data = self._window + chunk
        # One scan finds the first dot that starts a line after a CRLF: without one there
        # is neither an end nor a doubled dot (after a CRLF) to look for.
        dot = data.find(b"\r\n.")
        if self._after_crlf and data.startswith(b".\r\n"):
            end, rest = 0, 3
        elif dot < 0:
            end = rest = -1
        else:
            found = data.find(b"\r\n.\r\n", dot)
            end, rest = (found + 2, found + 5) if found >= 0 else (-1, -1)
        after: bytes | None = None
        if end >= 0:
            lines, self._window, after = data[:end], b"", data[rest:]
        else:
            cut = data.rfind(b"\n") + 1
            lines, self._window = data[:cut], data[cut:]
            if cut:
                self._after_crlf = data[cut - 2 : cut] == b"\r\n" if cut > 1 else False
            if len(self._window) > self.max_line + 1:  # +1: a CR that a LF may follow
                # An overlong line: keep only its last byte (the CR of a CRLF the next
                # read may complete), never a line start the terminator could follow.
                self.too_long, self._after_crlf, self._window = True, False, self._window[-1:]
        if self.refused or not lines:
            return b"", after
        return self._complete(lines, lines[:1] == b"." or 0 <= dot < len(lines) - 2), after

    def _complete(self, lines: bytes, dotted: bool) -> bytes:
        """Whole lines: normalised, checked and unstuffed (b"" once the message is refused).

        ``dotted``: whether a line after a CRLF (or the first) starts with a dot.
        """
        crlf = lines.count(b"\r\n")
        if lines.count(b"\n") != crlf:
            # LF only (smtplib sending as_bytes()) is a plain replace; a mix needs the regex.
            lines = lines.replace(b"\n", b"\r\n") if crlf == 0 else _BARE_LF.sub(b"\r\n", lines)
            dotted = lines.startswith(b".") or b"\r\n." in lines
        if self._may_be_too_long(lines) and max(map(len, lines.split(b"\r\n"))) > self.max_line:
            self.too_long = True
            return b""
        if self.max_size and self.size + len(lines) > self.max_size:
            self.too_much = True
            return b""
        if dotted:  # RFC 5321 4.5.2: a leading dot was doubled by the client
            lines = _STUFFED_DOT.sub(b"", lines)
        self.size += len(lines)
        return lines

    def _may_be_too_long(self, lines: bytes) -> bool:
        """Whether some window of ``lines`` holds no LF (then a line may be too long)."""
        size, step = len(lines), self._step
        if size <= self.max_line:
            return False
        windows = map(
            lines.find, itertools.repeat(b"\n"), range(0, size, step), range(step, size + step, step)
        )
        return -1 in windows
