"""Test keys and signers for every provider, and a tracker running against a real nats-server.

The signers follow each provider's documentation on their own (they do not reuse the
tracker's verification code), so a mistake in the tracker cannot be mirrored here.
Nothing reaches the internet: SNS certificates come from SNS_CERT_DIR and the one
outbound call (subscription confirmation) goes to a recording fake.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from mailbeacon.bus.jetstream import ALL_EVENTS, STREAM, connect, provision
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.contract.events import Event
from mailbeacon.contract.settings import Settings
from tests.support import make_settings
from tracker.service import TrackerService

HERE = Path(__file__).parent
TRACKING_ID = "0b9e8a5c-7d4e-4f0a-9a57-3c1f2d8e6b01"
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
MAILGUN_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
POSTMARK_AUTH = "postmark:s3cret-hook"
TOPIC = "arn:aws:sns:us-east-1:123456789012:mailbeacon-ses"
CERT_NAME = "SimpleNotificationService-7ff5318490ec183fbaddaa2a969abfda.pem"
CERT_URL = f"https://sns.us-east-1.amazonaws.com/{CERT_NAME}"


def load(name: str) -> Any:
    return json.loads((HERE / name).read_text())


def now_ts() -> int:
    return int(time.time())


# --- SendGrid: ECDSA P-256 over timestamp + raw body -------------------------------------------


@functools.cache
def sendgrid_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def sendgrid_public_key() -> str:
    """As the SendGrid console shows it: base64 of the DER SubjectPublicKeyInfo."""
    der = (
        sendgrid_private_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(der).decode()


def sendgrid_headers(body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(now_ts() if timestamp is None else timestamp)
    signature = sendgrid_private_key().sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
    }


# --- Mailgun: HMAC-SHA256(timestamp + token) ----------------------------------------------------


def mailgun_body(
    event_data: dict[str, Any], timestamp: int | None = None, token: str | None = None, key: str = MAILGUN_KEY
) -> bytes:
    stamp = str(now_ts() if timestamp is None else timestamp)
    token = token or uuid.uuid4().hex + uuid.uuid4().hex[:18]
    signature = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    return json.dumps(
        {"signature": {"timestamp": stamp, "token": token, "signature": signature}, "event-data": event_data}
    ).encode()


def mailgun_legacy_form(fields: dict[str, Any], key: str = MAILGUN_KEY) -> bytes:
    """A legacy (pre-2018) Mailgun webhook: form fields, with timestamp, token and signature
    among them, signed afresh."""
    stamp, token = str(now_ts()), uuid.uuid4().hex + uuid.uuid4().hex[:18]
    signature = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    return urlencode({**fields, "timestamp": stamp, "token": token, "signature": signature}).encode()


# --- SNS: RSA signature over the documented string to sign, self-signed test certificate ------


@functools.cache
def sns_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def sns_certificate_pem() -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com (test)")])
    start = datetime.now(UTC) - timedelta(days=1)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(sns_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=30))
        .sign(sns_key(), hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def write_sns_certificate(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CERT_NAME
    path.write_bytes(sns_certificate_pem())
    return path


def _sns_sign(message: dict[str, Any]) -> dict[str, Any]:
    if message["Type"] == "Notification":
        keys = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        keys = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    canonical = "".join(f"{key}\n{message[key]}\n" for key in keys if key in message)
    algorithm = hashes.SHA1() if message["SignatureVersion"] == "1" else hashes.SHA256()
    signature = sns_key().sign(canonical.encode(), padding.PKCS1v15(), algorithm)
    return {**message, "Signature": base64.b64encode(signature).decode()}


def sns_timestamp(at: datetime | None = None) -> str:
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def sns_notification(
    ses_event: dict[str, Any] | str,
    *,
    topic: str = TOPIC,
    message_id: str | None = None,
    at: datetime | None = None,
    version: str = "2",
    cert_url: str = CERT_URL,
    subject: str | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "Type": "Notification",
        "MessageId": message_id or str(uuid.uuid4()),
        "TopicArn": topic,
        "Message": ses_event if isinstance(ses_event, str) else json.dumps(ses_event),
        "Timestamp": sns_timestamp(at),
        "SignatureVersion": version,
        "SigningCertURL": cert_url,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
    }
    if subject is not None:
        message["Subject"] = subject
    return _sns_sign(message)


def sns_resigned(message: dict[str, Any], topic: str = TOPIC) -> dict[str, Any]:
    """A recorded SNS message as SNS would send it now: its fields kept, sent now (Timestamp),
    with the test certificate and a fresh signature (and ``topic`` when it names none)."""
    fresh = {key: value for key, value in message.items() if key != "Signature"}
    fresh.setdefault("TopicArn", topic)
    fresh.setdefault("SignatureVersion", "1")
    fresh.update(Timestamp=sns_timestamp(), SigningCertURL=CERT_URL)
    return _sns_sign(fresh)


def sns_subscription_confirmation(topic: str = TOPIC, version: str = "1") -> dict[str, Any]:
    token = "2336412f37fb687f5d51e6e2425dacbba2f46ccf2bb5d4ab2f9f6b3c0e1c" * 2
    return _sns_sign(
        {
            "Type": "SubscriptionConfirmation",
            "MessageId": str(uuid.uuid4()),
            "Token": token,
            "TopicArn": topic,
            "Message": f"You have chosen to subscribe to the topic {topic}.\nTo confirm the subscription, visit the SubscribeURL included in this message.",
            "SubscribeURL": f"https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn={topic}&Token={token}",
            "Timestamp": sns_timestamp(),
            "SignatureVersion": version,
            "SigningCertURL": CERT_URL,
        }
    )


def sns_headers(message: dict[str, Any]) -> dict[str, str]:
    return {
        "Content-Type": "text/plain; charset=UTF-8",  # what SNS really sends
        "x-amz-sns-message-type": message["Type"],
        "x-amz-sns-message-id": message["MessageId"],
        "x-amz-sns-topic-arn": message["TopicArn"],
    }


def ses_event(kind: str, *, identity_notification: bool = False, **mail_overrides: Any) -> dict[str, Any]:
    """An SES event of ``kind`` in event-publishing form (or identity-notification form)."""
    documented = load("ses_events.json")
    mail = {**documented["mail"], **mail_overrides}
    key = kind[:1].lower() + kind[1:]
    type_key = "notificationType" if identity_notification else "eventType"
    return {type_key: kind, "mail": mail, key: documented[kind]}


# --- Postmark: basic auth -----------------------------------------------------------------------


def postmark_headers(credentials: str = POSTMARK_AUTH) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode(),
    }


# --- a running tracker ------------------------------------------------------------------------


@dataclass
class FakeSns:
    """AWS's side of the one outbound call: records what the tracker asked for."""

    requests: list[str] = field(default_factory=list)

    async def get(self, url: str) -> bytes:
        self.requests.append(url)
        if "Action=ConfirmSubscription" in url:
            return b"<ConfirmSubscriptionResponse><ConfirmSubscriptionResult/></ConfirmSubscriptionResponse>"
        raise OSError("test network: only SubscribeURLs are answered")


