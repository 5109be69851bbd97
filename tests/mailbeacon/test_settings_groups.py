"""Settings grouped by component, read from the same flat variables as ever.

Every variable is walked from the model (``Settings.variables()``), so a setting added
later is checked too: it must land in exactly its own field, by its variable and by its
flat keyword, and a bad value must be refused naming that variable.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from mailbeacon.contract.settings import Settings, Variable, invalid_settings

# Variables whose value needs a particular shape; every other one gets a value made from its
# type (below). Each maps to (what is set, what the field then holds, secrets unwrapped).
SHAPED: dict[str, tuple[str, Any]] = {
    "MAILBEACON_SITE_URL": ("https://t.example.com/", "https://t.example.com"),
    "SITE_URL": ("https://t.example.com/", "https://t.example.com"),
    "MAILBEACON_SECRET_KEYS": (f"{'n' * 32}, {'o' * 33}", ["n" * 32, "o" * 33]),
    "MAILBEACON_TRUSTED_PROXIES": ("10.0.0.0/8, 192.168.0.0/16", ["10.0.0.0/8", "192.168.0.0/16"]),
    "MAILBEACON_SMTP_LISTEN": ("0.0.0.0:25", "0.0.0.0:25"),
    "MAILBEACON_PROXY_HTTP_LISTEN": ("127.0.0.1:1", "127.0.0.1:1"),
    "MAILBEACON_TRACKER_LISTEN": ("[::1]:2", "[::1]:2"),
    "MAILBEACON_AGGREGATOR_LISTEN": ("3", "3"),
    "MAILBEACON_OPERATOR_LISTEN": ("127.0.0.1:4", "127.0.0.1:4"),
    "MAILBEACON_INJECTION_LISTEN": ("0.0.0.0:9443", "0.0.0.0:9443"),
    "MAILBEACON_AGGREGATOR_URL": ("http://agg:8090/", "http://agg:8090"),
    "MAILBEACON_AUTH_PROXY_HEADER": ("X-Forwarded-Email", "X-Forwarded-Email"),
    "MAILBEACON_API_AUTH": ("none", "none"),
    "MAILBEACON_UPSTREAM_PROVIDER": ("ses", "ses"),
    "MAILBEACON_DEFAULT_CAMPAIGN": ("shop/news", "shop/news"),
    "MAILBEACON_SMTP_RELAY_NETWORKS": ("10.0.0.0/8", ["10.0.0.0/8"]),
    "MAILBEACON_SMTP_AUTH_NETWORKS": ("::1/128, 10.1.0.0/16", ["::1/128", "10.1.0.0/16"]),
    "MAILBEACON_MACHINE_IP_RANGES": ("192.0.2.0/24", ["192.0.2.0/24"]),
    "MAILBEACON_HTTPS_PROXY": ("http://proxy:3128", "http://proxy:3128"),
    "HTTPS_PROXY": ("http://proxy:3128", "http://proxy:3128"),
    "MAILBEACON_INJECTION_TEMPLATE": ('{"initContainer": {"name": "mb"}}', {"initContainer": {"name": "mb"}}),
}
# Settings that only come in pairs (the NATS login and client certificate).
PARTNERS = {
    "MAILBEACON_NATS_USER": "MAILBEACON_NATS_PASSWORD",
    "MAILBEACON_NATS_PASSWORD": "MAILBEACON_NATS_USER",
    "MAILBEACON_NATS_TLS_CERT_FILE": "MAILBEACON_NATS_TLS_KEY_FILE",
    "MAILBEACON_NATS_TLS_KEY_FILE": "MAILBEACON_NATS_TLS_CERT_FILE",
}
UNPREFIXED = ("SITE_URL", "HTTPS_PROXY", "NO_PROXY")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.upper().startswith("MAILBEACON_") or key.upper() in UNPREFIXED:
            monkeypatch.delenv(key)
    return monkeypatch


def plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def leaves(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every setting's path and value, secrets unwrapped."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", plain(value)


def by_name(name: str) -> Variable:
    return next(variable for variable in Settings.variables() if name in variable.names)


def sample(name: str) -> tuple[str, Any]:
    """A value for a variable, unlike its default, and what the field holds then."""
    if name in SHAPED:
        return SHAPED[name]
    variable = by_name(name)
    info, word = variable.info, variable.keyword
    kind = value_type(variable)
    bounds = {key: getattr(rule, key) for rule in info.metadata for key in ("ge", "gt") if hasattr(rule, key)}
    low = bounds.get("ge", bounds.get("gt", 0))
    if kind is bool:
        return ("false", False) if info.default is True else ("true", True)
    if kind in (int, float):
        number = next(n for n in (low + 2, low + 3) if n != info.default)  # unlike the default
        return str(number), number
    if kind is Path:
        return f"/srv/{word}", Path(f"/srv/{word}")
    if kind in (str, SecretStr):
        return f"value-of-{word}", f"value-of-{word}"
    if typing.get_origin(kind) is list:
        return f"one-{word}, two-{word}", [f"one-{word}", f"two-{word}"]
    raise AssertionError(f"{name}: add a sample value to SHAPED")


def value_type(variable: Variable) -> Any:
    """The field's type, without the None of an optional one."""
    annotation = variable.info.annotation
    if isinstance(annotation, types.UnionType):
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def every_name() -> list[str]:
    return [name for variable in Settings.variables() for name in variable.names]


