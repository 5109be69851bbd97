"""The container image the chart runs, checked statically (no Docker engine on this machine):
the Dockerfile's stages, user, entry point and build context agree with the CLI, the
packages and the chart."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mailbeacon.app.cli import _parser
from tests.chart.test_helm_chart import PRODUCTION, manifests, pod_specs, render

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for instruction, arguments in self.instructions if instruction == keyword]


def dockerfile_stages() -> list[Stage]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = arguments.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append((instruction, arguments.strip()))
    return stages


def cli_commands() -> set[str]:
    subparsers = _parser()._subparsers
    assert subparsers is not None
    return set(subparsers._group_actions[0].choices)  # type: ignore[attr-defined]


def test_multi_stage_build_with_a_small_runtime() -> None:
    build, runtime = dockerfile_stages()
    assert build.name == "build" and runtime.name is None
    assert build.base == runtime.base == "${PYTHON_IMAGE}"
    argument = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert argument is not None and argument.group(1).endswith("-slim-bookworm")
    # The runtime stage takes only the virtual environment from the build: no compilers, no sources.
    assert runtime.all("COPY") == ["--from=build /opt/mailbeacon /opt/mailbeacon"]
    assert any("pip install ." in run for run in build.all("RUN"))


def test_runs_as_the_non_root_user_the_chart_expects() -> None:
    runtime = dockerfile_stages()[-1]
    (user,) = runtime.all("USER")
    uid, gid = (int(part) for part in user.split(":"))
    assert uid >= 10000 and gid >= 10000
    values = render()
    for name, _, pod in pod_specs(manifests(values)):
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid), name
    # The proxy's container (shared proxy, sidecars, injection) sets its own security context.
    sidecar = (ROOT / "deploy" / "helm" / "mailbeacon-sidecar" / "templates" / "_container.tpl").read_text()
    assert f"runAsUser: {uid}" in sidecar and f"runAsGroup: {gid}" in sidecar
    env = " ".join(runtime.all("ENV"))
    assert "MAILBEACON_DATA_DIR=/tmp/mailbeacon" in env  # the only writable place (emptyDir)
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem


def test_the_command_selects_a_component_the_cli_has() -> None:
    runtime = dockerfile_stages()[-1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["mailbeacon"]
    assert PYPROJECT["project"]["scripts"]["mailbeacon"] == "mailbeacon.app.cli:main"
    commands = cli_commands()
    assert {"proxy", "tracker", "aggregator", "operator"} <= commands
    (default,) = runtime.all("CMD")
    assert json.loads(default) == ["--help"]
    # What the chart runs in each container (production values use every component).
    run = {c["args"][0] for _, _, pod in pod_specs(manifests(render(PRODUCTION))) for c in pod["containers"]}
    assert run == {"proxy", "tracker", "aggregator", "operator"}
    assert run <= commands
    # The ports the chart's containers listen on are the ones the image documents.
    exposed = {int(port) for port in " ".join(runtime.all("EXPOSE")).split()}
    ports = {
        p["containerPort"]
        for _, _, pod in pod_specs(manifests(render(PRODUCTION)))
        for c in pod["containers"]
        for p in c["ports"]
    }
    assert ports <= exposed


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a directory's match covers its contents."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_build_context_holds_every_package_and_nothing_else() -> None:
    build = dockerfile_stages()[0]
    sources = [shlex.split(arguments)[:-1] for arguments in build.all("COPY")]
    copied = {source.rstrip("/") for group in sources for source in group}
    for source in copied:
        assert (ROOT / source).exists(), source
    # Every package pyproject installs is copied (campaign_operator lives under operator/).
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin is not None, package
        directory = Path(spec.origin).parent.relative_to(ROOT)
        assert directory.parts[0] in copied, package
    assert PYPROJECT["project"]["readme"] in copied and "pyproject.toml" in copied
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (
        "pyproject.toml",
        "README.md",
        "mailbeacon/app/cli.py",
        "operator/campaign_operator/handlers.py",
        "aggregator/metrics.py",
    ):
        assert not dockerignored(needed, patterns), needed
    for unwanted in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        ".mailbeacon/nats.url",
        "deploy/helm/mailbeacon/Chart.yaml",
        "tracker/__pycache__/app.cpython-311.pyc",
    ):
        assert dockerignored(unwanted, patterns), unwanted
