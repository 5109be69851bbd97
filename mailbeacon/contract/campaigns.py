"""Campaign identity, the campaign spec (a ``Campaign`` resource's ``.spec``) and its matching rules."""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.header import decode_header, make_header

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

API_GROUP = "mailbeacon.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "Campaign"
CAMPAIGN_HEADER = "X-Campaign"
DEFAULT_NAMESPACE = "default"

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class InvalidCampaign(ValueError):
    """A campaign name or manifest that cannot be used; the message says why."""


@dataclass(frozen=True, order=True)
class CampaignKey:
    namespace: str
    name: str

    @classmethod
    def parse(cls, value: str, default_namespace: str = DEFAULT_NAMESPACE) -> CampaignKey:
        """``namespace/name`` or a bare ``name`` (in the default namespace), as Kubernetes spells them."""
        value = value.strip()
        namespace, sep, name = value.partition("/")
        if not sep:
            namespace, name = default_namespace, value
        if not _LABEL.match(namespace):
            raise InvalidCampaign(f"campaign namespace {namespace!r} is not a DNS label")
        if not _SUBDOMAIN.match(name) or ".." in name:
            raise InvalidCampaign(f"campaign name {name!r} is not a DNS subdomain name")
        return cls(namespace, name)

    @classmethod
    def from_header(cls, value: str) -> CampaignKey:
        """Apps write free text in ``X-Campaign`` ("Spring Sale 2026"); fold it into a resource name.

        The header may arrive RFC 2047-encoded (any non-ASCII value does) and accented
        letters keep their base letter, so "Grüße/Été" is ``grue/ete``, not a slug of
        the encoding's base64.
        """
        namespace, sep, name = _ascii_text(_decoded(value)).strip().partition("/")
        if not sep:
            namespace, name = DEFAULT_NAMESPACE, namespace
        slug = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.")
        slug = re.sub(r"\.{2,}", ".", slug)[:253].strip("-.")
        namespace = re.sub(r"[^a-z0-9-]+", "-", namespace.strip().lower()).strip("-")[:63].strip("-")
        return cls.parse(f"{namespace}/{slug}")

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def kv_key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _decoded(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, UnicodeError, ValueError):  # unknown charset, broken encoded word
        return value


def _ascii_text(value: str) -> str:
    """Letters without their accents; what has no ASCII base letter is dropped."""
    return unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii")


class _SpecModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class HeaderMatch(_SpecModel):
    name: str = Field(min_length=1, description="Header name, case-insensitive")
    value: str = Field(default="*", description="Glob the header value must match")


class MatchRules(_SpecModel):
    senders: list[str] = Field(default_factory=list, description="Globs on the envelope or From sender")
    list_ids: list[str] = Field(default_factory=list, description="Globs on the List-Id header")
    headers: list[HeaderMatch] = Field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.senders or self.list_ids or self.headers)


class TrackingSwitches(_SpecModel):
    opens: bool = True
    clicks: bool = True
    unsubscribe_header: bool = Field(
        default=False, description="Add List-Unsubscribe / List-Unsubscribe-Post (RFC 8058)"
    )
    skip_links: list[str] = Field(default_factory=list, description="Globs of link URLs never wrapped")


class Privacy(_SpecModel):
    anonymize_ip: bool = False


class Guardrails(_SpecModel):
    bounce_rate_percent: float = Field(default=5.0, ge=0, le=100)
    complaint_rate_percent: float = Field(default=0.3, ge=0, le=100)
    min_delivered: int = Field(default=100, ge=0)
    auto_pause: bool = False


class CampaignSpec(_SpecModel):
    display_name: str | None = None
    match: MatchRules = Field(default_factory=MatchRules)
    tracking: TrackingSwitches = Field(default_factory=TrackingSwitches)
    privacy: Privacy = Field(default_factory=Privacy)
    paused: bool = False
    guardrails: Guardrails = Field(default_factory=Guardrails)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CampaignSpec:
        return cls.model_validate_json(data)


def parse_manifests(text: str) -> list[tuple[CampaignKey, CampaignSpec]]:
    """The ``Campaign`` documents of a YAML stream, as kubectl would take them."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise InvalidCampaign(f"not valid YAML: {exc}") from exc
    result: list[tuple[CampaignKey, CampaignSpec]] = []
    for index, doc in enumerate(documents, start=1):
        if not isinstance(doc, Mapping):
            raise InvalidCampaign(f"document {index} is not a mapping")
        if doc.get("kind") != KIND or not str(doc.get("apiVersion", "")).startswith(f"{API_GROUP}/"):
            raise InvalidCampaign(f"document {index} is not a {API_GROUP} {KIND}")
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, Mapping) or not metadata.get("name"):
            raise InvalidCampaign(f"document {index} has no metadata.name")
        key = CampaignKey.parse(f"{metadata.get('namespace') or DEFAULT_NAMESPACE}/{metadata['name']}")
        try:
            spec = CampaignSpec.model_validate(doc.get("spec") or {})
        except ValidationError as exc:
            raise InvalidCampaign(f"{key}: invalid spec: {exc}") from exc
        result.append((key, spec))
    return result


def _sender_address(value: str) -> str:
    match = re.search(r"<([^<>]*)>", value)
    return (match.group(1) if match else value).strip().lower()


def match_campaign(
    specs: Mapping[CampaignKey, CampaignSpec],
    headers: Iterable[tuple[str, str]],
    envelope_sender: str,
    default: CampaignKey | None = None,
) -> CampaignKey | None:
    """Which campaign a message belongs to.

    An explicit ``X-Campaign`` header wins; then the first campaign (in name order, so
    every proxy replica decides alike) whose rules all match; then the default.
    """
    header_list = [(name.lower(), value) for name, value in headers]
    for name, value in header_list:
        if name == CAMPAIGN_HEADER.lower() and value.strip():
            return CampaignKey.from_header(value)
    senders = {_sender_address(envelope_sender)} | {
        _sender_address(value) for name, value in header_list if name in ("from", "sender")
    }
    list_ids = [_sender_address(value) for name, value in header_list if name == "list-id"]
    for key in sorted(specs):
        rules = specs[key].match
        if rules.is_empty():
            continue
        if rules.senders and not any(
            fnmatch.fnmatchcase(sender, pattern.lower()) for sender in senders for pattern in rules.senders
        ):
            continue
        if rules.list_ids and not any(
            fnmatch.fnmatchcase(lid, pattern.lower()) for lid in list_ids for pattern in rules.list_ids
        ):
            continue
        if not all(
            any(
                name == rule.name.lower() and fnmatch.fnmatchcase(value.strip(), rule.value)
                for name, value in header_list
            )
            for rule in rules.headers
        ):
            continue
        return key
    return default
