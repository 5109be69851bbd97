"""Where the code reaches into nats-py's private attributes: only in the places that say why.

Custom NATS code stays only where the benchmark shows it at least 1.3 times faster than
nats-py's public API (docs/performance.md "The NATS paths, measured"), and each private
attribute of nats-py it needs is read in one function that explains the need. A nats-py upgrade that
renames one then breaks one known place, not a dozen scattered ones. This test finds every
use of a name private to nats-py's client, JetStream context, subscription or message
(``x._name`` on anything but ``self``, or ``getattr(x, "_name")``) in the product's code.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import nats.aio.client
import nats.aio.msg
import nats.aio.subscription
import nats.js.client

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["mailbeacon", "smtp_proxy", "tracker", "aggregator", "operator"]

# (function, private attribute): each use is commented at its place with why.
ALLOWED = {
    ("client_of", "_nc"),  # the connection under a JetStream context: no public accessor
    ("send_commands", "_send_command"),  # ready frames written at once: 7 times cheaper than publish()
    ("send_commands", "_flush_pending"),
    ("send_commands", "_pending_data_size"),  # publish()'s refusal while the reconnect buffer is full
    ("send_commands", "_max_pending_size"),
}
# Private-looking names that are public API (namedtuple methods).
PUBLIC = {"_replace", "_asdict", "_fields", "_make"}


def nats_private_names() -> set[str]:
    """Every ``_name`` nats-py's own classes use on themselves (attributes and methods)."""
    names: set[str] = set()
    classes = [
        nats.aio.client.Client,
        nats.js.client.JetStreamContext,
        nats.js.client.JetStreamContext.PullSubscription,
        nats.aio.subscription.Subscription,
        nats.aio.msg.Msg,
    ]
    for cls in classes:
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(cls)))):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "name", None)
            if isinstance(name, str) and name.startswith("_") and not name.startswith("__"):
                names.add(name)
    return names - PUBLIC


def private_uses(tree: ast.AST, names: set[str]) -> set[tuple[str, str]]:
    """(enclosing function, name) for each use of one of ``names`` on another object."""
    found: set[tuple[str, str]] = set()

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Attribute) and node.attr in names:
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.add((function, node.attr))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in names
        ):
            found.add((function, str(node.args[1].value)))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_the_scan_finds_private_uses_in_all_their_forms() -> None:
    code = """
def connected(self):
    nc = getattr(self._js, "_nc", None)
    return nc._server_info, self._nc
"""
    assert private_uses(ast.parse(code), nats_private_names()) == {
        ("connected", "_nc"),
        ("connected", "_server_info"),
    }


def test_private_attributes_of_nats_py_are_used_only_where_the_code_says_why() -> None:
    names = nats_private_names()
    assert {"_nc", "_send_command", "_server_info", "_pending_queue"} <= names  # the scan sees nats-py
    uses: dict[tuple[str, str], list[str]] = {}
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for use in private_uses(ast.parse(path.read_text()), names):
                uses.setdefault(use, []).append(str(path.relative_to(ROOT)))
    unexplained = {use: paths for use, paths in uses.items() if use not in ALLOWED}
    assert not unexplained, (
        "nats-py internals used outside the functions that explain why; use the public API, "
        f"or mailbeacon.bus.jetstream.client_of, or comment the need there and add it to ALLOWED: {unexplained}"
    )
    assert set(uses) == ALLOWED, f"ALLOWED lists uses that are gone: {ALLOWED - set(uses)}"
