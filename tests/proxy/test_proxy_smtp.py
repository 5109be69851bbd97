"""SMTP conversations with the proxy over real sockets: who may relay, AUTH, STARTTLS, limits, errors."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import smtplib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mailbeacon.bus.campaign_store import CampaignStore
from mailbeacon.bus.jetstream import STREAM, connect, ensure_suppression_bucket, provision
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.bus.suppressions import SuppressionList
from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec
from mailbeacon.contract.events import Event
from mailbeacon.contract.settings import Settings
from smtp_proxy.service import ProxyService
from tests.support import SmtpSink, make_settings


@dataclass
class RunningProxy:
    service: ProxyService
    store: CampaignStore
    settings: Settings

    @property
    def port(self) -> int:
        assert self.service.port is not None
        return self.service.port


@asynccontextmanager
async def proxy_running(
    tmp_path: Path,
    nats_url: str,
    upstream: SmtpSink | str,
    campaigns: Sequence[str] = ("default/conversations",),
    **overrides: Any,
) -> AsyncIterator[RunningProxy]:
    """The proxy as `mailbeacon proxy` runs it: real NATS (events, campaign KV), a real upstream.

    ``campaigns`` are defined in the KV bucket first, as the operator would from
    ``Campaign`` resources (outside `mailbeacon up`, X-Campaign names only existing ones).
    """
    url = upstream if isinstance(upstream, str) else upstream.url
    values: dict[str, Any] = {"upstream_smtp": url, "upstream_timeout": 5}
    values.update(overrides)
    settings = make_settings(tmp_path, nats_url=nats_url, **values)
    nc = await connect(nats_url, "test-proxy")
    js = nc.jetstream()
    store = CampaignStore(await provision(js, settings))
    publisher = EventPublisher(js)
    await store.start()
    for campaign in campaigns:
        await store.put(CampaignKey.parse(campaign), CampaignSpec())
    # As `mailbeacon proxy` builds it: honouring unsubscribes is on by default.
    suppressions = SuppressionList(await ensure_suppression_bucket(js, settings))
    service = ProxyService(settings, publisher, store, serve_http=False, suppressions=suppressions)
    await service.start()
    try:
        yield RunningProxy(service, store, settings)
    finally:
        await service.stop()
        await publisher.close()
        await store.stop()
        await nc.close()


async def read_events(nats_url: str, event_type: str) -> list[Event]:
    nc = await connect(nats_url, "test-reader")
    try:
        js = nc.jetstream()
        subscription = await js.pull_subscribe(f"mailbeacon.events.{event_type}", stream=STREAM)
        events: list[Event] = []
        try:
            while True:
                batch = await subscription.fetch(100, timeout=0.5)
                events.extend(Event.from_json(message.data) for message in batch)
        except TimeoutError:
            pass
        await subscription.unsubscribe()
        return events
    finally:
        await nc.close()


async def count_events(nats_url: str, event_type: str) -> int:
    nc = await connect(nats_url, "test-counter")
    try:
        info = await nc.jetstream().stream_info(STREAM, subjects_filter=f"mailbeacon.events.{event_type}")
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


def html_message(recipients: list[str], campaign: str = "conversations", **extra: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "news@shop.example.com"
    message["To"] = ", ".join(recipients)
    message["Subject"] = "Hello"
    message["X-Campaign"] = campaign
    for name, value in extra.items():
        message[name.replace("_", "-")] = value
    message.set_content("Hello https://shop.example.com/")
    message.add_alternative('<html><body><a href="https://shop.example.com/">Shop</a></body></html>', "html")
    return message


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (the CA file is the certificate)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def client_tls(cert_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_file))


# -- not an open relay -------------------------------------------------------------------


async def test_unauthenticated_relay_is_refused(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    async with proxy_running(tmp_path, nats_url, sink, smtp_relay_networks="10.99.0.0/16") as proxy:

        def attempt() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.ehlo()
                code, text = smtp.mail("spammer@example.net")
                assert (code, text) == (530, b"5.7.0 Authentication required")
                code, _ = smtp.rcpt("victim@example.org")
                assert code == 503  # no transaction without an accepted MAIL
                with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                    smtp.sendmail("spammer@example.net", ["victim@example.org"], b"Subject: x\r\n\r\nspam")
                assert refused.value.smtp_code == 530

        await asyncio.to_thread(attempt)
    assert sink.messages == []


@pytest.mark.slow
async def test_auth_over_starttls_is_accepted_and_never_in_clear(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    credentials = tmp_path / "smtp-users"
    credentials.write_text("# apps allowed to relay\napp:correct horse battery\n")
    async with proxy_running(
        tmp_path,
        nats_url,
        sink,
        smtp_relay_networks="",
        smtp_auth_networks="",
        smtp_auth_file=str(credentials),
        smtp_tls_cert_file=str(cert_file),
        smtp_tls_key_file=str(key_file),
    ) as proxy:

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.ehlo()
                assert smtp.has_extn("starttls")
                assert not smtp.has_extn("auth")  # not offered in clear to this network
                code, _ = smtp.docmd("AUTH", "PLAIN AGFwcABjb3JyZWN0IGhvcnNlIGJhdHRlcnk=")
                assert code == 538  # RFC 4954: encryption required
                assert smtp.mail("app@shop.example.com")[0] == 530
                smtp.rset()
                smtp.starttls(context=client_tls(cert_file))
                smtp.ehlo()
                assert "PLAIN" in smtp.esmtp_features["auth"] and "LOGIN" in smtp.esmtp_features["auth"]
                with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
                    smtp.login("app", "wrong password")
                assert wrong.value.smtp_code == 535
                smtp.login("app", "correct horse battery")
                smtp.send_message(html_message(["ann@example.com"]))

        await asyncio.to_thread(conversation)
    assert [m.recipients for m in sink.messages] == [["ann@example.com"]]


async def test_auth_in_clear_from_an_allowed_network(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    async with proxy_running(
        tmp_path, nats_url, sink, smtp_relay_networks="", smtp_auth_users="app:s3cret,other:pw"
    ) as proxy:

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.login("app", "s3cret")  # loopback is in SMTP_AUTH_NETWORKS by default
                smtp.send_message(html_message(["ann@example.com"]))

        await asyncio.to_thread(conversation)
    assert len(sink.messages) == 1


async def test_auth_is_offered_only_when_someone_can_log_in(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    async with proxy_running(tmp_path, nats_url, sink) as proxy:  # no SMTP_AUTH_* configured

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.ehlo()
                assert not smtp.has_extn("auth")
                assert smtp.has_extn("size")
                # A client that logs in only when offered just sends (loopback may relay).
                smtp.send_message(html_message(["ann@example.com"]))

        await asyncio.to_thread(conversation)
    assert len(sink.messages) == 1
    async with proxy_running(tmp_path, nats_url, sink, smtp_auth_users="app:s3cret") as proxy:

        def offered() -> bool:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.ehlo()
                return smtp.has_extn("auth")

        assert await asyncio.to_thread(offered)


# -- limits and malformed input ----------------------------------------------------------


async def test_oversize_message_is_refused_with_552(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    big = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 400  # about 29 KB
    async with proxy_running(tmp_path, nats_url, sink, max_message_bytes=10_000) as proxy:

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.ehlo()
                assert smtp.esmtp_features["size"] == "10000"
                # A client that announces the size is refused at MAIL ...
                with pytest.raises(smtplib.SMTPSenderRefused) as announced:
                    smtp.sendmail("a@example.com", ["b@example.com"], big)
                assert announced.value.smtp_code == 552
                # ... one that does not, after DATA, without the proxy keeping the data.
                smtp.rset()
                assert smtp.mail("a@example.com")[0] == 250
                assert smtp.rcpt("b@example.com")[0] == 250
                code, _ = smtp.data(big)
                assert code == 552
                assert smtp.noop()[0] == 250  # the session goes on

        await asyncio.to_thread(conversation)
    assert sink.messages == []


async def test_too_many_recipients_get_452(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    async with proxy_running(tmp_path, nats_url, sink, smtp_max_recipients=2) as proxy:

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.ehlo()
                smtp.mail("news@shop.example.com")
                assert smtp.rcpt("a@example.com")[0] == 250
                assert smtp.rcpt("b@example.com")[0] == 250
                assert smtp.rcpt("c@example.com") == (452, b"4.5.3 Too many recipients")
                code, _ = smtp.data(html_message(["a@example.com", "b@example.com"]).as_bytes())
                assert code == 250

        await asyncio.to_thread(conversation)
    assert sorted(r for m in sink.messages for r in m.recipients) == ["a@example.com", "b@example.com"]


async def test_addresses_too_long_or_malformed_get_501(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    longest = "x" * 64 + "@" + "d" * (254 - 65 - 4) + ".com"
    assert len(longest) == 254
    async with proxy_running(tmp_path, nats_url, sink) as proxy:

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.ehlo()
                assert smtp.mail("n" + longest)[0] == 501
                smtp.mail("news@shop.example.com")
                assert smtp.rcpt("y" + longest)[0] == 501
                for nonsense in ("not an address", "nobody", "@example.com", "ann@"):
                    assert smtp.rcpt(nonsense)[0] in (501, 553), nonsense  # 553: aiosmtpd's own path check
                assert smtp.rcpt(longest)[0] == 250
                code, _ = smtp.data(html_message([longest]).as_bytes())
                assert code == 250

        await asyncio.to_thread(conversation)
    assert [r for m in sink.messages for r in m.recipients] == [longest]


async def test_a_recipient_that_is_not_utf8_is_refused_at_rcpt(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    async with proxy_running(tmp_path, nats_url, sink) as proxy:
        replies = await asyncio.to_thread(
            exchange,
            proxy.port,
            [
                b"EHLO client.example",
                b"MAIL FROM:<news@shop.example.com> SMTPUTF8",
                b"RCPT TO:<ann\xff@x.example>",  # aiosmtpd keeps the byte as a lone surrogate
                b"RCPT TO:<b\xc3\xa9a@x.example>",  # UTF-8: welcome with SMTPUTF8
                b"QUIT",
            ],
        )
    assert [reply[:3] for reply in replies] == [b"220", b"250", b"250", b"501", b"250", b"221"]


def exchange(port: int, lines: list[bytes]) -> list[bytes]:
    """Send raw command lines, one at a time; the first reply line to each."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        reader = conn.makefile("rb")
        replies = [reader.readline()]
        for line in lines:
            conn.sendall(line + b"\r\n")
            reply = reader.readline()
            while reply[3:4] == b"-":  # multi-line reply: keep the last line
                reply = reader.readline()
            replies.append(reply.rstrip())
        return replies


