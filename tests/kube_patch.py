"""The patch formats the Kubernetes API accepts for custom resources: RFC 7386 and RFC 6902."""

from __future__ import annotations

import copy
from typing import Any

JSON = dict[str, Any]


class PatchConflict(Exception):
    """A JSON patch ``test`` failed or a path does not exist (the API server answers 422)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchConflict(f"bad JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(document: Any, parts: list[str]) -> tuple[Any, str]:
    node = document
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError) as exc:
            raise PatchConflict(f"path /{'/'.join(parts)} does not exist") from exc
    return node, parts[-1]


def json_patch(document: Any, operations: list[JSON]) -> Any:
    """RFC 6902 (add, remove, replace, test, copy, move) on a copy of ``document``."""
    document = copy.deepcopy(document)
    for op in operations:
        kind, parts = op.get("op"), _pointer(str(op.get("path", "")))
        if kind == "test":
            node: Any = document
            for part in parts:
                try:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                except (KeyError, IndexError, ValueError) as exc:
                    raise PatchConflict(f"test: {op['path']} does not exist") from exc
            if node != op.get("value"):
                raise PatchConflict(f"test failed: {op['path']} is {node!r}, not {op.get('value')!r}")
            continue
        if kind in ("copy", "move"):
            source = _pointer(str(op["from"]))
            holder, last = _parent(document, source)
            value = holder[int(last)] if isinstance(holder, list) else holder[last]
            if kind == "move":
                del holder[int(last) if isinstance(holder, list) else last]
            op = {"op": "add", "path": op["path"], "value": copy.deepcopy(value)}
            kind = "add"
        if not parts:
            document = copy.deepcopy(op.get("value"))
            continue
        holder, last = _parent(document, parts)
        if isinstance(holder, list):
            index = len(holder) if last == "-" else int(last)
            if kind == "add":
                holder.insert(index, copy.deepcopy(op.get("value")))
            elif index >= len(holder):
                raise PatchConflict(f"{op['path']} does not exist")
            elif kind == "remove":
                del holder[index]
            elif kind == "replace":
                holder[index] = copy.deepcopy(op.get("value"))
        elif isinstance(holder, dict):
            if kind in ("remove", "replace") and last not in holder:
                raise PatchConflict(f"{op['path']} does not exist")
            if kind == "remove":
                del holder[last]
            else:
                holder[last] = copy.deepcopy(op.get("value"))
        else:
            raise PatchConflict(f"{op['path']}: parent is not a container")
    return document
