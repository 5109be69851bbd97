"""The Campaign CRD agrees with the campaign spec model, and the example manifests with the CRD."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign_operator.resource import GROUP, PLURAL, VERSION
from campaign_operator.status import STATUS_FIELDS, Headline
from mailbeacon.contract.campaigns import API_GROUP, KIND, CampaignSpec, parse_manifests
from tests.kube_schema import apply_defaults, crd_json_schema

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "deploy" / "helm" / "mailbeacon" / "crds" / "campaigns.mailbeacon.io.yaml"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("campaign*.yaml"))

CRD = yaml.safe_load(CRD_PATH.read_text())
VERSION_ENTRY = CRD["spec"]["versions"][0]
SCHEMA = VERSION_ENTRY["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]
STATUS_SCHEMA = SCHEMA["properties"]["status"]


def test_crd_names_match_the_contract() -> None:
    assert CRD["spec"]["group"] == GROUP == API_GROUP
    assert CRD["spec"]["names"]["kind"] == KIND
    assert CRD["spec"]["names"]["plural"] == PLURAL
    assert CRD["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert [v["name"] for v in CRD["spec"]["versions"]] == [VERSION]
    assert VERSION_ENTRY["served"] and VERSION_ENTRY["storage"]
    assert VERSION_ENTRY["subresources"] == {"status": {}}
    assert CRD["spec"]["scope"] == "Namespaced" and CRD["spec"]["names"]["shortNames"]
    columns = [c["name"] for c in VERSION_ENTRY["additionalPrinterColumns"]]
    assert columns == [
        *("Sent", "Delivered", "Open %", "Click %", "Bounce %", "Complaint %", "Paused"),
        *("Statistics", "Since", "Age"),
    ]


def _resolve(model_schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow pydantic's $ref / anyOf-with-null to the schema of the value itself."""
    if "$ref" in node:
        node = model_schema["$defs"][node["$ref"].rsplit("/", 1)[1]] | {
            k: v for k, v in node.items() if k != "$ref"
        }
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        assert len(options) == 1, node
        node = (
            _resolve(model_schema, options[0])
            | {"nullable": True}
            | {k: v for k, v in node.items() if k not in ("anyOf",)}
        )
    return node


def _compare(model_schema: dict[str, Any], model: dict[str, Any], crd: dict[str, Any], path: str) -> None:
    model = _resolve(model_schema, model)
    assert crd.get("type") == model.get("type"), f"{path}: type"
    assert crd.get("description"), f"{path}: the CRD describes every field"
    for bound in ("minimum", "maximum", "minLength", "maxLength", "exclusiveMinimum", "exclusiveMaximum"):
        assert crd.get(bound) == model.get(bound), f"{path}: {bound}"
    assert bool(crd.get("nullable")) == bool(model.get("nullable")), f"{path}: nullable"
    if model.get("type") == "object":
        assert set(crd["properties"]) == set(model["properties"]), f"{path}: fields"
        assert set(crd.get("required", [])) == set(model.get("required", [])), f"{path}: required"
        for name, sub in model["properties"].items():
            _compare(model_schema, sub, crd["properties"][name], f"{path}.{name}")
    elif model.get("type") == "array":
        _compare(model_schema, model["items"], crd["items"] | {"description": "item"}, f"{path}[]")
    elif "default" in model and model["default"] is not None:
        assert crd.get("default") == model["default"], f"{path}: default"


def test_spec_schema_matches_the_model() -> None:
    model_schema = CampaignSpec.model_json_schema(by_alias=True)
    _compare(model_schema, model_schema, SPEC_SCHEMA, "spec")


def test_crd_defaults_equal_the_model_defaults() -> None:
    defaulted = apply_defaults(SPEC_SCHEMA, {})
    assert defaulted | {"displayName": None} == CampaignSpec().model_dump(by_alias=True)
    header = apply_defaults(SPEC_SCHEMA, {"match": {"headers": [{"name": "X-Kind"}]}})
    assert header["match"]["headers"] == [{"name": "X-Kind", "value": "*"}]


