"""The import rules of docs/architecture.md "Layout", read from the source (no import runs).

Components never import each other or the app shell, the contract imports nothing else of
mailbeacon, the aggregator's read side and store never reach into ingest, no module takes a
private name from another package, and no two modules import each other, not even through
a function-local import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Top-level package -> the folder holding it (campaign_operator sits in operator/).
PACKAGES = {
    "mailbeacon": ROOT,
    "smtp_proxy": ROOT,
    "tracker": ROOT,
    "aggregator": ROOT,
    "campaign_operator": ROOT / "operator",
}
COMPONENTS = ("smtp_proxy", "tracker", "aggregator", "campaign_operator")
APP_SHELL = "mailbeacon.app"


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    found = {}
    for package, base in PACKAGES.items():
        for path in sorted((base / package).rglob("*.py")):
            if "migrations" not in path.parts:  # Alembic scripts, loaded by Alembic only
                found[module_name(path, base)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import that runs, at module level or in a function; not ``if TYPE_CHECKING:`` ones."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            yield from (n for child in node.orelse for n in _import_nodes_of(child))
            continue
        yield from _import_nodes_of(node)


def _import_nodes_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _import_nodes(node)


@cache
def imports(name: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(imported module, names taken from it) for each import of module ``name``."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            # ``from pkg import module`` imports the module; ``from module import name`` the name.
            submodule = f"{base}.{alias.name}"
            found.append((submodule, ()) if submodule in modules() else (base, (alias.name,)))
    return tuple(found)


def own_imports(name: str) -> set[str]:
    """The modules of this project that ``name`` imports, with the packages they run on the way
    (not its own packages: they run before it)."""
    targets = set()
    for target, _ in imports(name):
        parts = target.split(".")
        targets |= {".".join(parts[:n]) for n in range(1, len(parts) + 1)} & modules().keys()
    return {target for target in targets if not within(name, target)}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_scan_sees_the_code() -> None:
    assert "tracker.engagement.engagement" in modules()
    assert "campaign_operator.handlers" in modules()
    assert "mailbeacon.contract.codec" in own_imports("tracker.engagement.engagement")
    assert "mailbeacon.contract.events" in own_imports("aggregator.ingest.decode")


@pytest.mark.parametrize("component", COMPONENTS)
def test_components_never_import_each_other_nor_the_app_shell(component: str) -> None:
    wrong = {
        f"{name} imports {target}"
        for name in modules()
        if within(name, component)
        for target in own_imports(name)
        if within(target, APP_SHELL)
        or any(within(target, other) for other in COMPONENTS if other != component)
    }
    assert not wrong


def test_the_shared_package_imports_no_component_and_the_contract_nothing_else_of_it() -> None:
    wrong = set()
    for name in modules():
        if not within(name, "mailbeacon") or within(name, APP_SHELL):  # the app shell composes them
            continue
        for target in own_imports(name):
            if any(within(target, component) for component in COMPONENTS):
                wrong.add(f"{name} imports {target}")
            if within(name, "mailbeacon.contract") and not within(target, "mailbeacon.contract"):
                wrong.add(f"{name} imports {target}")
    assert not wrong


def test_the_read_side_and_the_store_never_import_ingest() -> None:
    wrong = {
        f"{name} imports {target}"
        for name in modules()
        if within(name, "aggregator.read") or within(name, "aggregator.store")
        for target in own_imports(name)
        if within(target, "aggregator.ingest.ingest")
    }
    assert not wrong


def test_no_module_takes_a_private_name_from_another_package() -> None:
    wrong = set()
    for name in modules():
        home = name.rpartition(".")[0] if modules()[name].name != "__init__.py" else name
        for target, names in imports(name):
            if target not in modules() or within(target, home):
                continue
            wrong |= {f"{name} imports {target}.{n}" for n in names if n.startswith("_")}
    assert not wrong


def test_no_import_circles() -> None:
    graph = {name: own_imports(name) for name in modules()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not circles, "\n".join(" -> ".join(circle) for circle in circles)
