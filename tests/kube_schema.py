"""A CRD's structural schema as the API server applies it: validation, defaulting, pruning."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]


def crd_json_schema(schema: Mapping[str, Any]) -> JSON:
    """An openAPIV3Schema of a CRD as a JSON schema that validates like the API server.

    ``nullable`` becomes a null type, ``x-kubernetes-int-or-string`` an anyOf, and objects that
    list their properties are closed (the API server prunes unknown fields; for a manifest in
    the repository an unknown field is a mistake, so validation refuses it).
    """
    result: JSON = {}
    for key, value in schema.items():
        if key == "properties":
            result[key] = {name: crd_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            result[key] = crd_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            result[key] = [crd_json_schema(sub) for sub in value]
        elif key.startswith("x-kubernetes-") or key == "nullable":
            continue
        else:
            result[key] = copy.deepcopy(value)
    if schema.get("x-kubernetes-int-or-string"):
        result.pop("type", None)
        result["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in result:
        result["type"] = [result["type"], "null"]
    if (
        "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in schema
    ):
        result["additionalProperties"] = False
    return result


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Structural defaulting: a missing field with a default gets it, then its own fields theirs."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def prune(schema: Mapping[str, Any], value: Any, path: str, pruned: list[str]) -> Any:
    """Drop fields the schema does not know, as the API server does for structural schemas."""
    if isinstance(value, dict) and "properties" in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        for name in list(value):
            if name not in schema["properties"]:
                pruned.append(f"{path}.{name}")
                del value[name]
            else:
                value[name] = prune(schema["properties"][name], value[name], f"{path}.{name}", pruned)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(schema["items"], item, f"{path}[]", pruned) for item in value]
    return value
