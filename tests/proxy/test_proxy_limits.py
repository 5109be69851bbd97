"""SMTP limits over real sockets: sessions at once, and failed AUTH slowed down and cut off."""

from __future__ import annotations

import asyncio
import smtplib
import time
from pathlib import Path

import pytest

from smtp_proxy.session.limits import AuthTarpit
from tests.proxy.test_proxy_relay import metrics
from tests.proxy.test_proxy_smtp import client_tls, html_message, make_certificate, proxy_running
from tests.support import SmtpSink, eventually, metric_value


async def test_sessions_above_the_cap_get_421_and_a_freed_place_is_taken_again(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    async with proxy_running(tmp_path, nats_url, sink, smtp_max_connections=3) as proxy:
        before = metrics()

        def connect() -> smtplib.SMTP:
            smtp = smtplib.SMTP("127.0.0.1", proxy.port, timeout=10)
            smtp.ehlo()
            return smtp

        held = [await asyncio.to_thread(connect) for _ in range(3)]
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            await asyncio.to_thread(connect)
        assert refused.value.smtp_code == 421
        assert refused.value.smtp_error.startswith(b"4.7.0 ")
        after = metrics()
        assert (
            metric_value(after, "mailbeacon_proxy_refused_total", reason="too_many_connections")
            - metric_value(before, "mailbeacon_proxy_refused_total", reason="too_many_connections")
            == 1
        )
        # The sessions held are served as ever, and a session that ends frees its place.
        await asyncio.to_thread(held[0].send_message, html_message(["ann@example.com"]))
        await asyncio.to_thread(held.pop().quit)

        async def place_free() -> bool:
            return proxy.service.session_cap.active == 2

        await eventually(place_free)
        late = await asyncio.to_thread(connect)
        await asyncio.to_thread(late.send_message, html_message(["ben@example.com"]))
        for smtp in [*held, late]:
            await asyncio.to_thread(smtp.quit)
    assert sorted(m.recipients[0] for m in sink.messages) == ["ann@example.com", "ben@example.com"]


async def test_a_session_upgraded_with_starttls_takes_one_place_and_gives_it_back(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    async with proxy_running(
        tmp_path,
        nats_url,
        sink,
        smtp_max_connections=1,
        smtp_tls_cert_file=str(cert_file),
        smtp_tls_key_file=str(key_file),
    ) as proxy:

        def over_tls(recipient: str) -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
                smtp.starttls(context=client_tls(cert_file))
                smtp.send_message(html_message([recipient]))

        for recipient in ("ann@example.com", "ben@example.com"):  # the second gets the place back
            await asyncio.to_thread(over_tls, recipient)

            async def place_free() -> bool:
                return proxy.service.session_cap.active == 0

            await eventually(place_free)
    assert len(sink.messages) == 2


def auth_plain(smtp: smtplib.SMTP, user: str, password: str) -> tuple[int, float]:
    """One AUTH PLAIN attempt (``login()`` would try every mechanism): its code and how long it took."""
    smtp.user, smtp.password = user, password
    started = time.perf_counter()
    try:
        code, _ = smtp.auth("PLAIN", smtp.auth_plain)
    except smtplib.SMTPAuthenticationError as exc:
        code = exc.smtp_code
    return code, time.perf_counter() - started


@pytest.mark.slow
async def test_failed_auth_is_delayed_and_the_third_failure_ends_the_session(
    tmp_path: Path, nats_url: str, sink: SmtpSink
) -> None:
    delay = 0.3
    async with proxy_running(
        tmp_path,
        nats_url,
        sink,
        smtp_relay_networks="",  # everyone must log in
        smtp_auth_users="app:s3cret",
        smtp_auth_failure_delay=delay,
    ) as proxy:
        before = metrics()

        def guessing() -> list[tuple[int, float]]:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                smtp.ehlo()
                answers = [auth_plain(smtp, "app", f"guess-{n}") for n in range(3)]
                with pytest.raises(smtplib.SMTPServerDisconnected):
                    smtp.noop()  # the proxy hung up after the third
                return answers

        def logging_in() -> list[tuple[int, float]]:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                smtp.ehlo()
                answers = [auth_plain(smtp, "app", "typo"), auth_plain(smtp, "app", "s3cret")]
                smtp.send_message(html_message(["ann@example.com"]))
                return answers

        guesses = await asyncio.to_thread(guessing)
        assert [code for code, _ in guesses] == [535, 535, 421]
        tarpit = AuthTarpit(first_delay=delay)
        for failures, (_, took) in enumerate(guesses, start=1):
            assert took >= tarpit.delay(failures) * 0.95  # 0.3, 0.6, 1.2 s: each answer waits longer
        (typo, typo_took), (ok, ok_took) = await asyncio.to_thread(logging_in)
        assert (typo, ok) == (535, 235)
        assert typo_took >= delay * 0.95
        assert ok_took < delay / 2  # the right password is answered at once, even after a typo
        after = metrics()
    assert len(sink.messages) == 1

    def grew(result: str) -> float:
        return metric_value(after, "mailbeacon_proxy_auth_total", result=result) - metric_value(
            before, "mailbeacon_proxy_auth_total", result=result
        )

    assert (grew("failure"), grew("too_many_failures"), grew("success")) == (4, 1, 1)


def test_the_tarpit_doubles_its_delay_up_to_a_bound() -> None:
    tarpit = AuthTarpit(first_delay=1.0, max_failures=3)
    assert [tarpit.delay(n) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 30.0]
    assert [tarpit.answer(n)[:3] for n in (1, 2, 3)] == ["535", "535", "421"]
    assert AuthTarpit(first_delay=0.0).delay(5) == 0.0
