"""The chart never puts forgeable webhooks on the internet, and the tracker behind its Ingress
sees the recipients' addresses, not the ingress controller's.

The tracker in its pod listens beyond loopback, so it refuses the generic webhooks without
their token and Postmark's without its basic auth (docs/tracker.md "ESP webhooks"), unless
tracker.webhooks.allowUnauthenticated. With the Ingress enabled the chart goes further: it
refuses to render without those credentials unless the operator opts out.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailbeacon.contract.settings import Settings
from mailbeacon.contract.signing import pixel_url
from tests.chart.test_helm_chart import (
    RELAY,
    Manifest,
    by_kind,
    env_of,
    helm_python,
    manifests,
    render,
    validate,
)
from tests.esp_payloads.harness import BROWSER_UA, running_tracker, stream_events
from tests.support import eventually
from tracker.webhooks.webhook_limits import credentials_required, missing_credentials

INGRESS: dict[str, Any] = {"ingress": {"enabled": True, "className": "nginx"}}
TOKEN = "4f7c0c1e9b2d4a51a8e3f6b7c9d0e1f2"
POSTMARK = "postmark:s3cret-pass"
TID = "9d1f3c1e-8b0a-4e7e-a3c4-2b6f0e9d7a10"


def tracker_env(docs: list[Manifest]) -> dict[str, Any]:
    return env_of(docs, "mb-mailbeacon-tracker")


def ingress_paths(docs: list[Manifest]) -> dict[str, str]:
    ingress = by_kind(docs, "Ingress")["mb-mailbeacon-tracker"]
    return {p["path"]: p["pathType"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}


def resolved_env(docs: list[Manifest]) -> dict[str, str]:
    """The tracker container's environment as the kubelet would build it from the chart's Secret."""
    secrets = {name: doc.get("data", {}) for name, doc in by_kind(docs, "Secret").items()}
    env: dict[str, str] = {}
    for name, value in tracker_env(docs).items():
        if isinstance(value, str):
            env[name] = value
            continue
        ref = value["secretKeyRef"]
        data = secrets[ref["name"]]
        if ref["key"] in data:
            env[name] = base64.b64decode(data[ref["key"]]).decode()
        else:
            assert ref["optional"], f"{name}: the pod would not start without {ref['key']}"
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    with monkeypatch.context() as patched:
        for key in [k for k in os.environ if k.startswith("MAILBEACON_")]:
            patched.delenv(key)
        for key, value in env.items():
            patched.setenv(key, value)
        return Settings()


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        # The generic webhooks (/track/bounce/ ...) ride on /track/: no token, no Ingress.
        ({"tracker": INGRESS}, "set secrets.webhookToken"),
        ({"tracker": {**INGRESS, "webhooks": {"allowUnauthenticated": False}}}, "/track/bounce/"),
        # Postmark in use (asked for, or the shared proxy relays through it) without basic auth.
        (
            {
                "tracker": {**INGRESS, "webhooks": {"postmark": {"enabled": True}}},
                "secrets": {"webhookToken": TOKEN},
            },
            "set secrets.postmarkBasicAuth",
        ),
        (
            {
                "tracker": INGRESS,
                "secrets": {"webhookToken": TOKEN, "upstreamSmtp": RELAY},
                "proxy": {
                    "enabled": True,
                    "upstreamProvider": "postmark",
                    "relayNetworks": ["10.244.0.0/16"],
                },
            },
            "routes Postmark's webhook (/webhooks/postmark)",
        ),
    ],
)
def test_exposed_webhooks_without_credentials_refuse_to_render(
    values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError) as refused:
        render(values)
    message = str(refused.value)
    assert complaint in message and "tracker.webhooks.allowUnauthenticated=true" in message


def test_without_the_ingress_the_pods_start_and_the_tracker_refuses_unauthenticated_webhooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside the cluster only, no credential is demanded of the pods: they start, and the
    tracker (on 0.0.0.0) answers the generic and Postmark webhooks 503 until one is set."""
    docs = manifests(render())
    env = tracker_env(docs)
    assert env["MAILBEACON_WEBHOOK_TOKEN"]["secretKeyRef"]["optional"] is True
    assert env["MAILBEACON_POSTMARK_BASIC_AUTH"]["secretKeyRef"]["optional"] is True
    assert "webhook-token" not in by_kind(docs, "Secret")["mb-mailbeacon"]["data"]
    settings = settings_from(resolved_env(docs), monkeypatch)
    assert not settings.tracker.allow_unauthenticated_webhooks and credentials_required(settings)
    assert any("MAILBEACON_WEBHOOK_TOKEN" in route for route in missing_credentials(settings))


