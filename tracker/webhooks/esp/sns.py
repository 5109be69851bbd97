"""Amazon SNS message signatures (versions 1 and 2) and the signing certificates.

SNS signs a canonical text built from some of the message's fields with the private key
of a certificate it publishes at ``SigningCertURL``. We accept that URL only when it is
https on an ``sns.<region>.amazonaws.com`` host, take the certificate from
``SNS_CERT_DIR`` when the operator provided it ahead of time (named by the URL's last
path segment), else fetch it once and keep it in memory. Fetches go through HTTPS_PROXY
(unless NO_PROXY names the host).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mailbeacon.contract.netaddr import normalize_ip
from tracker.webhooks.generic_webhooks import WebhookError

log = logging.getLogger(__name__)

_SNS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
_CERT_NAME = re.compile(r"[A-Za-z0-9._-]+\.pem")
_MAX_CERT_BYTES = 64 * 1024

NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
SUBSCRIPTION_FIELDS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")

HttpGet = Callable[[str], Awaitable[bytes]]


def is_sns_url(url: str, suffix: str = "") -> bool:
    """True for ``https://sns.<region>.amazonaws.com[.cn]/...`` with no port, user or odd host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "https"
        and parts.username is None
        and port is None
        and _SNS_HOST.fullmatch(parts.hostname or "") is not None
        and parts.netloc.lower() == (parts.hostname or "")
        and parts.path.endswith(suffix)
    )


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    fields = NOTIFICATION_FIELDS if message.get("Type") == "Notification" else SUBSCRIPTION_FIELDS
    lines = []
    for name in fields:
        if name in message and message[name] is not None:
            lines.append(f"{name}\n{message[name]}\n")
        elif name != "Subject":
            raise WebhookError(f"SNS message lacks {name}", 400)
    return "".join(lines).encode()


def signature_valid(message: Mapping[str, Any], certificate_pem: bytes) -> bool:
    version = str(message.get("SignatureVersion", ""))
    algorithm: hashes.HashAlgorithm
    if version == "1":
        algorithm = hashes.SHA1()
    elif version == "2":
        algorithm = hashes.SHA256()
    else:
        return False
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        key = certificate.public_key()
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
    except (ValueError, binascii.Error):
        return False
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        key.verify(signature, string_to_sign(message), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        return False
    return True


def bypasses_proxy(host: str, no_proxy: Sequence[str]) -> bool:
    """Whether ``host`` is reached directly by NO_PROXY: ``*``; an IP address or CIDR holding it
    (when the host is an address); or a domain, with or without a leading dot or ``*.``,
    that is the host or one of its parents."""
    host = host.lower().rstrip(".").strip("[]")
    address = normalize_ip(host)
    for entry in (item.strip().lower() for item in no_proxy):
        if entry == "*":
            return True
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry.strip("[]"), strict=False)
        except ValueError:
            domain = entry.removeprefix("*").lstrip(".").rstrip(".")
            if domain and (host == domain or host.endswith("." + domain)):
                return True
            continue
        if address is not None and address in network:
            return True
    return False


def proxy_for(url: str, proxy: str | None, no_proxy: Sequence[str] = ()) -> str | None:
    """The proxy a request to ``url`` goes through (HTTPS_PROXY unless NO_PROXY names its host)."""
    if not proxy:
        return None
    host = urlsplit(url).hostname or ""
    return None if bypasses_proxy(host, no_proxy) else proxy


def https_getter(proxy: str | None = None, no_proxy: Sequence[str] = ()) -> HttpGet:
    """The tracker's one outbound call: GET from AWS over verified TLS, small bodies only,
    through ``proxy`` (HTTPS_PROXY, by CONNECT) unless ``no_proxy`` names the host. The proxy
    is given per request from the settings: the environment is not read here."""

    async def https_get(url: str) -> bytes:
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=False, proxy=proxy_for(url, proxy, no_proxy)) as response,
        ):
            if response.status != 200:
                raise OSError(f"{url} answered {response.status}")
            body = await response.content.read(_MAX_CERT_BYTES + 1)
            if len(body) > _MAX_CERT_BYTES:
                raise OSError(f"{url} answered more than {_MAX_CERT_BYTES} bytes")
            return body

    return https_get


class Certificates:
    """Signing certificates by URL: provided in a directory, or fetched once and cached."""

    def __init__(self, directory: Path | None, http_get: HttpGet) -> None:
        self.directory = directory
        self._http_get = http_get
        self._cache: dict[str, bytes] = {}

    async def load(self, url: str) -> bytes:
        if not is_sns_url(url, ".pem"):
            raise WebhookError("SigningCertURL is not an https sns.<region>.amazonaws.com certificate", 401)
        cached = self._cache.get(url)
        if cached is not None:
            return cached
        name = PurePosixPath(urlsplit(url).path).name
        provided = self.directory / name if self.directory and _CERT_NAME.fullmatch(name) else None
        if provided is not None and provided.is_file():
            pem = provided.read_bytes()
        else:
            try:
                pem = await self._http_get(url)
            except Exception as exc:
                log.warning("could not fetch the SNS signing certificate %s: %s", url, exc)
                raise WebhookError(
                    "the SNS signing certificate could not be fetched, retry later", 503
                ) from exc
        self._cache[url] = pem
        return pem

    async def confirm_subscription(self, url: str) -> None:
        """Visit a SubscriptionConfirmation's SubscribeURL (only ever an SNS https host)."""
        if not is_sns_url(url):
            raise WebhookError("SubscribeURL is not an https sns.<region>.amazonaws.com address", 400)
        try:
            await self._http_get(url)
        except Exception as exc:
            log.warning("confirming the SNS subscription failed: %s", exc)
            raise WebhookError("confirming the subscription failed, retry later", 503) from exc
