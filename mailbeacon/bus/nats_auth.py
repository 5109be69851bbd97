"""NATS login and TLS from the settings, for both NATS clients of mailbeacon.

nats-py (every component, :func:`mailbeacon.bus.jetstream.connect`) takes them as connect
options; the aggregator's lean ingest connection (:mod:`aggregator.ingest.wire`) writes its own
``CONNECT`` with the fields :meth:`NatsLogin.connect_fields` gives, signing the server's nonce
for nkeys and JWTs the way nats-py does. Given as options rather than inside ``NATS_URL``, the
login applies to every server of a cluster, those learned from the first one included; a URL's
credentials name one server only (they still work, for that server).
"""

from __future__ import annotations

import base64
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from mailbeacon.contract.settings import Settings


def _creds_block(name: str) -> re.Pattern[str]:
    """The line after ``-----BEGIN <name>-----`` in a .creds file."""
    return re.compile(rf"-{{3,}}BEGIN {name}-{{3,}}\s*\n\s*(\S+)")


class NatsLoginError(ValueError):
    """A credentials file that cannot be used (unreadable, or not what it should hold)."""


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NatsLoginError(
            f"cannot read the NATS {what} {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from exc


def read_creds(path: Path) -> tuple[str, bytes]:
    """The user JWT and nkey seed of a ``.creds`` file (as ``nsc`` writes them)."""
    text = _read(path, "credentials file")
    jwt = _creds_block("NATS USER JWT").search(text)
    seed = _creds_block("USER NKEY SEED").search(text)
    if jwt is None or seed is None:
        raise NatsLoginError(f"{path} is not a NATS .creds file (no user JWT and nkey seed in it)")
    return jwt.group(1), seed.group(1).encode()


def sign_nonce(seed: bytes, nonce: str) -> str:
    """The server's nonce signed with an nkey seed, as nats-py sends it (base64)."""
    import nkeys  # the nkeys package, as nats-py uses it

    key = nkeys.from_seed(bytearray(seed))
    try:
        return base64.b64encode(key.sign(nonce.encode())).decode()
    finally:
        key.wipe()


def public_key(seed: bytes) -> str:
    import nkeys

    key = nkeys.from_seed(bytearray(seed))
    try:
        return str(key.public_key.decode())
    finally:
        key.wipe()


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


@dataclass(frozen=True)
class NatsLogin:
    """One way to log in (or none) and the TLS files; empty means plain and anonymous."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed_file: Path | None = None
    creds_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> NatsLogin:
        return cls(
            user=settings.nats.user,
            password=_secret(settings.nats.password),
            token=_secret(settings.nats.token),
            nkey_seed_file=settings.nats.nkey_seed_file,
            creds_file=settings.nats.creds_file,
            ca_file=settings.nats.ca_file,
            cert_file=settings.nats.tls_cert_file,
            key_file=settings.nats.tls_key_file,
        )

    @property
    def method(self) -> str:
        """For logs: how this login authenticates (never the credential)."""
        if self.user:
            return f"user {self.user}"
        if self.token:
            return "token"
        if self.nkey_seed_file:
            return "nkey"
        if self.creds_file:
            return "credentials file"
        return "no credentials"

    @property
    def tls_configured(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def ssl_context(self, *, required: bool = False) -> ssl.SSLContext | None:
        """The TLS context: our CA and client certificate; the system's CAs when the server
        requires TLS (``required``) and none is configured; None for plain connections."""
        if not (self.tls_configured or required):
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.cert_file and self.key_file:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise NatsLoginError(f"NATS TLS files: {exc}") from exc
        return context

    def nats_py_options(self) -> dict[str, Any]:
        """Keyword arguments of nats-py's ``Client.connect``."""
        options: dict[str, Any] = {}
        if self.user:
            options.update(user=self.user, password=self.password or "")
        elif self.token:
            options["token"] = self.token
        elif self.nkey_seed_file:
            options["nkeys_seed"] = str(self.nkey_seed_file)
        elif self.creds_file:
            options["user_credentials"] = str(self.creds_file)
        context = self.ssl_context()
        if context is not None:
            options["tls"] = context
        return options

    def connect_fields(self, nonce: str | None) -> dict[str, str]:
        """The authentication fields of a ``CONNECT`` answering an ``INFO`` with ``nonce``."""
        if self.user:
            return {"user": self.user, "pass": self.password or ""}
        if self.token:
            return {"auth_token": self.token}
        if self.nkey_seed_file or self.creds_file:
            if not nonce:
                raise NatsLoginError("the NATS server sent no nonce to sign: it does not take nkeys here")
            if self.creds_file:
                jwt, seed = read_creds(self.creds_file)
                return {"jwt": jwt, "sig": sign_nonce(seed, nonce)}
            assert self.nkey_seed_file is not None
            seed = _read(self.nkey_seed_file, "nkey seed file").strip().encode()
            return {"nkey": public_key(seed), "sig": sign_nonce(seed, nonce)}
        return {}
