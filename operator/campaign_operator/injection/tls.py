"""The injection webhook's own certificate, when cert-manager does not provide one.

At each start the operator makes a CA and a server certificate for the webhook Service's DNS
names, signs the one with the other, and forgets the CA's private key: nobody can issue
another certificate the API server would trust. The certificate's key is written encrypted,
with a password kept in memory only; the CA goes into the MutatingWebhookConfiguration's
caBundle (:func:`ca_bundle_patch`). Nothing random is rendered by the chart, so GitOps tools
see no change from one render to the next.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Made anew at each start, so the lifetime only has to outlast one operator process.
VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class WebhookCertificate:
    ca_pem: bytes  # for the caBundle
    cert_pem: bytes
    key_pem: bytes  # encrypted with password
    password: str

    def write(self, directory: Path) -> tuple[Path, Path]:
        """The certificate and its (encrypted) key as files only this user may read."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = directory / "webhook.crt", directory / "webhook.key"
        for path, data in zip(paths, (self.cert_pem, self.key_pem), strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        return paths


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def _subject_alternative_names(names: Sequence[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def make_certificate(names: Sequence[str], now: datetime.datetime | None = None) -> WebhookCertificate:
    """A server certificate for ``names`` (DNS names or IP addresses) and the CA that signed it."""
    if not names:
        raise ValueError("the webhook certificate needs at least one name (INJECTION_DNS_NAMES)")
    now = now or datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + VALIDITY  # a little clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("mailbeacon injection webhook CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_subject_alternative_names(names)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    password = secrets.token_urlsafe(32)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    )
    pem = serialization.Encoding.PEM
    return WebhookCertificate(ca.public_bytes(pem), certificate.public_bytes(pem), key_pem, password)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def ca_bundle_patch(configuration: dict[str, Any], ca_pem: bytes) -> list[dict[str, Any]]:
    """The JSON patch giving each webhook of a MutatingWebhookConfiguration the CA; each webhook is
    named in a ``test`` first, so a configuration changed meanwhile is refused (422), not corrupted."""
    bundle = base64.b64encode(ca_pem).decode("ascii")
    operations: list[dict[str, Any]] = []
    for index, webhook in enumerate(configuration.get("webhooks") or []):
        if webhook.get("clientConfig", {}).get("caBundle") == bundle:
            continue
        operations += [
            {"op": "test", "path": f"/webhooks/{index}/name", "value": webhook.get("name")},
            {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": bundle},
        ]
    return operations
