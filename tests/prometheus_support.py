"""A real Prometheus server (Debian's ``prometheus`` package, which ``.ci/run`` installs for
``promtool``) scraping the system the way the chart's ServiceMonitor would, with the chart's
alert rules, and the dashboard's panel queries as Grafana would send them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support import eventually, free_port

PROMETHEUS = shutil.which("prometheus")
COMPONENT_LABEL = "app.kubernetes.io/component"


def require_prometheus() -> str:
    if PROMETHEUS is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing (apt-get install prometheus)", pytrace=False)
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return PROMETHEUS


def scrape_configs(docs: list[dict[str, Any]], local: dict[str, str], namespace: str) -> list[dict[str, Any]]:
    """One job per Service the chart's ServiceMonitor selects, labelled as the Prometheus Operator
    labels its targets (job = the Service's name, namespace, service, endpoint, pod), scraping
    the address where that component runs here (``local``: component -> host:port)."""
    (monitor,) = (d for d in docs if d["kind"] == "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    configs = []
    for service in (d for d in docs if d["kind"] == "Service"):
        labels = service["metadata"]["labels"]
        ports = {p["name"] for p in service["spec"]["ports"]}
        if not wanted.items() <= labels.items() or endpoint["port"] not in ports:
            continue
        name, component = service["metadata"]["name"], labels[COMPONENT_LABEL]
        configs.append(
            {
                "job_name": name,
                "metrics_path": endpoint.get("path", "/metrics"),
                "static_configs": [
                    {
                        "targets": [local[component]],
                        "labels": {
                            "namespace": namespace,
                            "service": name,
                            "endpoint": endpoint["port"],
                            "pod": f"{name}-0",
                        },
                    }
                ],
            }
        )
    return configs


def immediate_rules(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The chart's PrometheusRule as a rules file, every ``for`` dropped: a test cannot wait
    the 2 to 15 minutes a real alert pends."""
    (rule,) = (d for d in docs if d["kind"] == "PrometheusRule")
    groups = yaml.safe_load(yaml.safe_dump(rule["spec"]["groups"]))
    for group in groups:
        for alert in group["rules"]:
            alert.pop("for", None)
    return {"groups": groups}


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (panel, query) of the dashboard, rows' nested panels included."""

    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from walk(item.get("panels", []))

    for panel in walk(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel, target


class PrometheusServer:
    def __init__(self, directory: Path, scrape: list[dict[str, Any]], rules: dict[str, Any]) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rules.yaml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(directory / "rules.yaml")],
            "scrape_configs": scrape,
        }
        (directory / "prometheus.yaml").write_text(yaml.safe_dump(config))
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        log = (self.directory / "prometheus.log").open("wb")
        self.process = await asyncio.create_subprocess_exec(
            require_prometheus(),
            f"--config.file={self.directory / 'prometheus.yaml'}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
            stdout=log,
            stderr=log,
        )
        log.close()

        async def ready() -> bool:
            assert self.process is not None and self.process.returncode is None, self.log()
            try:
                async with http.get(f"{self.url}/-/ready") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, within=30)

    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text()[-3000:]

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()

    async def query(
        self, http: aiohttp.ClientSession, expr: str, at: float | None = None
    ) -> list[dict[str, Any]]:
        """An instant query's result, as a list of {metric, value} (a scalar as one of them)."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        async with http.get(f"{self.url}/api/v1/query", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def alerts(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with http.get(f"{self.url}/api/v1/alerts") as response:
            body = await response.json()
        return list(body["data"]["alerts"])