def test_the_opt_out_and_the_limits_reach_the_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "tracker": {
            "webhooks": {"allowUnauthenticated": True, "maxJsonDepth": 32},
            "headerTimeoutSeconds": 5,
            "maxConnections": 2000,
        }
    }
    settings = settings_from(resolved_env(manifests(render(values))), monkeypatch)
    assert settings.tracker.allow_unauthenticated_webhooks and not credentials_required(settings)
    assert settings.tracker.max_json_depth == 32
    assert settings.tracker.header_timeout_seconds == 5
    assert settings.tracker.max_connections == 2000
    defaults = settings_from(resolved_env(manifests(render())), monkeypatch)
    assert (defaults.tracker.max_json_depth, defaults.tracker.header_timeout_seconds) == (64, 10)
    assert defaults.tracker.max_connections == 10_000


@pytest.mark.slow
def test_token_reaches_the_secret_and_the_tracker_requires_it() -> None:
    docs = manifests(render({"tracker": INGRESS, "secrets": {"webhookToken": TOKEN}}))
    secret = by_kind(docs, "Secret")["mb-mailbeacon"]
    assert base64.b64decode(secret["data"]["webhook-token"]).decode() == TOKEN
    assert tracker_env(docs)["MAILBEACON_WEBHOOK_TOKEN"]["secretKeyRef"] == {
        "name": "mb-mailbeacon",
        "key": "webhook-token",
        "optional": False,
    }
    # Postmark is not in use: its webhook is not routed, so nobody outside can post to it.
    assert ingress_paths(docs) == {
        "/track/": "Prefix",
        "/webhooks/sendgrid": "Exact",
        "/webhooks/mailgun": "Exact",
        "/webhooks/ses": "Exact",
    }
    for doc in docs:
        validate(doc)


def test_postmark_credential_routes_its_webhook_and_is_required() -> None:
    values = {"tracker": INGRESS, "secrets": {"webhookToken": TOKEN, "postmarkBasicAuth": POSTMARK}}
    docs = manifests(render(values))
    assert ingress_paths(docs)["/webhooks/postmark"] == "Exact"
    secret = by_kind(docs, "Secret")["mb-mailbeacon"]
    assert base64.b64decode(secret["data"]["postmark-basic-auth"]).decode() == POSTMARK
    assert tracker_env(docs)["MAILBEACON_POSTMARK_BASIC_AUTH"]["secretKeyRef"]["optional"] is False


def test_an_existing_secret_must_hold_the_keys_or_the_pod_does_not_start() -> None:
    """The chart cannot look into a Secret it does not make: the pod's env requires the keys,
    so a missing one stops the tracker (CreateContainerConfigError) instead of opening it."""
    values = {
        "tracker": {**INGRESS, "webhooks": {"postmark": {"enabled": True}}},
        "secrets": {"existingSecret": "mailbeacon-secrets"},
    }
    docs = manifests(render(values))
    env = tracker_env(docs)
    for name, key in (
        ("MAILBEACON_WEBHOOK_TOKEN", "webhook-token"),
        ("MAILBEACON_POSTMARK_BASIC_AUTH", "postmark-basic-auth"),
    ):
        assert env[name]["secretKeyRef"] == {"name": "mailbeacon-secrets", "key": key, "optional": False}
    assert "/webhooks/postmark" in ingress_paths(docs)
    # Signed providers stay optional: the tracker refuses their webhooks without the key.
    assert env["MAILBEACON_SENDGRID_PUBLIC_KEY"]["secretKeyRef"]["optional"] is True


