"""The shared contract in `mailbeacon/`: settings, events, link signing, campaigns."""

from __future__ import annotations

from datetime import UTC, datetime
from email.header import Header
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from mailbeacon.contract import signing
from mailbeacon.contract.campaigns import (
    CampaignKey,
    CampaignSpec,
    InvalidCampaign,
    match_campaign,
    parse_manifests,
)
from mailbeacon.contract.events import Event, EventType, derived_event_id, storable_text, subject_for
from mailbeacon.contract.settings import Settings, invalid_settings, parse_listen

TID = "0b7e4c2a-4f7e-4d8e-9a51-3c1f0f7d2b11"


class TestSettings:
    def test_prefixed_variables_and_site_url_fallback(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SITE_URL", "https://track.example.com/")
        monkeypatch.setenv(
            "MAILBEACON_SECRET_KEYS",
            "new-key-0123456789abcdefghijklmnopq, old-key-0123456789abcdefghijklmnopq",
        )
        monkeypatch.setenv("MAILBEACON_TRUSTED_PROXIES", "10.0.0.0/8,192.168.0.0/16")
        settings = Settings()
        assert settings.site_url == "https://track.example.com"
        assert settings.signing_keys() == [
            b"new-key-0123456789abcdefghijklmnopq",
            b"old-key-0123456789abcdefghijklmnopq",
        ]
        assert settings.trusted_proxies == ["10.0.0.0/8", "192.168.0.0/16"]
        monkeypatch.setenv("MAILBEACON_SITE_URL", "https://t.example.org")
        assert Settings().site_url == "https://t.example.org"  # the prefixed name wins

    def test_secrets_are_not_printed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("MAILBEACON_SECRET_KEYS", "s3cr3t-signing-0123456789abcdefghij")
        monkeypatch.setenv("MAILBEACON_UPSTREAM_SMTP", "smtp://user:pa55word@relay.example.com:587")
        monkeypatch.setenv("MAILBEACON_DATABASE_URL", "postgresql://app:dbpa55@db/mail")
        shown = repr(Settings()) + str(Settings().model_dump())
        for secret in ("s3cr3t-signing", "pa55word", "dbpa55"):
            assert secret not in shown

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("MAILBEACON_SITE_URL", "track.example.com"),
            ("MAILBEACON_SMTP_LISTEN", "localhost"),
            ("MAILBEACON_UPSTREAM_PROVIDER", "sendmail"),
            ("MAILBEACON_TRUSTED_PROXIES", "10.0.0.0/33"),
            ("MAILBEACON_DEFAULT_CAMPAIGN", "Bad Namespace/x"),
        ],
    )
    def test_bad_values_fail_at_start(self, monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError):
            Settings()

    @pytest.mark.parametrize("keys", ["short", "a" * 31, f"{'n' * 40},old-short-key"])
    def test_signing_keys_shorter_than_32_characters_are_refused(
        self, monkeypatch: pytest.MonkeyPatch, keys: str
    ) -> None:
        """A short key can be found offline from one signed link; every key counts, old ones too."""
        monkeypatch.setenv("MAILBEACON_SECRET_KEYS", keys)
        with pytest.raises(ValidationError) as refused:
            Settings()
        shown = invalid_settings(refused.value)
        assert shown.startswith("MAILBEACON_SECRET_KEYS: every key must be at least 32 characters")
        assert "\n" not in shown and "short" not in shown  # one line, never the key itself
        monkeypatch.setenv("MAILBEACON_SECRET_KEYS", "k" * 32)
        assert Settings().signing_keys() == [b"k" * 32]

    def test_outbound_proxy_is_read_from_the_usual_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
        monkeypatch.setenv("NO_PROXY", "localhost, .internal,10.0.0.0/8")
        settings = Settings()
        assert settings.tracker.https_proxy == "http://proxy.internal:3128"
        assert settings.tracker.no_proxy == ["localhost", ".internal", "10.0.0.0/8"]
        monkeypatch.setenv("MAILBEACON_HTTPS_PROXY", "http://egress:8080")  # the prefixed name wins
        assert Settings().tracker.https_proxy == "http://egress:8080"
        monkeypatch.setenv("MAILBEACON_HTTPS_PROXY", "socks5://egress:1080")
        with pytest.raises(ValidationError):
            Settings()

    def test_listen_addresses(self) -> None:
        assert parse_listen("0.0.0.0:25") == ("0.0.0.0", 25)
        assert parse_listen("[::1]:8080") == ("::1", 8080)
        assert parse_listen("2525") == ("127.0.0.1", 2525)

    @pytest.mark.parametrize(
        ("listen", "loopback"),
        [
            ("127.0.0.1:8080", True),
            ("127.0.0.2:8080", True),
            ("[::1]:8080", True),
            ("localhost:8080", True),
            ("8080", True),  # a bare port binds 127.0.0.1
            ("0.0.0.0:8080", False),
            ("[::]:8080", False),
            ("10.0.0.5:8080", False),
            ("[::ffff:127.0.0.1]:8080", True),
            ("tracker.example.com:8080", False),
        ],
    )
    def test_only_loopback_listen_addresses_count_as_closed(self, listen: str, loopback: bool) -> None:
        assert Settings(tracker_listen=listen).listens_on_loopback("tracker") is loopback


