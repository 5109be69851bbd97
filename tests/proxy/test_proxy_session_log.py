"""What the proxy's logs say about SMTP sessions: never a credential, and addresses only when debugging.

aiosmtpd logs every command line and address at INFO (logger ``mail.log``) and parts of
the AUTH exchange at DEBUG. The process's log level is set as `mailbeacon` sets it
(``logging.basicConfig(level=LOG_LEVEL)``), here through pytest's capture.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib
import socket
from pathlib import Path

import pytest

from tests.proxy.test_proxy_smtp import html_message, proxy_running
from tests.support import SmtpSink

PASSWORD = "s3cret-Pa55word"
WRONG = "wr0ng-Guess-123"
TYPED_IN_CLEAR = "typed-in-clear-777"
STRAY = "stray-credential-42"


def secrets_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every log line that carries one of the test's secrets, in clear or base64."""
    forms = []
    for secret in (PASSWORD, WRONG, TYPED_IN_CLEAR, STRAY):
        forms.append(secret)
        for blob in (secret.encode(), f"\0app\0{secret}".encode()):
            encoded = base64.b64encode(blob).decode()
            forms += [encoded, encoded.upper(), encoded.rstrip("=")]
    return [r.getMessage() for r in caplog.records if any(form in r.getMessage() for form in forms)]


def auth_attempts(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        reader = conn.makefile("rb")

        def say(line: str) -> bytes:
            conn.sendall(line.encode() + b"\r\n")
            reply = reader.readline()
            while reply[3:4] == b"-":
                reply = reader.readline()
            return reply[:3]

        reader.readline()
        assert say("EHLO app.example") == b"250"
        plain = base64.b64encode(f"\0app\0{WRONG}".encode()).decode()
        assert say(f"AUTH PLAIN {plain}") == b"535"  # the initial response is a credential
        assert say("AUTH LOGIN") == b"334"
        assert say(base64.b64encode(b"app").decode()) == b"334"
        assert say(TYPED_IN_CLEAR) == b"501"  # a password not in base64: aiosmtpd logs it at DEBUG
        assert say(base64.b64encode(STRAY.encode()).decode()) == b"500"  # out of turn: an unknown command
        assert say("QUIT") == b"221"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.login("app", PASSWORD)
        smtp.send_message(html_message(["ann@example.com"]))


@pytest.mark.slow
async def test_credentials_never_reach_the_log_even_at_debug(
    tmp_path: Path, nats_url: str, sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with proxy_running(
        tmp_path, nats_url, sink, log_level="DEBUG", smtp_auth_users=f"app:{PASSWORD}"
    ) as proxy:
        await asyncio.to_thread(auth_attempts, proxy.port)
    assert len(sink.messages) == 1
    session_log = [r.getMessage() for r in caplog.records if r.name == "mail.log"]
    assert any("ann@example.com" in line for line in session_log)  # debugging shows the session ...
    assert any("AUTH PLAIN <withheld>" in line for line in session_log)
    assert secrets_in(caplog) == []  # ... but no secret, in any form


@pytest.mark.slow
async def test_addresses_stay_out_of_the_log_by_default(
    tmp_path: Path, nats_url: str, sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # the default LOG_LEVEL
    async with proxy_running(tmp_path, nats_url, sink, smtp_auth_users=f"app:{PASSWORD}") as proxy:
        await asyncio.to_thread(auth_attempts, proxy.port)
    assert len(sink.messages) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "ann@example.com" in line or "news@shop.example.com" in line]
    assert not [r for r in caplog.records if r.name == "mail.log" and r.levelno < logging.WARNING]
    assert secrets_in(caplog) == []
