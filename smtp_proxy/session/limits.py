"""SMTP session limits (docs/proxy.md "Limits"): sessions at once, and a tarpit for failed AUTH.

Plain policy; :class:`smtp_proxy.session.server.ProxySMTP` wires it to the sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, please try again later"
TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many failed authentication attempts, closing connection"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
# However many failures: a client waiting longer than this would time out rather than learn.
MAX_AUTH_DELAY_SECONDS = 30.0


class SessionCap:
    """Counts the SMTP sessions of one process against ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def enter(self) -> bool:
        """Take a place for a new session; False (and nothing taken) when all are taken."""
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1


@dataclass(frozen=True)
class AuthTarpit:
    """How a session's failed AUTH attempts are answered: each after a delay that doubles
    from ``first_delay`` (1, 2, 4 s ...), and the ``max_failures``-th with 421 and a hang-up.
    A successful AUTH is answered at once."""

    first_delay: float = 1.0
    max_failures: int = 3

    def delay(self, failures: int) -> float:
        """Seconds before the answer to the session's ``failures``-th failed attempt."""
        return min(self.first_delay * 2.0 ** max(failures - 1, 0), MAX_AUTH_DELAY_SECONDS)

    def ends_session(self, failures: int) -> bool:
        return failures >= self.max_failures

    def answer(self, failures: int) -> str:
        return TOO_MANY_AUTH_FAILURES if self.ends_session(failures) else AUTH_INVALID