def changed(settings: Settings) -> dict[str, Any]:
    """The settings that differ from the defaults (built without reading the environment)."""
    defaults = dict(leaves(Settings.model_construct()))
    return {path: value for path, value in leaves(settings) if value != defaults[path]}


def test_the_model_lists_every_setting_once_with_its_variables() -> None:
    found = Settings.variables()
    assert len(found) == len({v.path for v in found}) == len({v.keyword for v in found}) >= 96  # none lost
    names = every_name()
    assert len(names) == len(set(names))  # no variable sets two fields
    groups = {v.group for v in found if v.group}
    assert groups == {"nats", "proxy", "tracker", "aggregator", "operator"}
    assert not groups & {v.keyword for v in found}  # a flat keyword is never a group's name
    for group in groups:
        assert type(getattr(Settings(), group)).__doc__, group  # the configuration docs show it
    # The names users know (README, Helm chart) are the variables of these fields.
    assert by_name("MAILBEACON_TRACKER_LISTEN").path == "tracker.listen"
    assert by_name("MAILBEACON_NATS_URL").path == "nats.url"
    assert by_name("MAILBEACON_PROXY_HTTP_LISTEN").path == "proxy.http_listen"
    assert by_name("MAILBEACON_OPERATOR_NAMESPACES").path == "operator.namespaces"
    assert by_name("NO_PROXY").names == ("MAILBEACON_NO_PROXY", "NO_PROXY")


@pytest.mark.parametrize("name", every_name())
def test_every_variable_lands_in_its_own_field(clean_env: pytest.MonkeyPatch, name: str) -> None:
    variable = by_name(name)
    raw, expected = sample(name)
    clean_env.setenv(name, raw)
    expect = {variable.path: expected}
    if name in PARTNERS:
        partner = by_name(PARTNERS[name])
        clean_env.setenv(PARTNERS[name], sample(PARTNERS[name])[0])
        expect[partner.path] = sample(PARTNERS[name])[1]
    from_env = Settings()
    assert changed(from_env) == expect
    # Read whatever the case, as before (a shell's https_proxy, say).
    clean_env.delenv(name)
    clean_env.setenv(name.lower(), raw)
    assert changed(Settings()) == expect
    clean_env.delenv(name.lower())
    # The same value as a flat keyword argument lands in the same field (JSON is for the
    # environment: a keyword takes the dict itself).
    keywords = {
        by_name(n).keyword: raw if not isinstance(value, dict) else value
        for n in (name, PARTNERS.get(name))
        if n
        for raw, value in [sample(n)]
    }
    for partner_name in [PARTNERS[name]] if name in PARTNERS else []:
        clean_env.delenv(partner_name)
    assert changed(Settings(**keywords)) == expect