class TestEvents:
    def test_round_trip_keeps_every_field(self) -> None:
        event = Event(
            event_id="sendgrid:abc",
            type=EventType.BOUNCED,
            tracking_id=TID.upper(),
            campaign="default/spring",
            recipient=" Ann@Example.COM ",
            occurred_at=datetime(2026, 11, 27, 10, 0, 0),
            ip="203.0.113.0",
            user_agent="Mozilla/5.0",
            url="https://example.com/",
            bounce_kind="hard",
            reason="550 5.1.1 no such user",
            machine=True,
            machine_kind="security_scanner",
            source="webhook:sendgrid",
            metadata={"smtp_code": 550},
        )
        again = Event.from_json(event.to_json())
        assert again == event
        assert again.tracking_id == TID  # canonical lower-case form
        assert again.recipient == "ann@example.com"
        assert again.occurred_at == datetime(2026, 11, 27, 10, tzinfo=UTC)  # naive means UTC
        assert event.subject == "mailbeacon.events.bounced" == subject_for("bounced")

    def test_rejects_what_is_not_an_event(self) -> None:
        with pytest.raises(ValidationError):
            Event(event_id="x", type="exploded")  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            Event(event_id="x", type=EventType.OPENED, tracking_id="not-a-uuid")
        with pytest.raises(ValidationError):
            Event(event_id="", type=EventType.OPENED)

    def test_derived_ids_are_stable_and_safe(self) -> None:
        assert derived_event_id("sendgrid", "abc.123") == "sendgrid:abc.123"
        odd = derived_event_id("mailgun", "id with spaces/and ünicode")
        assert odd == derived_event_id("mailgun", "id with spaces/and ünicode")
        assert odd.isascii() and " " not in odd and len(odd) < 100


class TestSigning:
    url = "https://shop.example.com/spring?utm_source=mail&id=1"

    def test_click_url_verifies_and_binds_id_and_destination(self) -> None:
        link = signing.click_url("https://t.example.com", [b"k1"], TID, self.url)
        parts = urlsplit(link)
        assert parts.path == f"/track/click/{TID}/"
        query = parse_qs(parts.query)
        assert query["url"] == [self.url]
        signature = query["sig"][0]
        assert signing.verify_click([b"k1"], TID, self.url, signature)
        assert not signing.verify_click([b"k1"], TID, "https://evil.example.net/", signature)
        other = "1b7e4c2a-4f7e-4d8e-9a51-3c1f0f7d2b11"
        assert not signing.verify_click([b"k1"], other, self.url, signature)
        assert not signing.verify_click([b"k1"], TID, self.url, "")

    def test_key_rotation(self) -> None:
        old = signing.sign_click([b"old"], TID, self.url)
        assert signing.verify_click([b"new", b"old"], TID, self.url, old)  # links already sent keep working
        assert signing.sign_click([b"new", b"old"], TID, self.url) != old  # new links use the new key
        assert not signing.verify_click([b"new"], TID, self.url, old)  # until the old key is retired

    def test_no_key_no_signature(self) -> None:
        with pytest.raises(signing.NoSigningKey):
            signing.sign_click([], TID, self.url)
        assert not signing.verify_click([], TID, self.url, "anything")

    def test_tracking_urls(self) -> None:
        assert signing.pixel_url("https://t.example.com", TID) == f"https://t.example.com/track/pixel/{TID}/"
        unsubscribe = signing.unsubscribe_url("https://t.example.com", TID)
        assert unsubscribe == f"https://t.example.com/track/unsubscribe/{TID}/"
        assert signing.is_tracking_url("https://t.example.com", unsubscribe)
        assert not signing.is_tracking_url("https://t.example.com", self.url)


