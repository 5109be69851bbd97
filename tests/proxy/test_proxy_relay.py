"""The proxy and its upstream: reply policy, retries, pooling, TLS/AUTH, campaign control, ESPs, DKIM."""

from __future__ import annotations

import asyncio
import email
import json
import smtplib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import dkim
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import generate_latest

from mailbeacon.contract.campaigns import CampaignKey, CampaignSpec, TrackingSwitches
from smtp_proxy import metrics as proxy_metrics
from tests.proxy.test_proxy_smtp import (
    client_tls,
    count_events,
    html_message,
    make_certificate,
    proxy_running,
    read_events,
)
from tests.support import SmtpSink, metric_value


def send(port: int, message: email.message.EmailMessage, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(message, to_addrs=recipients)


def metrics() -> str:
    return generate_latest(proxy_metrics.REGISTRY).decode()


@dataclass
class FlakyHandler:
    """An upstream that refuses some recipients for a while, and remembers its sessions."""

    transient: dict[str, int] = field(default_factory=dict)  # recipient -> refusals left
    permanent: set[str] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)
    messages: list[tuple[list[str], bytes]] = field(default_factory=list)
    mail_options: list[list[str]] = field(default_factory=list)
    credentials: tuple[str, str] | None = None
    delay: float = 0.0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.permanent:
            return "550 5.1.1 no such user"
        if self.transient.get(address, 0) > 0:
            self.transient[address] -= 1
            return "451 4.2.0 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        self.sessions.add(id(session))
        self.mail_options.append(list(envelope.mail_options))
        self.messages.append((list(envelope.rcpt_tos), envelope.original_content or b""))
        return "250 2.0.0 queued as 1234"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == (
            self.credentials
        )
        return AuthResult(success=ok, handled=False, auth_data="u" if ok else None)


@dataclass
class Upstream:
    handler: FlakyHandler
    port: int


async def start_upstream(handler: FlakyHandler, **smtp_options: Any) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="upstream", enable_SMTPUTF8=True, **smtp_options), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def flaky() -> AsyncIterator[Upstream]:
    handler = FlakyHandler()
    server, port = await start_upstream(handler)
    try:
        yield Upstream(handler, port)
    finally:
        server.close()


# -- what the app is told ----------------------------------------------------------------


async def test_upstream_down_defers_with_451(tmp_path: Path, nats_url: str) -> None:
    closed = SmtpSink()
    await closed.start()
    await closed.stop()  # nothing listens there any more
    async with proxy_running(tmp_path, nats_url, closed.url) as proxy:
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            await asyncio.to_thread(send, proxy.port, html_message(["ann@example.com"]), ["ann@example.com"])
    assert deferred.value.smtp_code == 451
    assert b"upstream unavailable" in deferred.value.smtp_error
    assert await count_events(nats_url, "sent") == 0 and await count_events(nats_url, "failed") == 0


@pytest.mark.slow
async def test_mixed_recipient_results(tmp_path: Path, nats_url: str, flaky: Upstream) -> None:
    flaky.handler.permanent.add("gone@example.com")
    recipients = ["ann@example.com", "gone@example.com", "ben@example.com"]
    before = metrics()
    async with proxy_running(tmp_path, nats_url, f"smtp://127.0.0.1:{flaky.port}") as proxy:

        def conversation() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                smtp.ehlo()
                smtp.mail("news@shop.example.com")
                for rcpt in recipients:
                    smtp.rcpt(rcpt)
                return smtp.data(html_message(recipients, Message_ID="<m1@shop.example.com>").as_bytes())

        code, text = await asyncio.to_thread(conversation)
    assert code == 250 and b"2 of 3 copies accepted" in text
    sent = await read_events(nats_url, "sent")
    failed = await read_events(nats_url, "failed")
    assert sorted(e.recipient or "" for e in sent) == ["ann@example.com", "ben@example.com"]
    assert [(e.recipient, e.metadata["smtp_code"], e.reason) for e in failed] == [
        ("gone@example.com", 550, "550 5.1.1 no such user")
    ]
    assert all(e.event_id == f"proxy:{e.type}:{e.tracking_id}" for e in [*sent, *failed])
    assert all(e.campaign == "default/conversations" for e in [*sent, *failed])
    assert {e.metadata["message_id"] for e in [*sent, *failed]} == {"<m1@shop.example.com>"}
    after = metrics()
    assert (
        metric_value(after, "mailbeacon_proxy_messages_total", result="partial")
        - metric_value(before, "mailbeacon_proxy_messages_total", result="partial")
        == 1
    )
    assert (
        metric_value(after, "mailbeacon_proxy_upstream_errors_total", code_class="5xx")
        - metric_value(before, "mailbeacon_proxy_upstream_errors_total", code_class="5xx")
        == 1
    )
    assert (
        metric_value(after, "mailbeacon_proxy_copies_total", result="sent")
        - metric_value(before, "mailbeacon_proxy_copies_total", result="sent")
        == 2
    )


