"""The values table of the chart's README, generated from the comments of ``values.yaml``.

One source: each value is documented by the comment lines right above it in ``values.yaml``;
its type comes from ``values.schema.json`` and its default from the file itself. Run
``python deploy/helm/values_doc.py`` after changing ``values.yaml`` (``--check`` only tells
whether the README is current; the test suite runs that check).

A value is one row: a key whose value is not a mapping, or a mapping none of whose keys has
a comment of its own (a Kubernetes object passed through, such as ``resources``). A mapping
whose keys are documented (``tracker.service``) is a section: its keys get the rows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "mailbeacon"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
_KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$")

Row = tuple[str, str, str, str]  # key, type, default, description


def _resolve(values: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    node = values
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def documented_keys(text: str) -> list[tuple[tuple[str, ...], str]]:
    """Every mapping key of ``values.yaml`` (by path) with the comment block right above it."""
    found: list[tuple[tuple[str, ...], str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if not match:
            comment = []  # a blank line or a list item ends a comment block
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        found.append((tuple(k for _, k in stack), " ".join(comment)))
        comment = []
    return found


def _schema_type(schema: dict[str, Any], path: tuple[str, ...]) -> str:
    node: dict[str, Any] = schema
    for key in path:
        node = (node.get("properties") or {}).get(key) or {}
    if "type" in node:
        return str(node["type"])
    alternatives = node.get("oneOf") or node.get("anyOf") or []
    return " or ".join(sorted({str(a.get("type")) for a in alternatives if "type" in a}))


def rows(values_text: str, schema: dict[str, Any]) -> list[Row]:
    values = yaml.safe_load(values_text)
    keys = [(path, doc) for path, doc in documented_keys(values_text) if _resolve(values, path)[0]]
    documented = {path for path, doc in keys if doc}
    table: list[Row] = []
    emitted: list[tuple[str, ...]] = []
    for path, doc in keys:
        if any(path[: len(row)] == row for row in emitted):
            continue  # inside a value documented as a whole
        _, value = _resolve(values, path)
        if isinstance(value, dict) and any(p[: len(path)] == path and p != path for p in documented):
            continue  # a section: its keys are the rows
        emitted.append(path)
        default = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
        table.append((".".join(path), _schema_type(schema, path), default, doc))
    return table


def _cell(text: str) -> str:
    # Pipes would end the cell; angle brackets would read as HTML tags.
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown(table: list[Row]) -> str:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key, kind, default, doc in table:
        lines.append(f"| `{key}` | {kind} | `{_cell(default)}` | {_cell(doc)} |")
    return "\n".join(lines)


def generated_readme(readme: str, chart: Path = CHART) -> str:
    """``readme`` with the table between its markers replaced by the current one."""
    schema = json.loads((chart / "values.schema.json").read_text())
    table = markdown(rows((chart / "values.yaml").read_text(), schema))
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"the README has no {START} ... {END} markers")
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the README's table is out of date")
    args = parser.parse_args(argv)
    path = CHART / "README.md"
    current = path.read_text()
    wanted = generated_readme(current)
    if current == wanted:
        return 0
    if args.check:
        print(f"{path} is out of date: run python deploy/helm/values_doc.py", file=sys.stderr)
        return 1
    path.write_text(wanted)
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