class TestCampaigns:
    def test_keys(self) -> None:
        assert CampaignKey.parse("newsletter") == CampaignKey("default", "newsletter")
        assert str(CampaignKey.parse("marketing/spring.2026")) == "marketing/spring.2026"
        assert CampaignKey.from_header("Spring Sale 2026!") == CampaignKey("default", "spring-sale-2026")
        assert CampaignKey.from_header("Marketing/Black Friday") == CampaignKey("marketing", "black-friday")
        for bad in ("Marketing/x", "a/b/c", "ns/-x", "", "ns/"):
            with pytest.raises(InvalidCampaign):
                CampaignKey.parse(bad)
        with pytest.raises(InvalidCampaign):
            CampaignKey.from_header("!!!")
        # What smtplib/Python's email package put on the wire for a non-ASCII value.
        encoded = Header("Grüße/Été d'hiver", "utf-8").encode()
        assert encoded.startswith("=?utf-8?")
        assert CampaignKey.from_header(encoded) == CampaignKey("grue", "ete-d-hiver")
        assert CampaignKey.from_header("Bad NS/x") == CampaignKey("bad-ns", "x")
        # An encoded word in an unknown charset is taken as the text it is.
        assert CampaignKey.from_header("=?x-unknown?q?abc?=") == CampaignKey("default", "x-unknown-q-abc")
        with pytest.raises(InvalidCampaign):
            CampaignKey.from_header(Header("促销", "utf-8").encode())  # nothing left to name it by

    def test_manifests(self, tmp_path: Path) -> None:
        text = """
apiVersion: mailbeacon.io/v1alpha1
kind: Campaign
metadata: {name: newsletter, namespace: marketing}
spec:
  match: {senders: ["*@news.example.com"]}
  tracking: {clicks: false, unsubscribeHeader: true}
---
apiVersion: mailbeacon.io/v1alpha1
kind: Campaign
metadata: {name: receipts}
"""
        (newsletter, spec), (receipts, default_spec) = parse_manifests(text)
        assert newsletter == CampaignKey("marketing", "newsletter")
        assert spec.match.senders == ["*@news.example.com"]
        assert (spec.tracking.opens, spec.tracking.clicks, spec.tracking.unsubscribe_header) == (
            True,
            False,
            True,
        )
        assert receipts == CampaignKey("default", "receipts") and default_spec == CampaignSpec()
        assert CampaignSpec.from_json(spec.to_json()) == spec

    @pytest.mark.parametrize(
        ("text", "complaint"),
        [
            ("kind: Deployment\napiVersion: apps/v1\nmetadata: {name: x}", "is not a mailbeacon.io Campaign"),
            ("kind: Campaign\napiVersion: mailbeacon.io/v1alpha1\nmetadata: {}", "no metadata.name"),
            (
                "kind: Campaign\napiVersion: mailbeacon.io/v1alpha1\nmetadata: {name: x}\nspec: {pasued: true}",
                "invalid spec",
            ),
            ("kind: [unclosed", "not valid YAML"),
            (
                "kind: Campaign\napiVersion: mailbeacon.io/v1alpha1\nmetadata: {name: X_Y}",
                "not a DNS subdomain",
            ),
        ],
    )
    def test_bad_manifests_say_why(self, text: str, complaint: str) -> None:
        with pytest.raises(InvalidCampaign, match=complaint):
            parse_manifests(text)

    def test_matching(self) -> None:
        specs = {
            CampaignKey("marketing", "news"): CampaignSpec.model_validate(
                {"match": {"senders": ["*@news.example.com"]}}
            ),
            CampaignKey("marketing", "digest"): CampaignSpec.model_validate(
                {
                    "match": {
                        "listIds": ["digest.example.com"],
                        "headers": [{"name": "X-Kind", "value": "weekly*"}],
                    }
                }
            ),
            CampaignKey("default", "no-rules"): CampaignSpec(),
        }
        default = CampaignKey("default", "catch-all")

        def match(headers: list[tuple[str, str]], sender: str = "app@example.com") -> CampaignKey | None:
            return match_campaign(specs, headers, sender, default)

        assert match([("X-Campaign", "Spring")]) == CampaignKey("default", "spring")  # explicit header wins
        assert match([("From", "News <Team@News.Example.com>")]) == CampaignKey("marketing", "news")
        assert match([], sender="bounce@news.example.com") == CampaignKey("marketing", "news")
        digest_headers = [("List-Id", "Digest <digest.example.com>"), ("X-Kind", "weekly-1")]
        assert match(digest_headers) == CampaignKey("marketing", "digest")
        assert (
            match([("List-Id", "<digest.example.com>"), ("X-Kind", "daily")]) == default
        )  # every rule must hold
        assert match_campaign(specs, [], "x@example.com", None) is None  # no default: untracked


