"""The documentation a clone carries: links that resolve, no design document outside the
repository, a README that stays short, and docs/configuration.md generated from the settings
(every setting described, every variable named as the settings really read it)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote

import pytest
from pydantic import AliasChoices, BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from mailbeacon.contract.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _config_doc() -> ModuleType:
    """docs/config_doc.py (a script, outside every package)."""
    spec = importlib.util.spec_from_file_location("config_doc", ROOT / "docs" / "config_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("config_doc", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --- links -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)
# [text](target "title") and ![alt](src); the text may hold one level of brackets.
_INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with inline code spans blanked."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, re.sub(r"`[^`]*`", "``", line)))
    return lines


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose_lines(text):
        found.update(_HTML_ANCHOR.findall(line))
    fenced = False
    for line in text.splitlines():  # headings with their code spans (GitHub keeps their text)
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in _prose_lines(text):
        found += [(number, target) for target in _INLINE_LINK.findall(line)]
        reference = _REFERENCE.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


def broken_links(path: Path, root: Path) -> list[str]:
    """What is wrong with the links of one Markdown file: relative targets that do not exist
    (or leave the repository), anchors no heading makes, and links into this machine."""
    problems = []
    for number, target in links(path.read_text()):
        where = f"{path.relative_to(root)}:{number}: {target}"
        if target.lower().startswith("file:") or target.startswith("/") or "/work/" in target:
            problems.append(f"{where}: a link into this machine")
            continue
        if _SCHEME.match(target):
            continue  # https://, mailto: ... (not checked offline)
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not resolved.is_relative_to(root) or not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved.read_text()):
            problems.append(f"{where}: no heading #{anchor} in {resolved.relative_to(root)}")
    return problems


def documentation() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md"))
    charts = sorted((ROOT / "deploy").rglob("README.md"))
    return [ROOT / "README.md", *docs, *charts]


def test_every_relative_link_in_readme_and_docs_resolves() -> None:
    files = documentation()
    assert ROOT / "docs" / "architecture.md" in files and ROOT / "docs" / "esps" / "sendgrid.md" in files
    problems = [problem for path in files for problem in broken_links(path, ROOT)]
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Event contract\n\n## Events on NATS\n\n## Events on NATS\n")
    page = tmp_path / "README.md"
    page.write_text(
        "Good: [b](docs/b.md), [a section](docs/b.md#events-on-nats), [its twin](docs/b.md#events-on-nats-1),\n"
        "[here](#top-heading), [web](https://example.com/x.md#nothing).\n"
        "Bad: [gone](docs/missing.md), [no anchor](docs/b.md#event-contracts), [out](../outside.md),\n"
        "[machine](/work/shared/notes.md), [file](file:///etc/hosts).\n"
        "`[in code](docs/missing.md)` is no link.\n\n# Top heading\n\n"
        "```\n[in a block](docs/missing.md)\n```\n[ref]: docs/b.md#nowhere\n"
    )
    problems = broken_links(page, tmp_path)
    assert [p.split(": ", 2)[1] for p in problems] == [
        "docs/missing.md",
        "docs/b.md#event-contracts",
        "../outside.md",
        "/work/shared/notes.md",
        "file:///etc/hosts",
        "docs/b.md#nowhere",
    ], problems


def test_github_slugs() -> None:
    assert (
        slug("SMTP proxy: who may relay, and what it changes")
        == "smtp-proxy-who-may-relay-and-what-it-changes"
    )
    assert slug("What the app is told (SMTP replies)") == "what-the-app-is-told-smtp-replies"
    assert slug("Metrics: one registry per component") == "metrics-one-registry-per-component"
    assert slug("`machine_kind` and [links](x.md)") == "machine_kind-and-links"
    assert slug("MailbeaconComplaintRateHigh") == "mailbeaconcomplaintratehigh"


# --- the design document lives in the repository -------------------------------------------------------

NAME = "DESIGN" + ".md"  # spelled apart, so this file does not mention it either


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
        return [ROOT / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # an export without .git: every file but tools'
        skip = {".git", ".venv", ".mailbeacon", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__"}
        return [
            path
            for path in ROOT.rglob("*")
            if path.is_file()
            and not skip & set(path.relative_to(ROOT).parts)
            and ".egg-info" not in str(path)
        ]


def test_no_file_mentions_the_external_design_document() -> None:
    needle = NAME.lower().encode()
    mentions = [
        str(path.relative_to(ROOT))
        for path in tracked_files()
        if path.is_file() and needle in path.read_bytes().lower()
    ]
    assert not mentions, f"cite docs/architecture.md (with the section) instead of {NAME}: {mentions}"


# --- the README ---------------------------------------------------------------------------------------

README_MAX_LINES = 250


def test_the_readme_is_short_and_starts_with_make_run_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    lines = readme.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move details into docs/"
    assert "make run" in readme and "make test" in readme
    for page in ("architecture", "proxy", "tracker", "aggregator", "campaigns", "kubernetes", "security"):
        assert f"docs/{page}.md" in readme, page


# --- docs/configuration.md --------------------------------------------------------------------------


def test_the_configuration_doc_is_generated_from_the_settings() -> None:
    config_doc = _config_doc()
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert config_doc.markdown(Settings) == current, (
        f"docs/configuration.md is out of date: run {config_doc.COMMAND}"
    )
    assert config_doc.main(["--check"]) == 0


def test_every_setting_has_a_description() -> None:
    config_doc = _config_doc()
    rows = config_doc.rows(Settings)
    assert len(rows) >= 90  # every field, nested ones included
    missing = [row.path for row in rows if len(row.description) < 10]
    assert not missing, f"add description= to these settings in mailbeacon/settings.py: {missing}"


# Settings checked together with another: the variable is set with its partner.
PARTNERS = {
    "MAILBEACON_NATS_USER": {"MAILBEACON_NATS_PASSWORD": "secret-password"},
    "MAILBEACON_NATS_PASSWORD": {"MAILBEACON_NATS_USER": "mailbeacon"},
    "MAILBEACON_NATS_TLS_CERT_FILE": {"MAILBEACON_NATS_TLS_KEY_FILE": "/tmp/key.pem"},
    "MAILBEACON_NATS_TLS_KEY_FILE": {"MAILBEACON_NATS_TLS_CERT_FILE": "/tmp/cert.pem"},
}
# Values to try, in order, until one validates and changes the setting.
CANDIDATES = (
    "127.0.0.1:4999",
    "https://mailbeacon.example.com:8443",
    "X-Forwarded-User",
    "10.1.0.0/16",
    "k" * 40,
    "/tmp/mailbeacon-doc-check",
    "marketing/newsletter",
    '{"initContainer": {}}',
    "DEBUG",
)


def _value(settings: BaseModel, path: str) -> Any:
    value: Any = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _changed_by(variable: str, row: Any, default: Any, monkeypatch: pytest.MonkeyPatch) -> bool:
    literal = re.findall(r"`([^`]+)`", row.kind) if row.kind.startswith("one of") else []
    numbers = ["7", "0.5", "2", "9"] if row.kind.split(",")[0] in ("integer", "number") else []
    flips = ["false", "true"] if row.kind == "boolean" else []
    for candidate in [*flips, *literal, *numbers, *CANDIDATES]:
        monkeypatch.setenv(variable, candidate)
        try:
            value = _value(Settings(), row.path)
        except (ValidationError, SettingsError):
            continue
        if value != default:
            return True
    return False


def test_every_documented_variable_sets_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable the doc names is the one the settings read (also for aliases such as
    plain SITE_URL), whatever shape the settings model has."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("MAILBEACON_") or name.upper() in ("SITE_URL", "HTTPS_PROXY", "NO_PROXY"):
            monkeypatch.delenv(name)
    defaults = Settings()
    unread = []
    for row in _config_doc().rows(Settings):
        for variable in row.variables:
            with monkeypatch.context() as env:
                for partner, value in PARTNERS.get(variable, {}).items():
                    env.setenv(partner, value)
                if not _changed_by(variable, row, _value(defaults, row.path), env):
                    unread.append(f"{variable} ({row.path})")
    assert not unread, f"documented variables that set nothing: {unread}"


class _Proxy(BaseSettings):
    """The SMTP proxy: where it listens
    and who may relay."""

    model_config = SettingsConfigDict(env_prefix="MAILBEACON_")
    smtp_listen: str = Field(default="127.0.0.1:2525", description="Where the proxy listens")
    smtp_relay_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8"], description="Relay CIDRs")


class _Webhooks(BaseModel):
    """Tracker webhooks."""

    webhook_token: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MAILBEACON_WEBHOOK_TOKEN", "WEBHOOK_TOKEN"),
        description="Token of the generic webhooks",
    )
    max_json_depth: int = Field(default=64, ge=8, le=128)


class _Tracker(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILBEACON_")
    tracker_listen: str = Field(default="127.0.0.1:8080", description="Where the tracker listens")
    webhooks: _Webhooks = Field(default_factory=_Webhooks)


class _Composed(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILBEACON_")
    site_url: str = Field(
        default="http://127.0.0.1:8080",
        validation_alias=AliasChoices("MAILBEACON_SITE_URL", "SITE_URL", "site_url"),
        description="Public base URL",
    )
    proxy: _Proxy = Field(default_factory=_Proxy)
    tracker: _Tracker = Field(default_factory=_Tracker, description="Tracker")


def test_the_generator_walks_settings_made_of_sub_models() -> None:
    config_doc = _config_doc()
    sections = config_doc.sections(_Composed)
    assert [section.title for section in sections] == ["General", "SMTP proxy", "Tracker", "Tracker webhooks"]
    by_path = {row.path: row for section in sections for row in section.rows}
    assert by_path["site_url"].variables == ("MAILBEACON_SITE_URL", "SITE_URL")
    assert by_path["proxy.smtp_listen"].variables == ("MAILBEACON_SMTP_LISTEN",)
    assert by_path["proxy.smtp_relay_networks"].default == "`127.0.0.0/8`"
    assert by_path["tracker.webhooks.webhook_token"].variables == (
        "MAILBEACON_WEBHOOK_TOKEN",
        "WEBHOOK_TOKEN",
    )
    assert by_path["tracker.webhooks.webhook_token"].default == "unset"
    assert by_path["tracker.webhooks.max_json_depth"].kind == "integer, at least 8, at most 128"
    assert by_path["tracker.webhooks.max_json_depth"].description == ""  # reported as missing
    text = config_doc.markdown(_Composed)
    assert "## SMTP proxy\n\nThe SMTP proxy: where it listens and who may relay.\n" in text
    assert "| `MAILBEACON_SMTP_LISTEN` | text | `127.0.0.1:2525` |" in text
