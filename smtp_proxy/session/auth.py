"""Who may relay through the proxy: allowed networks and SMTP AUTH credentials.

The proxy must never be an open relay. A client relays when it authenticated, or when
its address is in ``SMTP_RELAY_NETWORKS`` (loopback by default: the app in the same pod
or on the same host). AUTH is offered over STARTTLS, or in clear only to clients in
``SMTP_AUTH_NETWORKS``, so passwords never cross a network in the open.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailbeacon.contract.netaddr import normalize_ip
from smtp_proxy import metrics

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Networks:
    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: list[IPNetwork] = [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs]

    def __contains__(self, peer: object) -> bool:
        host = peer[0] if isinstance(peer, tuple) and peer else peer
        if not isinstance(host, str):
            return False
        address = normalize_ip(host)
        return address is not None and any(address in network for network in self.networks)


class CredentialsError(ValueError):
    pass


class Credentials:
    """``username:password`` pairs, from a file (one per line) and/or a secret setting."""

    def __init__(self, pairs: dict[str, str]) -> None:
        self._pairs = pairs

    @classmethod
    def load(cls, path: Path | None, inline: str | None) -> Credentials:
        pairs: dict[str, str] = {}
        sources: list[tuple[str, list[str]]] = []
        if path is not None:
            try:
                sources.append((str(path), path.read_text(encoding="utf-8").splitlines()))
            except OSError as exc:
                raise CredentialsError(f"cannot read SMTP credentials {path}: {exc.strerror}") from exc
        if inline:
            sources.append(("MAILBEACON_SMTP_AUTH_USERS", inline.replace(",", "\n").splitlines()))
        for source, lines in sources:
            for number, line in enumerate(lines, start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, password = line.partition(":")
                if not sep or not user or not password:
                    raise CredentialsError(f"{source}:{number}: expected username:password")
                pairs[user] = password
        return cls(pairs)

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def check(self, username: str, password: str) -> bool:
        expected = self._pairs.get(username)
        # Compare even for unknown users so timing does not tell which usernames exist.
        ok = hmac.compare_digest((expected or "\0").encode(), password.encode())
        return expected is not None and ok


class Authenticator:
    """aiosmtpd's ``authenticator`` for AUTH PLAIN and LOGIN."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        username = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if self.credentials.check(username, password):
            metrics.AUTH.labels("success").inc()
            # handled=False with auth_data, or aiosmtpd leaves session.auth_data empty.
            return AuthResult(success=True, handled=False, auth_data=username)
        metrics.AUTH.labels("failure").inc()
        log.warning("SMTP AUTH failed for %r from %s", username, session.peer)
        return AuthResult(success=False, handled=False)