async def test_all_refused_permanently_passes_the_upstream_code_on(
    tmp_path: Path, nats_url: str, flaky: Upstream
) -> None:
    flaky.handler.permanent.add("gone@example.com")
    async with proxy_running(tmp_path, nats_url, f"smtp://127.0.0.1:{flaky.port}") as proxy:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await asyncio.to_thread(send, proxy.port, html_message(["x"]), ["gone@example.com"])
    assert (refused.value.smtp_code, refused.value.smtp_error) == (550, b"5.1.1 no such user")
    assert await count_events(nats_url, "failed") == 1


@pytest.mark.slow
async def test_transient_refusal_of_a_later_copy_is_retried(
    tmp_path: Path, nats_url: str, flaky: Upstream
) -> None:
    flaky.handler.transient["busy@example.com"] = 1  # refused once, then accepted
    before = metrics()
    async with proxy_running(
        tmp_path, nats_url, f"smtp://127.0.0.1:{flaky.port}", upstream_retry_seconds=5
    ) as proxy:
        recipients = ["ann@example.com", "busy@example.com"]
        await asyncio.to_thread(send, proxy.port, html_message(recipients), recipients)
    assert sorted(r for rcpts, _ in flaky.handler.messages for r in rcpts) == recipients
    assert await count_events(nats_url, "sent") == 2 and await count_events(nats_url, "failed") == 0
    assert (
        metric_value(metrics(), "mailbeacon_proxy_copy_retries_total")
        - metric_value(before, "mailbeacon_proxy_copy_retries_total")
        == 1
    )


async def test_transient_refusal_past_the_retry_window_becomes_failed(
    tmp_path: Path, nats_url: str, flaky: Upstream
) -> None:
    flaky.handler.transient["busy@example.com"] = 100
    async with proxy_running(
        tmp_path, nats_url, f"smtp://127.0.0.1:{flaky.port}", upstream_retry_seconds=1
    ) as proxy:
        recipients = ["ann@example.com", "busy@example.com"]
        started = asyncio.get_running_loop().time()
        await asyncio.to_thread(send, proxy.port, html_message(recipients), recipients)
        waited = asyncio.get_running_loop().time() - started
    assert waited < 4  # bounded: the app is not kept waiting
    failed = await read_events(nats_url, "failed")
    assert [(e.recipient, e.metadata["smtp_code"]) for e in failed] == [("busy@example.com", 451)]
    assert await count_events(nats_url, "sent") == 1


async def test_upstream_sessions_are_pooled_across_messages(
    tmp_path: Path, nats_url: str, flaky: Upstream
) -> None:
    async with proxy_running(tmp_path, nats_url, f"smtp://127.0.0.1:{flaky.port}") as proxy:
        for index in range(4):
            rcpt = [f"r{index}@example.com"]
            await asyncio.to_thread(send, proxy.port, html_message(rcpt), rcpt)
    assert len(flaky.handler.messages) == 4
    assert len(flaky.handler.sessions) == 1  # one upstream session carried all four


