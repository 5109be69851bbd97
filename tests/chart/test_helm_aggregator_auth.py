"""The chart protects the aggregator's API and pages by default (issue 14, finding 5).

Rendered with default values it stops with a message naming the values to set (a token
generated at render time would change with every `helm template`, Argo CD or Flux render);
tokens come from values or an existing Secret, the operator gets a read token, an auth
proxy's header needs the proxy's addresses, and the opt-out is explicit and warned about.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest

from aggregator.auth.policy import Access, AuthPolicy, policy_from_settings
from mailbeacon.contract.settings import Settings
from tests.chart.test_helm_chart import (
    PRODUCTION,
    SIGNING_KEY,
    Manifest,
    by_kind,
    env_of,
    helm_python,
    manifests,
    render,
    validate,
)

FULL = ["full-token-aaaaaaaaaaaaaaaaaaaaaaaa", "full-token-bbbbbbbbbbbbbbbbbbbbbbbb"]
READ = ["read-token-cccccccccccccccccccccccc"]
AGGREGATOR, OPERATOR = "mb-mailbeacon-aggregator", "mb-mailbeacon-operator"


def resolved(docs: list[Manifest], deployment: str) -> dict[str, str]:
    """A container's environment as the kubelet builds it from the chart's Secret."""
    data = {name: doc.get("data", {}) for name, doc in by_kind(docs, "Secret").items()}
    env: dict[str, str] = {}
    for name, value in env_of(docs, deployment).items():
        if isinstance(value, str):
            env[name] = value
            continue
        ref = value["secretKeyRef"]
        if ref["key"] in data.get(ref["name"], {}):
            env[name] = base64.b64decode(data[ref["name"]][ref["key"]]).decode()
        else:
            assert ref["optional"], f"{deployment}: the pod would not start without {ref['key']}"
    return env


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    with monkeypatch.context() as patched:
        for key in [k for k in os.environ if k.startswith("MAILBEACON_")]:
            patched.delenv(key)
        for key, value in env.items():
            patched.setenv(key, value)
        return Settings()


def test_the_aggregator_needs_credentials_by_default() -> None:
    with pytest.raises(helm_python.HelmRenderError) as refused:
        render({"secrets": {"secretKeys": [SIGNING_KEY]}}, token=False)  # only the token missing
    message = str(refused.value)
    for value in ("secrets.apiTokens", "secrets.existingSecret", "aggregator.auth.proxyHeader", "mode=none"):
        assert value in message
    assert "recipients' addresses" in message


@pytest.mark.slow
def test_tokens_given_as_values(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = manifests(render({"secrets": {"apiTokens": FULL, "apiReadTokens": READ}}))
    for doc in docs:
        validate(doc)
        if doc["kind"] == "Deployment":
            assert not any(token in json.dumps(doc) for token in FULL + READ)  # only references
    secret = by_kind(docs, "Secret")["mb-mailbeacon"]["data"]
    assert base64.b64decode(secret["api-tokens"]).decode() == ",".join(FULL)
    assert base64.b64decode(secret["api-read-tokens"]).decode() == READ[0]

    aggregator = settings_of(resolved(docs, AGGREGATOR), monkeypatch)
    assert aggregator.aggregator.listen == "0.0.0.0:8090"
    policy = policy_from_settings(aggregator)  # the pod starts: beyond loopback, with tokens
    assert [c.access for c in policy.credentials] == [Access.FULL, Access.FULL, Access.READ]
    assert not policy.open

    # The operator gets the read-only token and nothing more.
    operator_env = resolved(docs, OPERATOR)
    assert "MAILBEACON_API_TOKENS" not in operator_env
    assert settings_of(operator_env, monkeypatch).aggregator.client_token(read_only=True) == READ[0]
    only_full = manifests(render({"secrets": {"apiTokens": FULL}}))
    assert (
        settings_of(resolved(only_full, OPERATOR), monkeypatch).aggregator.client_token(read_only=True)
        == FULL[0]
    )

    # Another token restarts the operator (the aggregator's pods follow secrets as before).
    def annotations(values: dict[str, Any]) -> list[dict[str, str]]:
        deployments = by_kind(manifests(render(values)), "Deployment")
        return [deployments[d]["spec"]["template"]["metadata"]["annotations"] for d in (AGGREGATOR, OPERATOR)]

    before = annotations({"secrets": {"apiTokens": FULL, "apiReadTokens": READ}})
    after = annotations({"secrets": {"apiTokens": FULL, "apiReadTokens": [READ[0] + "x"]}})
    assert before[0] != after[0] and before[1] != after[1]


def test_tokens_from_an_existing_secret() -> None:
    docs = manifests(render(PRODUCTION))
    for deployment in (AGGREGATOR, OPERATOR):
        env = env_of(docs, deployment)
        for name, key in (
            ("MAILBEACON_API_TOKENS", "api-tokens"),
            ("MAILBEACON_API_READ_TOKENS", "api-read-tokens"),
        ):
            # Either key will do: an aggregator with neither refuses to start, naming them.
            assert env[name]["secretKeyRef"] == {"name": "mailbeacon-secrets", "key": key, "optional": True}


def test_behind_an_authenticating_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = {"proxyHeader": "X-Forwarded-Email", "trustedProxies": ["127.0.0.1/32"]}
    docs = manifests(render({"aggregator": {"auth": auth}, "secrets": {"apiReadTokens": READ}}))
    env = resolved(docs, AGGREGATOR)
    assert env["MAILBEACON_AUTH_PROXY_HEADER"] == "X-Forwarded-Email"
    assert env["MAILBEACON_TRUSTED_PROXIES"] == "127.0.0.1/32"
    policy = policy_from_settings(settings_of(env, monkeypatch))
    assert policy.proxy_header == "X-Forwarded-Email" and policy.trusts("127.0.0.1")
    # Without the operator nothing needs a token.
    alone = manifests(render({"aggregator": {"auth": auth}, "operator": {"enabled": False}}))
    assert "MAILBEACON_API_TOKENS" not in env_of(alone, AGGREGATOR)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (
            {"aggregator": {"auth": {"proxyHeader": "X-Forwarded-Email"}}},
            "only from aggregator.auth.trustedProxies",
        ),
        (
            {
                "aggregator": {
                    "auth": {"proxyHeader": "X-Forwarded-Email", "trustedProxies": ["127.0.0.1/32"]}
                }
            },
            "set secrets.apiReadTokens",
        ),
        ({"aggregator": {"auth": {"mode": "none"}}, "secrets": {"apiTokens": FULL}}, "contradicts"),
    ],
)
def test_values_that_leave_the_aggregator_open_or_unusable_fail(
    values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError) as refused:
        render(values)
    assert complaint in str(refused.value)


def test_the_opt_out_is_explicit_and_warned_about() -> None:
    rendered = render({"aggregator": {"auth": {"mode": "none"}}})
    docs = manifests(rendered)
    aggregator = env_of(docs, AGGREGATOR)
    assert aggregator["MAILBEACON_API_AUTH"] == "none"
    assert not {"MAILBEACON_API_TOKENS", "MAILBEACON_API_READ_TOKENS"} & set(aggregator)
    assert not {"MAILBEACON_API_TOKENS", "MAILBEACON_API_READ_TOKENS"} & set(env_of(docs, OPERATOR))
    notes = rendered["mailbeacon/templates/NOTES.txt"]
    assert "WARNING: aggregator.auth.mode=none" in notes
    assert "WARNING: aggregator.auth" not in render({})["mailbeacon/templates/NOTES.txt"]
    assert AuthPolicy().open


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"secrets": {"apiTokens": ["short-token"]}}, "/secrets/apiTokens/0"),
        ({"secrets": {"apiReadTokens": ["with,comma-0123456789abcdefghij"]}}, "/secrets/apiReadTokens/0"),
        ({"secrets": {"apiTokens": ["with space-0123456789abcdefghij"]}}, "/secrets/apiTokens/0"),
        ({"aggregator": {"auth": {"mode": "open"}}}, "/aggregator/auth/mode"),
        ({"aggregator": {"auth": {"proxyHeader": "X Email"}}}, "/aggregator/auth/proxyHeader"),
        ({"aggregator": {"auth": {"trustedProxies": ["0.0.0.0/0"]}}}, "/aggregator/auth/trustedProxies/0"),
    ],
)
def test_bad_auth_values_are_refused_by_the_schema(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(values)
    assert complaint in str(refused.value)