def test_the_operator_may_opt_out_and_is_warned() -> None:
    values = {"tracker": {**INGRESS, "webhooks": {"allowUnauthenticated": True}}}
    rendered = render(values)
    docs = manifests(rendered)
    assert "/track/" in ingress_paths(docs)
    assert tracker_env(docs)["MAILBEACON_WEBHOOK_TOKEN"]["secretKeyRef"]["optional"] is True
    notes = rendered["mailbeacon/templates/NOTES.txt"]
    assert "WARNING: tracker.webhooks.allowUnauthenticated=true: the generic webhooks accept" in notes
    # With the credentials given there is nothing open to warn about.
    secured = {**values, "secrets": {"webhookToken": TOKEN}, "config": {"trustedProxies": ["10.244.0.0/16"]}}
    assert "WARNING" not in render(secured)["mailbeacon/templates/NOTES.txt"].split("Tracker")[1]


def test_notes_warn_when_the_ingress_hides_the_clients_addresses() -> None:
    exposed = {"tracker": INGRESS, "secrets": {"webhookToken": TOKEN}}
    notes = render(exposed)["mailbeacon/templates/NOTES.txt"]
    assert "WARNING: config.trustedProxies is empty" in notes and "10.244.0.0/16" in notes
    trusted = {**exposed, "config": {"trustedProxies": ["10.244.0.0/16"]}}
    assert "trustedProxies" not in render(trusted)["mailbeacon/templates/NOTES.txt"]
    # Without an Ingress the tracker's peer is the client (or whatever routes it): no warning.
    assert "trustedProxies" not in render()["mailbeacon/templates/NOTES.txt"]


@pytest.mark.parametrize("everyone", ["0.0.0.0/0", "::/0"])
def test_trusting_every_address_is_refused(everyone: str) -> None:
    """Trusting everyone would let any client write its own X-Forwarded-For."""
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render({"config": {"trustedProxies": [everyone]}})
    assert "/config/trustedProxies/0" in str(refused.value)


async def test_the_tracker_as_deployed_refuses_forged_bounces_and_sees_real_clients(
    tmp_path: Path, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod's environment, resolved against the chart's Secret, configures a real tracker:
    a bounce without the token is refused, and X-Forwarded-For from the trusted ingress
    controller (here loopback, the test client's address) gives the recipient's address."""
    values = {
        "tracker": INGRESS,
        "secrets": {"webhookToken": TOKEN},
        "config": {"trustedProxies": ["127.0.0.0/8", "10.244.0.0/16"]},
    }
    settings = settings_from(resolved_env(manifests(render(values))), monkeypatch)
    assert settings.trusted_proxies == ["127.0.0.0/8", "10.244.0.0/16"]
    assert settings.tracker.webhook_token is not None
    overrides = {"webhook_token": settings.tracker.webhook_token, "trusted_proxies": settings.trusted_proxies}
    bounce = {"tracking_id": TID, "bounce_type": "hard", "reason": "550 5.1.1 user unknown"}
    async with (
        running_tracker(tmp_path, nats_url, **overrides) as tracker,
        aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as http,
    ):
        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            async with http.post(f"{tracker.url}/track/bounce/", json=bounce, headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["error"]
        async with http.post(
            f"{tracker.url}/track/bounce/", json=bounce, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as response:
            assert response.status == 200
        async with http.get(
            pixel_url(tracker.settings.site_url, TID), headers={"X-Forwarded-For": "198.51.100.77"}
        ) as response:
            assert response.status == 200

        async def stored() -> list[Any]:
            events = await stream_events(nats_url)
            assert len(events) == 2
            return events

        events = await eventually(stored)
    assert [e.type.value for e in events] == ["bounced", "opened"]
    assert events[1].ip == "198.51.100.77"