async def test_upstream_starttls_and_auth(tmp_path: Path, nats_url: str) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert_file), str(key_file))
    handler = FlakyHandler(credentials=("relay-user", "p@ss:word"))
    server, port = await start_upstream(
        handler, tls_context=context, require_starttls=True, auth_required=True,
        authenticator=handler.authenticate,
    )  # fmt: skip
    try:
        url = f"smtp://relay-user:p%40ss%3Aword@127.0.0.1:{port}?starttls=true"
        async with proxy_running(tmp_path, nats_url, url, upstream_ca_file=str(cert_file)) as proxy:
            await asyncio.to_thread(send, proxy.port, html_message(["ann@example.com"]), ["ann@example.com"])
        wrong = f"smtp://relay-user:nope@127.0.0.1:{port}?starttls=true"
        async with proxy_running(tmp_path, nats_url, wrong, upstream_ca_file=str(cert_file)) as proxy:
            with pytest.raises(smtplib.SMTPDataError) as deferred:
                await asyncio.to_thread(
                    send, proxy.port, html_message(["ben@example.com"]), ["ben@example.com"]
                )
            assert deferred.value.smtp_code == 451  # a refused login is ours to fix: the app retries
    finally:
        server.close()
    assert [rcpts for rcpts, _ in handler.messages] == [["ann@example.com"]]


async def test_upstream_implicit_tls(tmp_path: Path, nats_url: str) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert_file), str(key_file))
    handler = FlakyHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        async with proxy_running(
            tmp_path, nats_url, f"smtps://127.0.0.1:{port}", upstream_ca_file=str(cert_file)
        ) as proxy:
            await asyncio.to_thread(send, proxy.port, html_message(["ann@example.com"]), ["ann@example.com"])
    finally:
        server.close()
    assert len(handler.messages) == 1
    assert client_tls(cert_file) is not None


# -- campaign control --------------------------------------------------------------------