def test_the_prefixed_variable_wins_over_the_plain_one(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTPS_PROXY", "http://plain:3128")
    clean_env.setenv("NO_PROXY", "plain.example")
    assert Settings().tracker.https_proxy == "http://plain:3128"
    clean_env.setenv("MAILBEACON_HTTPS_PROXY", "http://prefixed:3128")
    clean_env.setenv("MAILBEACON_NO_PROXY", "prefixed.example")
    settings = Settings()
    assert (settings.tracker.https_proxy, settings.tracker.no_proxy) == (
        "http://prefixed:3128",
        ["prefixed.example"],
    )


def test_unknown_and_misspelt_variables_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {
        # A group's own name is no variable: never read, not even as JSON.
        "MAILBEACON_TRACKER": '{"listen": "0.0.0.0:1"}',
        "MAILBEACON_NATS": "not json at all",
        "MAILBEACON_PROXY": "{",
        # A field's name within its group is not its variable.
        "MAILBEACON_LISTEN": "0.0.0.0:1",
        "MAILBEACON_URL": "nats://elsewhere:4222",
        "MAILBEACON_STATUS_INTERVAL": "not a number",
        "MAILBEACON_TRACKER__LISTEN": "0.0.0.0:1",
        # Typos, and the variables Kubernetes adds for a Service named mailbeacon-tracker.
        "MAILBEACON_TRACKER_LISTNE": "0.0.0.0:1",
        "MAILBEACON_TRACKER_PORT": "tcp://10.0.0.1:8080",
        "MAILBEACON_TRACKER_SERVICE_HOST": "10.0.0.1",
    }.items():
        clean_env.setenv(name, value)
    assert changed(Settings()) == {}
    assert changed(Settings(tracker_listne="0.0.0.0:1", listen="0.0.0.0:1", url="x")) == {}


def test_keywords_given_flat_or_nested_and_which_wins(clean_env: pytest.MonkeyPatch) -> None:
    flat = Settings(tracker_listen="0.0.0.0:1", nats_url="nats://a:4222", secret_keys="k" * 32)
    nested = Settings(tracker={"listen": "0.0.0.0:1"}, nats={"url": "nats://a:4222"}, secret_keys="k" * 32)
    assert (
        changed(flat)
        == changed(nested)
        == {
            "tracker.listen": "0.0.0.0:1",
            "nats.url": "nats://a:4222",
            "secret_keys": ["k" * 32],
        }
    )
    # Both at once: the flat keyword, as the environment and the tests spell it, wins.
    both = Settings(tracker={"listen": "0.0.0.0:1", "anonymize_ip": True}, tracker_listen="0.0.0.0:2")
    assert (both.tracker.listen, both.tracker.anonymize_ip) == ("0.0.0.0:2", True)
    # Keywords beat the environment, which beats the defaults, flat or nested alike.
    clean_env.setenv("MAILBEACON_TRACKER_LISTEN", "0.0.0.0:3")
    clean_env.setenv("MAILBEACON_ANONYMIZE_IP", "true")
    assert Settings().tracker.listen == "0.0.0.0:3"
    assert Settings(tracker_listen="0.0.0.0:4").tracker.listen == "0.0.0.0:4"
    from_both = Settings(tracker={"listen": "0.0.0.0:5"})
    assert (from_both.tracker.listen, from_both.tracker.anonymize_ip) == ("0.0.0.0:5", True)


def test_only_what_was_given_counts_as_told(clean_env: pytest.MonkeyPatch) -> None:
    """A proxy sidecar not told the stream's retention leaves it alone (mailbeacon.bus.jetstream)."""
    assert Settings().nats.model_fields_set == set()
    assert Settings(stream_max_age_days=7).nats.model_fields_set == {"stream_max_age_days"}
    clean_env.setenv("MAILBEACON_STREAM_DUPLICATE_WINDOW_SECONDS", "60")
    assert Settings(nats_url="nats://a:4222").nats.model_fields_set == {
        "url",
        "stream_duplicate_window_seconds",
    }


def test_model_copy_updates_nested_fields_flat_or_nested() -> None:
    original = Settings(nats_url="nats://a:4222", proxy_http_listen="127.0.0.1:1")
    copy = original.model_copy(
        update={
            "nats_url": "nats://b:4222",
            "secret_keys": [SecretStr("k" * 32)],
            "upstream_smtp": SecretStr("smtp://outbox:25"),
            "aggregator": {"outbox_dir": Path("/srv/outbox"), "migrate_on_start": True},
        }
    )
    assert changed(copy) == {
        "nats.url": "nats://b:4222",
        "secret_keys": ["k" * 32],
        "proxy.http_listen": "127.0.0.1:1",
        "proxy.upstream_smtp": "smtp://outbox:25",
        "aggregator.outbox_dir": Path("/srv/outbox"),
        "aggregator.migrate_on_start": True,
    }
    assert changed(original) == {"nats.url": "nats://a:4222", "proxy.http_listen": "127.0.0.1:1"}
    assert copy.nats.model_fields_set == {"url"}  # an update is told, like a keyword
    assert original.model_copy().proxy.http_listen == "127.0.0.1:1"


def bad_value(variable: Variable) -> str | None:
    """A value the field refuses, or None when any text is acceptable."""
    if variable.names[0] == "MAILBEACON_INJECTION_TEMPLATE":
        return "[]"
    kind = value_type(variable)
    checked = variable.names[0] in SHAPED and typing.get_origin(kind) is not dict
    return "?bad-value?" if checked or kind in (bool, int, float) else None


@pytest.mark.parametrize(
    "variable", [v for v in Settings.variables() if bad_value(v)], ids=lambda v: v.names[0]
)
def test_a_bad_value_is_refused_naming_its_variable_never_the_value(
    clean_env: pytest.MonkeyPatch, variable: Variable
) -> None:
    value = bad_value(variable)
    assert value is not None
    for name in variable.names:
        clean_env.setenv(name, value)
        with pytest.raises(ValidationError) as refused:
            Settings()
        shown = invalid_settings(refused.value)
        assert shown.startswith(f"{variable.names[0]}: "), shown
        assert "\n" not in shown, shown
        if "SecretStr" in str(variable.info.annotation):
            assert value not in shown  # a secret's value is never printed
        clean_env.delenv(name)


def test_a_check_across_fields_names_the_configuration(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MAILBEACON_NATS_TOKEN", "s3cret-token")
    clean_env.setenv("MAILBEACON_NATS_CREDS_FILE", "/etc/nats/user.creds")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert invalid_settings(refused.value) == (
        "configuration: set one NATS login, not NATS_TOKEN and NATS_CREDS_FILE"
    )
    clean_env.setenv("MAILBEACON_TRACKER_LISTEN", "nowhere")
    with pytest.raises(ValidationError) as refused:
        Settings()
    shown = invalid_settings(refused.value)
    assert [line.split(":")[0] for line in shown.splitlines()] == [
        "configuration",
        "MAILBEACON_TRACKER_LISTEN",
    ]
    assert "s3cret-token" not in shown