async def test_malformed_commands_are_answered_per_rfc5321(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    async with proxy_running(tmp_path, nats_url, sink) as proxy:
        replies = await asyncio.to_thread(
            exchange,
            proxy.port,
            [
                b"MAIL FROM:<a@example.com>",  # before EHLO
                b"EHLO client.example",
                b"RCPT TO:<b@example.com>",  # before MAIL
                b"DATA",  # before RCPT
                b"MAIL TO:<a@example.com>",
                b"MAIL FROM:<a@example.com> BOGUS=1",
                b"XYZZY",
                b"MAIL FROM:<a@example.com>",
                b"MAIL FROM:<again@example.com>",  # nested MAIL
                b"RCPT TO:<" + b"x" * 600 + b"@example.com>",  # line too long
                b"QUIT",
            ],
        )
    codes = [reply[:3] for reply in replies]
    assert codes == [
        b"220",
        b"503",
        b"250",
        b"503",
        b"503",
        b"501",
        b"555",
        b"500",
        b"250",
        b"503",
        b"500",
        b"221",
    ]


async def test_a_failing_hook_answers_451_without_internals(
    tmp_path: Path, nats_url: str, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_running(tmp_path, nats_url, sink) as proxy:

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("database password is hunter2")

        monkeypatch.setattr(proxy.service.upstream, "deliver", broken)

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                with pytest.raises(smtplib.SMTPDataError) as failed:
                    smtp.send_message(html_message(["ann@example.com"]))
                assert failed.value.smtp_code == 451
                assert b"hunter2" not in failed.value.smtp_error
                assert b"RuntimeError" not in failed.value.smtp_error
                assert smtp.noop()[0] == 250  # the session survives
                assert smtp.mail("news@shop.example.com")[0] == 250  # and a new transaction can start

        await asyncio.to_thread(conversation)


@pytest.mark.slow
async def test_idle_and_slow_data_clients_are_cut_off(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    async with proxy_running(
        tmp_path, nats_url, sink, smtp_command_timeout=0.5, smtp_data_timeout=1.0
    ) as proxy:

        def idle() -> bytes:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
                conn.recv(1024)
                conn.settimeout(5)
                return conn.recv(1024)  # b"" once the proxy closes the connection

        def slow_data() -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
                reader = conn.makefile("rb")
                reader.readline()
                for command in (b"HELO x", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"):
                    conn.sendall(command + b"\r\n")
                    reader.readline()
                conn.sendall(b"Subject: slow\r\n\r\n")
                started = time.monotonic()
                rest = reader.read()  # the proxy closes after the data timeout
                return rest, time.monotonic() - started

        assert await asyncio.to_thread(idle) == b""
        rest, waited = await asyncio.to_thread(slow_data)
        assert rest == b"" and 0.7 < waited < 4  # the DATA budget, not the 0.5 s command timeout
    assert sink.messages == []


async def test_data_reception_edge_cases(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    async with proxy_running(tmp_path, nats_url, sink) as proxy:

        def conversation() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
                reader = conn.makefile("rb")
                replies = [reader.readline()]

                def command(line: bytes) -> None:
                    conn.sendall(line + b"\r\n")
                    replies.append(reader.readline().rstrip())

                command(b"HELO client.example")
                for body in (
                    # An overlong line whose last character is a dot right before its CRLF.
                    b"Subject: long\r\n\r\n" + b"x" * 3000 + b".\r\nmore\r\n",
                    b"Subject: dots\r\n\r\n..leading dot\r\n" + b"y" * 990 + b"\r\nend\r\n",
                ):
                    command(b"MAIL FROM:<a@example.com>")
                    command(b"RCPT TO:<b@example.com>")
                    command(b"DATA")
                    # The terminator and the next command arrive together (a pipelining client).
                    conn.sendall(body + b".\r\nNOOP\r\n")
                    replies.append(reader.readline().rstrip())
                    replies.append(reader.readline().rstrip())
                return replies

        replies = await asyncio.to_thread(conversation)
    greeting = [b"220", b"250"]
    refused = [b"250", b"250", b"354", b"500", b"250"]  # MAIL, RCPT, DATA, the message, NOOP
    accepted = [b"250", b"250", b"354", b"250", b"250"]
    assert [r[:3] for r in replies] == [*greeting, *refused, *accepted]
    assert len(sink.messages) == 1
    assert b"\r\n.leading dot\r\n" in sink.messages[0].content  # the client's doubled dot undone
    assert b"y" * 990 + b"\r\nend\r\n" in sink.messages[0].content
