"""What aiosmtpd's session log (logger ``mail.log``) may say about a client.

aiosmtpd logs every command line and every sender and recipient address at INFO, and,
at DEBUG, parts of the AUTH exchange (a credential that is not valid base64 verbatim).
The proxy keeps that logger at WARNING unless the process runs at DEBUG, so addresses
stay out of ordinary logs, and filters it at every level so that credentials never
reach a log: nothing said during an AUTH exchange keeps its text, and a line that is not
an SMTP command (a credential sent out of turn, say) is withheld.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

SESSION_LOGGER = "mail.log"
WITHHELD = "<withheld>"

# Each SMTP session runs in its own task, so this is set only for the one in AUTH.
_IN_AUTH: ContextVar[bool] = ContextVar("mailbeacon_smtp_auth", default=False)
_VERBS = frozenset(
    {
        "HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
        "HELP", "STARTTLS", "AUTH", "ETRN", "ATRN", "TURN", "XCLIENT", "XFORWARD", "SEND", "SOML",
        "SAML", "VERB", "ONEX", "PROXY",
    }
)  # fmt: skip
# aiosmtpd's records that carry a line the client sent, and its replies that echo one.
_CLIENT_LINES = frozenset({"%r >> %r", "_handle_client readline: %r", "%r unrecognised: %s"})
_REPLY = "%r << %r"
_ECHOED_COMMAND = re.compile(rb'(command ")([^"]*)(")')


@contextmanager
def auth_exchange() -> Iterator[None]:
    token = _IN_AUTH.set(True)
    try:
        yield
    finally:
        _IN_AUTH.reset(token)


def _command_only(value: str | bytes) -> str | bytes:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    words = text.split()
    verb = words[0].upper() if words else ""
    if verb not in _VERBS:
        return WITHHELD
    if verb == "AUTH" and len(words) > 2:
        return f"{words[0]} {words[1]} {WITHHELD}"  # the initial response is a credential
    return value


class WithholdCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            if _IN_AUTH.get():
                record.args = tuple(WITHHELD if isinstance(a, (str, bytes)) else a for a in args)
            elif record.msg in _CLIENT_LINES:
                record.args = tuple(_command_only(a) if isinstance(a, (str, bytes)) else a for a in args)
            elif record.msg == _REPLY:
                record.args = tuple(
                    _ECHOED_COMMAND.sub(_echo, a) if isinstance(a, bytes) else a for a in args
                )
        return True


def _echo(match: re.Match[bytes]) -> bytes:
    """``500 Error: command "X" not recognized`` names what the client sent: maybe not a command."""
    command = _command_only(match.group(2))
    shown = command.encode() if isinstance(command, str) else command
    return match.group(1) + shown + match.group(3)


def configure_session_log(level: str) -> None:
    """Quiet and credential-free aiosmtpd logging; ``level`` is the process's log level."""
    logger = logging.getLogger(SESSION_LOGGER)
    if not any(isinstance(f, WithholdCredentials) for f in logger.filters):
        logger.addFilter(WithholdCredentials())
    logger.setLevel(logging.DEBUG if level.strip().upper() == "DEBUG" else logging.WARNING)