@dataclass
class RunningTracker:
    url: str
    settings: Settings
    publisher: EventPublisher
    service: TrackerService
    nc: NATS
    sns: FakeSns


def webhook_settings(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Secrets for every provider, so each adapter can be exercised."""
    cert_dir = tmp_path / "sns-certs"
    write_sns_certificate(cert_dir)
    values: dict[str, Any] = {
        "sendgrid_public_key": sendgrid_public_key(),
        "mailgun_signing_key": MAILGUN_KEY,
        "ses_topic_arns": TOPIC,
        "sns_cert_dir": str(cert_dir),
        "postmark_basic_auth": POSTMARK_AUTH,
        "max_webhook_bytes": 256 * 1024,
    }
    values.update(overrides)
    return values


@asynccontextmanager
async def running_tracker(tmp_path: Path, nats_url: str, **overrides: Any) -> AsyncIterator[RunningTracker]:
    settings = make_settings(tmp_path, nats_url=nats_url, **webhook_settings(tmp_path, **overrides))
    nc = await connect(nats_url, "tracker-test")
    await provision(nc.jetstream(), settings)
    publisher = EventPublisher(nc.jetstream(), buffer_limit=settings.tracker.event_buffer_limit)
    sns = FakeSns()
    service = TrackerService(settings, publisher, sns_http_get=sns.get)
    await service.start()
    try:
        yield RunningTracker(f"http://127.0.0.1:{service.port}", settings, publisher, service, nc, sns)
    finally:
        await service.stop()
        await publisher.close(drain_timeout=5)
        await nc.close()


async def stream_events(nats_url: str) -> list[Event]:
    """Every event stored in the stream, in order (none while the stream does not exist yet)."""
    nc = await connect(nats_url, "tracker-test-reader")
    try:
        js = nc.jetstream()
        try:
            total = (await js.stream_info(STREAM)).state.messages
        except NotFoundError:
            return []
        if total == 0:
            return []
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30
        )
        reader = await js.pull_subscribe(ALL_EVENTS, stream=STREAM, config=config)
        events: list[Event] = []
        try:
            while len(events) < total:
                batch = await reader.fetch(batch=min(2000, total - len(events)), timeout=5)
                events += [Event.from_json(message.data) for message in batch]
        finally:
            await reader.unsubscribe()
            with contextlib.suppress(Exception):
                await js.delete_consumer(STREAM, config.name or "")
        return events
    finally:
        await nc.close()


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


# --- adapters called directly (no server) -------------------------------------------------------


def webhook_request(
    body: bytes, headers: dict[str, str] | None = None, received_at: datetime | None = None
) -> Any:
    from multidict import CIMultiDict, CIMultiDictProxy

    from tracker.webhooks.esp.base import WebhookRequest

    return WebhookRequest(
        headers=CIMultiDictProxy(CIMultiDict(headers or {})),
        body=body,
        received_at=received_at or datetime.now(UTC),
    )


def verify_context(tmp_path: Path, fetcher: FakeSns | None = None, **overrides: Any) -> Any:
    from tracker.webhooks.esp.base import VerifyContext
    from tracker.webhooks.esp.sns import Certificates
    from tracker.webhooks.webhook_limits import credentials_required

    settings = Settings(**{"secret_keys": "k" * 32, **webhook_settings(tmp_path, **overrides)})
    certificates = Certificates(settings.tracker.sns_cert_dir, (fetcher or FakeSns()).get)
    return VerifyContext(settings, datetime.now(UTC), certificates.load, credentials_required(settings))