class TestStoreSafety:
    """What arrives from the outside is made storable by the contract itself."""

    def test_nul_characters_and_oversized_values_never_reach_the_store(self) -> None:
        event = Event(
            event_id="generic:1",
            type=EventType.BOUNCED,
            recipient="A" * 400 + "@example.com",
            reason="550\x00 no such user",
            user_agent="x" * 5000,
            machine_kind="k" * 100,
        )
        assert event.reason == "550 no such user"
        assert event.recipient is not None and len(event.recipient) == 320
        assert event.user_agent is not None and len(event.user_agent) == 1000
        assert event.machine_kind is not None and len(event.machine_kind) == 64
        assert Event.from_json(event.to_json()) == event

    def test_lone_surrogates_become_replacement_characters_everywhere(self) -> None:
        # aiohttp's reading of a non-UTF-8 header byte, and what a JSON "\ud800" escape gives.
        event = Event(
            event_id="webhook:1",
            type=EventType.BOUNCED,
            recipient="ann\udcff@example.com",
            user_agent="Mozilla \udcff\udcfe",
            reason="550 \ud800 user",
            url="https://shop.example/\udfff",
            campaign="news/\ud800",
            metadata={"k\ud800": ["\udfff", {"deep\udcff": "v\ud800", "n": 1}], "plain": "ok"},
        )
        assert event.user_agent == "Mozilla \ufffd\ufffd"
        assert (event.reason, event.url, event.campaign) == (
            "550 \ufffd user",
            "https://shop.example/\ufffd",
            "news/\ufffd",
        )
        assert event.recipient == "ann\ufffd@example.com"
        assert event.metadata == {"k\ufffd": ["\ufffd", {"deep\ufffd": "v\ufffd", "n": 1}], "plain": "ok"}
        assert Event.from_json(event.to_json()) == event  # publishable, and read back the same
        assert storable_text("user_agent", "Mozilla \udcff\x00") == "Mozilla \ufffd"
        # A lone surrogate in a provider's id still derives a stable, safe id.
        assert derived_event_id("sendgrid", "a\ud800") == derived_event_id("sendgrid", "a\ud800")

    @pytest.mark.parametrize("event_id", ["a\x00b", "a\x1fb", "a\x7f", "\ud800", "x\tb", "x\nb"])
    def test_event_ids_refuse_control_characters_and_lone_surrogates(self, event_id: str) -> None:
        with pytest.raises(ValidationError, match="event_id"):
            Event(event_id=event_id, type=EventType.BOUNCED)
        assert Event(event_id="generic:ünïcode id", type=EventType.BOUNCED).event_id == "generic:ünïcode id"

    def test_non_ascii_signature_is_simply_wrong(self) -> None:
        assert not signing.verify_click([b"k"], TID, "https://example.com/", "\u00b2\u00e9")

    def test_urls_with_credentials_are_redacted_for_logs(self) -> None:
        from mailbeacon.bus.jetstream import redact_url

        assert redact_url("nats://user:s3cret@nats.example:4222") == "nats://***@nats.example:4222"
        assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
