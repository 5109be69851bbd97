"""The chart under GitOps (issue 16, defects 1 and 2): every offline render (helm template, Argo CD,
Flux, helm-diff: ``lookup`` finds nothing) is the same, so no sync replaces the click-signing
key; pods restart when the secrets they read change; NATS credentials come from Secrets and
appear nowhere in a pod spec or in NOTES.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest

from mailbeacon.contract.settings import Settings
from tests.chart.test_helm_chart import (
    API_TOKEN,
    SIGNING_KEY,
    Manifest,
    by_kind,
    env_of,
    helm_python,
    manifests,
    pod_specs,
    render,
    validate,
    with_token,
)

COMPONENTS = ("tracker", "aggregator", "operator")
NEW_KEY = "rotated-signing-key-0123456789abcdefghij"


def test_without_a_signing_key_the_chart_refuses_to_render() -> None:
    with pytest.raises(helm_python.HelmRenderError) as refused:
        render({"secrets": {"apiTokens": [API_TOKEN]}}, token=False)
    message = str(refused.value)
    for what in ("secrets.secretKeys", "secrets.existingSecret", "openssl rand", "Argo CD", "Sealed Secrets"):
        assert what in message, what


def test_offline_renders_are_identical() -> None:
    """What Argo CD or Flux renders on every sync: nothing in it may change between two renders.
    Before, values without a key rendered a new random one each time; now they are refused."""
    bare = {"secrets": {"apiTokens": [API_TOKEN]}}
    try:
        first, second = render(bare, token=False), render(bare, token=False)
    except helm_python.HelmRenderError:
        pass  # nothing generated: refused (test_without_a_signing_key_the_chart_refuses_to_render)
    else:
        assert first == second
    values = with_token({})
    first, second = render(values), render(values)
    assert first == second
    secret = by_kind(manifests(first), "Secret")["mb-mailbeacon"]
    assert base64.b64decode(secret["data"]["secret-keys"]).decode() == SIGNING_KEY


def _checksums(values: dict[str, Any]) -> dict[str, str]:
    return {
        name: template["annotations"]["checksum/secrets"]
        for name, template, _ in pod_specs(manifests(render(values)))
        if "checksum/secrets" in template.get("annotations", {})
    }


def test_pods_restart_when_the_secrets_they_read_change() -> None:
    base = _checksums({})
    assert set(base) == {"mb-mailbeacon-tracker", "mb-mailbeacon-aggregator"}
    assert _checksums({}) == base  # no change, no restart
    for changed in (
        {"secrets": {"secretKeys": [NEW_KEY, SIGNING_KEY]}},  # a key rotation
        {"database": {"url": "postgresql://mb:new@db:5432/mb"}},
        {"secrets": {"webhookToken": "a-new-webhook-token-0123456789"}},
        {"nats": {"auth": {"method": "token", "existingSecret": "nats-token"}}},
        {"nats": {"tls": {"secretName": "nats-ca"}}},
    ):
        after = _checksums(changed)
        assert all(after[name] != base[name] for name in base), changed


@pytest.mark.parametrize(
    "url",
    [
        "nats://mailbeacon:s3cret@nats.nats.svc:4222",
        "nats://s3cret-token@nats.nats.svc:4222",
        "nats://nats-0.nats:4222,tls://mailbeacon:s3cret@nats-1.nats:4222",
    ],
)
def test_credentials_in_the_nats_url_are_refused(url: str) -> None:
    with pytest.raises(helm_python.HelmRenderError) as refused:
        render({"nats": {"url": url}})
    message = str(refused.value)
    assert "nats.auth" in message and "s3cret" not in message


NATS_LOGINS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    # method: (nats values, what each component gets: env name -> Secret key or mounted file)
    "userPassword": (
        {"auth": {"method": "userPassword", "existingSecret": "nats-login"}},
        {"MAILBEACON_NATS_USER": "secret:user", "MAILBEACON_NATS_PASSWORD": "secret:password"},
    ),
    "token": (
        {"auth": {"method": "token", "existingSecret": "nats-login"}},
        {"MAILBEACON_NATS_TOKEN": "secret:token"},
    ),
    "nkey": (
        {"auth": {"method": "nkey", "existingSecret": "nats-login"}},
        {"MAILBEACON_NATS_NKEY_SEED_FILE": "file:nats-auth:nkey-seed"},
    ),
    "creds": (
        {"auth": {"method": "creds", "existingSecret": "nats-login"}},
        {"MAILBEACON_NATS_CREDS_FILE": "file:nats-auth:creds"},
    ),
    "tls": (
        {"tls": {"secretName": "nats-tls", "clientCertificate": True}},
        {
            "MAILBEACON_NATS_CA_FILE": "file:nats-tls:ca.crt",
            "MAILBEACON_NATS_TLS_CERT_FILE": "file:nats-tls:tls.crt",
            "MAILBEACON_NATS_TLS_KEY_FILE": "file:nats-tls:tls.key",
        },
    ),
}


def _pods_with_containers(docs: list[Manifest]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(name, pod, pod["containers"][0]) for name, _, pod in pod_specs(docs)]


@pytest.mark.slow
@pytest.mark.parametrize("method", NATS_LOGINS)
def test_nats_credentials_come_from_secrets_in_every_component(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nats, wanted = NATS_LOGINS[method]
    proxy = {"enabled": True, "relayNetworks": ["10.244.0.0/16"]}
    values = {
        "nats": {"url": "nats://nats.nats.svc:4222", **nats},
        "proxy": proxy,
        "secrets": {"upstreamSmtp": "smtp://relay.example.com:587"},
    }
    docs = manifests(render(values))
    pods = _pods_with_containers(docs)
    assert {name.rsplit("-", 1)[1] for name, _, _ in pods} == {*COMPONENTS, "proxy"}
    for name, pod, container in pods:
        env = {e["name"]: e for e in container["env"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        literal: dict[str, str] = {}
        for variable, source in wanted.items():
            kind, _, where = source.partition(":")
            if kind == "secret":
                assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "nats-login", "key": where}, (
                    name
                )
            else:
                volume, key = where.split(":")
                path = env[variable]["value"]
                literal[variable] = path
                assert mounts[volume]["readOnly"] is True and path.startswith(
                    mounts[volume]["mountPath"] + "/"
                )
                item = {"key": key, "path": path.rsplit("/", 1)[1]}
                assert item in volumes[volume]["secret"]["items"], name
                assert volumes[volume]["secret"]["defaultMode"] == 0o440
        # The components accept what the chart sets (one login, files in pairs).
        with monkeypatch.context() as patched:
            for key in [k for k in os.environ if k.startswith("MAILBEACON_")]:
                patched.delenv(key)
            for key, value in literal.items():
                patched.setenv(key, value)
            if method == "userPassword":
                patched.setenv("MAILBEACON_NATS_USER", "u")
                patched.setenv("MAILBEACON_NATS_PASSWORD", "p")
            Settings()
    for doc in docs:
        validate(doc)


def test_no_credential_is_in_a_pod_spec_or_in_notes() -> None:
    """Before: the password rode in nats.url, a plain env value in every Deployment and in NOTES."""
    values = {
        "nats": {
            "url": "nats://nats.nats.svc:4222",
            "auth": {"method": "userPassword", "existingSecret": "nats-login"},
        }
    }
    rendered = render(values)
    notes = rendered["mailbeacon/templates/NOTES.txt"]
    assert "nats://nats.nats.svc:4222" in notes and "userPassword of Secret nats-login" in notes
    for name, _, pod in pod_specs(manifests(rendered)):
        for container in pod["containers"]:
            for env in container["env"]:
                if env["name"].startswith("MAILBEACON_NATS_") and env["name"] not in ("MAILBEACON_NATS_URL",):
                    assert "value" not in env or env["value"].startswith("/etc/mailbeacon/"), (name, env)


@pytest.mark.parametrize(
    ("nats", "complaint"),
    [
        ({"auth": {"method": "token"}}, "needs nats.auth.existingSecret"),
        ({"auth": {"existingSecret": "nats-login"}}, "nats.auth.method is none"),
    ],
)
def test_half_a_nats_login_is_refused(nats: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=complaint):
        render({"nats": nats})


def test_existing_secret_keeps_the_chart_from_making_one() -> None:
    docs = manifests(render({"secrets": {"existingSecret": "mailbeacon-secrets"}}))
    assert not by_kind(docs, "Secret")
    tracker = env_of(docs, "mb-mailbeacon-tracker")
    assert tracker["MAILBEACON_SECRET_KEYS"]["secretKeyRef"]["name"] == "mailbeacon-secrets"
