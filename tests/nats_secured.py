"""Real nats-server processes that want a login or TLS, for tests: user and password, a token,
nkeys, TLS with a client certificate (a test CA made with ``cryptography``), and operator (JWT)
mode with a ``.creds`` file (operator, account and user JWTs made with ``nkeys``).

Each server listens on 127.0.0.1 with JetStream; :func:`secured_nats` starts it and stops it by
its PID.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailbeacon.app.embedded_nats import nats_server_binary
from tests.support import free_port

MODES = ("user-password", "token", "nkey", "tls", "creds")
PASSWORD = "s3cret-nats-password"
TOKEN = "nats-token-0123456789abcdef"


@dataclass
class Secured:
    """A running secured server: its URL and the settings a component needs to log in."""

    url: str
    settings: dict[str, Any]
    port: int
    files: dict[str, Path] = field(default_factory=dict)


# --- a test PKI ---------------------------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("mailbeacon test CA"))
        .issuer_name(_name("mailbeacon test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": directory / "ca.crt"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage, names in (
        (
            "server",
            x509.ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        ),
        ("client", x509.ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("mailbeacon-client")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"mailbeacon test {role}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        files[f"{role}_cert"] = directory / f"{role}.crt"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"] = _write_key(key, directory / f"{role}.key")
    return files


# --- nkeys and JWTs (operator mode) -------------------------------------------------------------


def new_seed(prefix: int) -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), prefix))


def public(seed: bytes) -> str:
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(subject: str, name: str, nats: dict[str, Any], signer_seed: bytes) -> str:
    """A NATS JWT (v2, ed25519-nkey) for ``subject`` issued by the signer's public key."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": public(signer_seed),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    )
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = nkeys.from_seed(bytearray(signer_seed)).sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(signature)}"


_UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def creds_file(jwt: str, seed: bytes, path: Path) -> Path:
    """A ``.creds`` file laid out as ``nsc`` writes it."""
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
    return path


def operator_mode(directory: Path) -> tuple[str, Path]:
    """Server configuration lines for operator mode, and the user's .creds file."""
    operator = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    system = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_seed(nkeys.PREFIX_BYTE_USER)
    operator_jwt = encode_jwt(
        public(operator), "test-operator", {"type": "operator", "system_account": public(system)}, operator
    )
    account_jwt = encode_jwt(
        public(account),
        "MAILBEACON",
        {
            "type": "account",
            "limits": {**_UNLIMITED, **_JETSTREAM},
            "default_permissions": {"pub": {}, "sub": {}},
        },
        operator,
    )
    system_jwt = encode_jwt(
        public(system),
        "SYS",
        {"type": "account", "limits": _UNLIMITED, "default_permissions": {"pub": {}, "sub": {}}},
        operator,
    )
    user_jwt = encode_jwt(
        public(user),
        "mailbeacon",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        account,
    )
    (directory / "operator.jwt").write_text(operator_jwt)
    config = (
        f'operator: "{directory / "operator.jwt"}"\n'
        f"system_account: {public(system)}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n  {public(account)}: {account_jwt}\n  {public(system)}: {system_jwt}\n}}\n"
    )
    return config, creds_file(user_jwt, user, directory / "user.creds")


# --- the server ---------------------------------------------------------------------------------


def _configure(mode: str, directory: Path) -> tuple[str, dict[str, Any], dict[str, Path]]:
    """Configuration lines of the server and the login settings of its clients."""
    if mode == "user-password":
        return (
            f'authorization {{ users = [ {{user: "mailbeacon", password: "{PASSWORD}"}} ] }}\n',
            {"nats_user": "mailbeacon", "nats_password": PASSWORD},
            {},
        )
    if mode == "token":
        return f'authorization {{ token: "{TOKEN}" }}\n', {"nats_token": TOKEN}, {}
    if mode == "nkey":
        seed = new_seed(nkeys.PREFIX_BYTE_USER)
        path = directory / "user.nk"
        path.write_bytes(seed + b"\n")
        return (
            f'authorization {{ users = [ {{nkey: "{public(seed)}"}} ] }}\n',
            {"nats_nkey_seed_file": str(path)},
            {"seed": path},
        )
    if mode == "tls":
        pki = make_pki(directory / "pki")
        config = (
            f'tls {{\n  cert_file: "{pki["server_cert"]}"\n  key_file: "{pki["server_key"]}"\n'
            f'  ca_file: "{pki["ca"]}"\n  verify: true\n}}\n'
            f'authorization {{ token: "{TOKEN}" }}\n'
        )
        settings = {
            "nats_ca_file": str(pki["ca"]),
            "nats_tls_cert_file": str(pki["client_cert"]),
            "nats_tls_key_file": str(pki["client_key"]),
            "nats_token": TOKEN,
        }
        return config, settings, pki
    if mode == "creds":
        config, creds = operator_mode(directory)
        return config, {"nats_creds_file": str(creds)}, {"creds": creds}
    raise ValueError(mode)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def secured_nats(mode: str, directory: Path) -> Iterator[Secured]:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config, settings, files = _configure(mode, directory)
    conf = directory / "nats.conf"
    conf.write_text(f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{directory / "js"}" }}\n' + config)
    log = directory / "nats.log"
    process = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(conf), "-l", str(log)], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"nats-server ({mode}) did not start: {log.read_text() if log.exists() else ''}"
                )
            time.sleep(0.02)
        scheme = "tls" if mode == "tls" else "nats"
        yield Secured(f"{scheme}://127.0.0.1:{port}", settings, port, files)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