async def test_paused_campaign_is_deferred(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    async with proxy_running(tmp_path, nats_url, sink) as proxy:
        await proxy.store.put(CampaignKey("default", "conversations"), CampaignSpec(paused=True))
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            await asyncio.to_thread(send, proxy.port, html_message(["ann@example.com"]), ["ann@example.com"])
        assert deferred.value.smtp_code == 451
        assert b"paused" in deferred.value.smtp_error
        await proxy.store.put(CampaignKey("default", "conversations"), CampaignSpec(paused=False))
        await asyncio.to_thread(send, proxy.port, html_message(["ann@example.com"]), ["ann@example.com"])
    assert len(sink.messages) == 1


def html_of(content: bytes) -> str:
    message = email.message_from_bytes(content, policy=default_policy)
    body = message.get_body(preferencelist=("html",))
    assert body is not None
    return str(body.get_content())  # type: ignore[attr-defined]


async def test_campaign_switches_from_the_kv_bucket(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    spec = CampaignSpec(
        tracking=TrackingSwitches(
            opens=False, clicks=True, unsubscribe_header=True, skip_links=["https://shop.example.com/legal*"]
        )
    )
    message = html_message(["ann@example.com"])
    message.get_body(("html",)).set_content(  # type: ignore[union-attr]
        '<html><body><a href="https://shop.example.com/legal/terms">T</a>'
        '<a href="https://shop.example.com/x">X</a></body></html>',
        subtype="html",
    )
    async with proxy_running(tmp_path, nats_url, sink) as proxy:
        await proxy.store.put(CampaignKey("default", "conversations"), spec)
        await asyncio.to_thread(send, proxy.port, message, ["ann@example.com"])
    relayed = email.message_from_bytes(sink.messages[0].content, policy=default_policy)
    markup = html_of(sink.messages[0].content)
    tracking_id = str(relayed["X-Mailbeacon-Tracking-ID"])
    assert "/track/pixel/" not in markup  # opens off
    assert 'href="https://shop.example.com/legal/terms"' in markup  # a link to leave alone
    assert markup.count(f"/track/click/{tracking_id}/?url=https%3A%2F%2Fshop.example.com%2Fx") == 1
    # The link names the list it leaves (the campaign's name: the spec has no displayName), signed.
    assert f"/track/unsubscribe/{tracking_id}/?list=conversations&sig=" in str(relayed["List-Unsubscribe"])
    assert str(relayed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"


async def test_per_message_and_per_recipient_opt_outs(tmp_path: Path, nats_url: str, sink: SmtpSink) -> None:
    optouts = tmp_path / "optouts.txt"
    optouts.write_text("# recipients who asked not to be tracked\nBen@Example.com\n@private.example\n")
    recipients = ["ann@example.com", "ben@example.com", "cy@private.example"]
    async with proxy_running(tmp_path, nats_url, sink, tracking_optout_file=str(optouts)) as proxy:
        await asyncio.to_thread(send, proxy.port, html_message(recipients), recipients)
        opens_only = html_message(["dee@example.com"], X_Mailbeacon_Track="opens")
        await asyncio.to_thread(send, proxy.port, opens_only, ["dee@example.com"])
        off = html_message(["eve@example.com"], X_Mailbeacon_Track="off")
        await asyncio.to_thread(send, proxy.port, off, ["eve@example.com"])
    copies = {m.recipients[0]: m.content for m in sink.messages}
    assert "/track/" in html_of(copies["ann@example.com"])
    for untracked in ("ben@example.com", "cy@private.example", "eve@example.com"):
        assert "/track/" not in html_of(copies[untracked]), untracked
        assert b"X-Mailbeacon-Tracking-ID" in copies[untracked]  # still correlated for bounces
    dee = html_of(copies["dee@example.com"])
    assert "/track/pixel/" in dee and "/track/click/" not in dee
    assert all(b"X-Mailbeacon-Track:" not in content for content in copies.values())
    assert await count_events(nats_url, "sent") == 5  # every copy is still recorded


# -- providers and signatures ------------------------------------------------------------


async def test_sendgrid_correlation_merges_the_apps_header(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    message = html_message(
        ["ann@example.com"], X_SMTPAPI='{"unique_args": {"order": "42"}, "category": ["x"]}'
    )
    async with proxy_running(tmp_path, nats_url, sink, upstream_provider="sendgrid") as proxy:
        await asyncio.to_thread(send, proxy.port, message, ["ann@example.com"])
    relayed = email.message_from_bytes(sink.messages[0].content, policy=default_policy)
    assert len(relayed.get_all("X-SMTPAPI") or []) == 1
    smtpapi = json.loads(str(relayed["X-SMTPAPI"]))
    assert smtpapi["unique_args"] == {"order": "42", "tracking_id": str(relayed["X-Mailbeacon-Tracking-ID"])}
    assert smtpapi["category"] == ["x"]
    assert smtpapi["filters"]["clicktrack"]["settings"]["enable"] == 0
    assert smtpapi["filters"]["opentrack"]["settings"]["enable"] == 0


def rsa_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import base64

    return private, base64.b64encode(public).decode()


async def test_dkim_signed_mail_is_resigned_after_rewriting(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    app_key, _ = rsa_key()
    our_key, our_public = rsa_key()
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(our_key)
    message = html_message(["ann@example.com"]).as_bytes().replace(b"\n", b"\r\n")
    signed = dkim.sign(message, b"app", b"shop.example.com", app_key) + message

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"mb2026._domainkey.shop.example.com."
        return f"v=DKIM1; k=rsa; p={our_public}".encode()

    async with proxy_running(
        tmp_path,
        nats_url,
        sink,
        dkim_private_key_file=str(key_file),
        dkim_selector="mb2026",
        dkim_domain="shop.example.com",
    ) as proxy:

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                smtp.sendmail("news@shop.example.com", ["ann@example.com"], signed)

        await asyncio.to_thread(conversation)
    relayed = sink.messages[0].content
    assert relayed.count(b"DKIM-Signature:") == 1 and b"s=mb2026" in relayed  # the app's is gone
    assert "/track/click/" in html_of(relayed)
    assert dkim.verify(relayed, dnsfunc=dns)


async def test_large_attachment_streams_through_unchanged(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    message = html_message(["ann@example.com"])
    blob = bytes(range(256)) * 20_000  # 5 MB
    message.add_attachment(blob, maintype="application", subtype="octet-stream", filename="big.bin")
    async with proxy_running(tmp_path, nats_url, sink) as proxy:
        await asyncio.to_thread(send, proxy.port, message, ["ann@example.com"])
    relayed = email.message_from_bytes(sink.messages[0].content, policy=default_policy)
    attachment = next(iter(relayed.iter_attachments()))
    assert attachment.get_content() == blob


async def test_unparsable_and_signed_mail_is_relayed_and_counted(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    headers_only = b"From: a@shop.example.com\r\nTo: ann@example.com\r\nX-Campaign: conversations\r\nSubject: no body\r\n"
    signed = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=shop.example.com; s=s1; h=from:subject; bh=x; b=y\r\n"
        b"From: a@shop.example.com\r\nSubject: signed\r\nX-Campaign: conversations\r\nContent-Type: text/html\r\n\r\n"
        b'<a href="https://shop.example.com/">x</a>\r\n'
    )
    before = metrics()
    async with proxy_running(tmp_path, nats_url, sink) as proxy:

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                smtp.sendmail("a@shop.example.com", ["ann@example.com"], headers_only)
                smtp.sendmail("a@shop.example.com", ["ann@example.com"], signed)

        await asyncio.to_thread(conversation)
    after = metrics()

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert sink.messages[0].content == headers_only  # byte for byte
    relayed = sink.messages[1].content
    assert relayed.endswith(signed.split(b"\r\n\r\n", 1)[1])  # the signed body untouched
    assert b"X-Campaign" not in relayed and b"X-Mailbeacon-Tracking-ID:" in relayed
    assert delta("mailbeacon_proxy_rewrite_failures_total") == 1
    assert delta("mailbeacon_proxy_untracked_messages_total", why="dkim_signed") == 1
    assert delta("mailbeacon_proxy_relay_seconds_count") == 2
    assert delta("mailbeacon_proxy_messages_total", result="accepted") == 2
    assert await count_events(nats_url, "sent") == 2


async def test_utf8_address_to_an_upstream_without_smtputf8(tmp_path: Path, nats_url: str) -> None:
    handler = FlakyHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, enable_SMTPUTF8=False), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with proxy_running(tmp_path, nats_url, f"smtp://127.0.0.1:{port}") as proxy:

            def conversation() -> None:
                with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                    smtp.ehlo()
                    with pytest.raises(smtplib.SMTPDataError) as refused:
                        smtp.sendmail(
                            "news@shop.example.com",
                            ["j\u00f6rg@b\u00fccher.example"],
                            html_message(["x"]).as_bytes(),
                            mail_options=["SMTPUTF8"],
                        )
                    assert refused.value.smtp_code == 553

            await asyncio.to_thread(conversation)
    finally:
        server.close()
    assert handler.messages == []
    assert await count_events(nats_url, "failed") == 1


async def test_8bitmime_and_smtputf8_senders_are_relayed_as_such(
    tmp_path: Path, nats_url: str, flaky: Upstream
) -> None:
    message = (
        "From: J\u00f6rg <j\u00f6rg@b\u00fccher.example>\r\nTo: ann@example.com\r\nSubject: Gr\u00fc\u00dfe\r\n"
        "X-Campaign: conversations\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        '<p>Gr\u00fc\u00dfe</p><a href="https://b\u00fccher.example/\u00e4">\u00e4</a>\r\n'
    ).encode()
    async with proxy_running(tmp_path, nats_url, f"smtp://127.0.0.1:{flaky.port}") as proxy:

        def conversation() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                smtp.sendmail(
                    "j\u00f6rg@b\u00fccher.example", ["ann@example.com"], message,
                    mail_options=["SMTPUTF8", "BODY=8BITMIME"],
                )  # fmt: skip

        await asyncio.to_thread(conversation)
    assert sorted(flaky.handler.mail_options[0]) == ["BODY=8BITMIME", "SMTPUTF8"]
    relayed = flaky.handler.messages[0][1]
    assert "Subject: Gr\u00fc\u00dfe".encode() in relayed  # 8-bit headers as they came
    markup = relayed.decode()
    assert "<p>Gr\u00fc\u00dfe</p>" in markup
    assert "url=https%3A%2F%2Fb%C3%BCcher.example%2F%C3%A4" in markup  # the IRI, percent-encoded