def _strategy(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Documents the CRD schema admits (optional fields left out at random)."""
    kind = schema.get("type")
    if kind == "object":
        required = set(schema.get("required", []))
        fields = {name: _strategy(sub) for name, sub in schema["properties"].items()}
        return st.fixed_dictionaries(
            {name: s for name, s in fields.items() if name in required},
            optional={name: s for name, s in fields.items() if name not in required},
        )
    if kind == "array":
        return st.lists(_strategy(schema["items"]), max_size=3)
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum", 10**9))
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum"),
            max_value=schema.get("maximum"),
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "string":
        text = st.text(min_size=schema.get("minLength", 0), max_size=30)
        return st.one_of(st.none(), text) if schema.get("nullable") else text
    raise AssertionError(f"no strategy for {schema}")


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(_strategy(SPEC_SCHEMA))
def test_every_spec_the_crd_admits_the_model_reads_alike(spec: dict[str, Any]) -> None:
    schema = crd_json_schema(SPEC_SCHEMA)
    jsonschema.validate(spec, schema)
    defaulted = apply_defaults(SPEC_SCHEMA, copy.deepcopy(spec))
    parsed = CampaignSpec.model_validate(defaulted)
    assert parsed.model_dump(by_alias=True) == defaulted | {"displayName": defaulted.get("displayName")}
    assert CampaignSpec.model_validate(spec) == parsed  # the model's own defaults are the CRD's


@pytest.mark.parametrize(
    "spec",
    [
        {"guardrails": {"complaintRatePercent": 101}},
        {"guardrails": {"bounceRatePercent": -1}},
        {"guardrails": {"minDelivered": -5}},
        {"guardrails": {"minDelivered": 1.5}},
        {"paused": "maybe"},
        {"match": {"senders": "news@example.com"}},
        {"match": {"headers": [{"value": "x"}]}},
        {"match": {"headers": [{"name": ""}]}},
        {"tracking": {"opens": True, "pixel": True}},
        {"unknown": 1},
    ],
)
def test_invalid_specs_are_refused_by_both(spec: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(spec, crd_json_schema(SPEC_SCHEMA))
    with pytest.raises(ValueError):
        CampaignSpec.model_validate(spec)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_campaigns_validate_against_the_crd(path: Path) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    schema = crd_json_schema(SCHEMA)
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name", "namespace"],
        "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
        "additionalProperties": False,
    }
    for document in documents:
        assert document["apiVersion"] == f"{GROUP}/{VERSION}" and document["kind"] == KIND
        jsonschema.validate(document, schema)
    # The same files work with `mailbeacon campaign apply -f` (no cluster).
    assert len(parse_manifests(path.read_text())) == len(documents)


def test_status_the_operator_writes_fits_the_status_schema() -> None:
    assert set(STATUS_FIELDS) <= set(STATUS_SCHEMA["properties"])
    status = Headline(sent=10, delivered=9, delivery_rate=90.0).as_status() | {
        "observedGeneration": 3,
        "lastUpdateTime": "2026-11-27T10:00:00Z",
        "conditions": [
            {
                "type": "ComplaintRateHigh",
                "status": "False",
                "reason": "InsufficientVolume",
                "message": "complaint rate is judged after 100 deliveries; 9 so far",
                "lastTransitionTime": "2026-11-27T10:00:00Z",
                "observedGeneration": 3,
            }
        ],
    }
    jsonschema.validate(status, crd_json_schema(STATUS_SCHEMA))


# kubectl's JSONPath as printer columns use it: `.field` steps and `[?(@.key=="value")]` filters.
_STEP = re.compile(r'\.(\w+)|\[\?\(@\.(\w+)=="([^"]*)"\)\]')


def jsonpath(document: Any, path: str) -> list[Any]:
    """The values ``path`` selects in ``document``, as kubectl selects them for a column."""
    assert "".join(m.group(0) for m in _STEP.finditer(path)) == path, f"unsupported JSONPath {path}"
    values = [document]
    for field, key, wanted in _STEP.findall(path):
        if field:
            values = [v[field] for v in values if isinstance(v, dict) and field in v]
        else:
            values = [
                i
                for v in values
                if isinstance(v, list)
                for i in v
                if isinstance(i, dict) and i.get(key) == wanted
            ]
    return values


def test_printer_columns_point_at_schema_fields() -> None:
    for column in VERSION_ENTRY["additionalPrinterColumns"]:
        steps = _STEP.findall(column["jsonPath"])
        if steps[0][0] == "metadata":
            continue
        node = SCHEMA
        for field, key, _ in steps:
            node = node["properties"][field] if field else node["items"]
            if key:
                assert key in node["properties"], column
        types = {"integer": "integer", "number": "number", "boolean": "boolean", "string": "string"}
        expected = "date" if node.get("format") == "date-time" else types[node["type"]]
        assert column["type"] == expected, column


def test_kubectl_get_shows_whether_a_campaigns_statistics_are_current() -> None:
    """The Statistics and Since columns: current (the aggregator answered) or stale since when."""
    from datetime import UTC, datetime

    from campaign_operator.guardrails import decide, statistics_condition

    columns = {c["name"]: c["jsonPath"] for c in VERSION_ENTRY["additionalPrinterColumns"]}
    then, later = datetime(2026, 11, 27, 10, 0, tzinfo=UTC), datetime(2026, 11, 27, 10, 5, tzinfo=UTC)
    current = decide(CampaignSpec(), Headline(sent=10), [], then, 1).conditions
    stale = statistics_condition(current, False, "aggregator not reachable", later, 1)
    for conditions, reason, since in (
        (current, "AggregatorAnswered", "2026-11-27T10:00:00Z"),
        (stale, "AggregatorUnavailable", "2026-11-27T10:05:00Z"),
    ):
        campaign = {"status": {"conditions": conditions}}
        assert jsonpath(campaign, columns["Statistics"]) == [reason]
        assert jsonpath(campaign, columns["Since"]) == [since]
        jsonschema.validate(campaign["status"], crd_json_schema(STATUS_SCHEMA))
