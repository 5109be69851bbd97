"""``mailbeacon operator release-campaigns``: Campaigns never hang after an uninstall (issue 16,
defect 4), against the Kubernetes API test server.

With the operator gone, a Campaign deleted afterwards keeps kopf's finalizer and hangs with its
deletionTimestamp set. The chart's pre-delete hook runs this command: it stops the operator's
Deployment first (a running operator would put the finalizer back), waits for its pod to end,
then takes the finalizer off every Campaign the operator served, and only that finalizer.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml

from campaign_operator.release import KubeError, finalizer_removal, run
from campaign_operator.resource import FINALIZER
from tests.kube_api import DEPLOYMENTS, PODS, FakeKubernetes
from tests.operator.test_operator_runtime import CRD, KEY, Kubectl, campaign_manifest, operator_running
from tests.support import eventually, make_settings

RELEASE = "mailbeacon"  # the release's namespace
OPERATOR_LABELS = {"app.kubernetes.io/instance": "mb", "app.kubernetes.io/component": "operator"}


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    server = FakeKubernetes(
        [yaml.safe_load(CRD.read_text())],
        namespaces=["default", RELEASE, "marketing", "shop", "other"],
        builtins=[DEPLOYMENTS, PODS],
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
async def test_a_campaign_deleted_after_the_operator_went_is_released_by_the_command(
    kube: FakeKubernetes, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, nats_url=nats_url, operator_listen="127.0.0.1:0")
    async with aiohttp.ClientSession() as http:
        kubectl = Kubectl(kube, http)
        with operator_running(kube, settings, tmp_path, monkeypatch):
            await kubectl.apply(campaign_manifest())

            async def finalized() -> bool:
                found = await kubectl.get(KEY.namespace, KEY.name)
                return bool(found and FINALIZER in (found["metadata"].get("finalizers") or []))

            await eventually(finalized)  # kopf's own finalizer, by the name the command removes
        # The operator is gone (uninstalled); the Campaign is deleted afterwards: it hangs.
        await kubectl.delete(KEY.namespace, KEY.name)
        stuck = await kubectl.get(KEY.namespace, KEY.name)
        assert stuck is not None and stuck["metadata"]["deletionTimestamp"]

        # The command as a process, as the hook's Job runs it (KUBECONFIG here, the pod's
        # service account in a cluster).
        env = {"PATH": os.environ.get("PATH", ""), "KUBECONFIG": str(tmp_path / "kubeconfig")}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailbeacon.app.cli",
            "operator",
            "release-campaigns",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, output.decode()
        assert "released 1 Campaign(s)" in output.decode()
        assert await kubectl.get(KEY.namespace, KEY.name) is None  # the deletion went through


async def _create(http: aiohttp.ClientSession, kube: FakeKubernetes, path: str, body: dict[str, Any]) -> None:
    async with http.post(kube.url + path, json=body) as response:
        assert response.status == 201, await response.text()


def _campaign(namespace: str, name: str, finalizers: list[str]) -> tuple[str, dict[str, Any]]:
    manifest = campaign_manifest()
    manifest["metadata"] = {"name": name, "namespace": namespace, "finalizers": finalizers}
    return f"/apis/mailbeacon.io/v1alpha1/namespaces/{namespace}/campaigns", manifest


@pytest.mark.slow
async def test_the_operator_is_stopped_first_and_only_its_finalizer_goes(kube: FakeKubernetes) -> None:
    other = "example.com/backup"
    async with aiohttp.ClientSession() as http:
        await _create(
            http,
            kube,
            f"/apis/apps/v1/namespaces/{RELEASE}/deployments",
            {
                "metadata": {"name": "mb-mailbeacon-operator"},
                "spec": {"replicas": 1, "selector": {"matchLabels": OPERATOR_LABELS}},
            },
        )
        await _create(
            http,
            kube,
            f"/api/v1/namespaces/{RELEASE}/pods",
            {"metadata": {"name": "op-1", "labels": OPERATOR_LABELS}},
        )
        tracker = {"app.kubernetes.io/instance": "mb", "app.kubernetes.io/component": "tracker"}
        await _create(
            http,
            kube,
            f"/api/v1/namespaces/{RELEASE}/pods",
            {"metadata": {"name": "tr-1", "labels": tracker}},
        )
        for namespace, name, finalizers in (
            ("marketing", "shared", [other, FINALIZER]),
            ("marketing", "leaving", [FINALIZER]),
            ("marketing", "plain", []),
            ("shop", "receipts", [FINALIZER]),
            ("other", "unserved", [FINALIZER]),  # a namespace the operator did not watch
        ):
            await _create(http, kube, *_campaign(namespace, name, finalizers))
        async with http.delete(
            kube.url + "/apis/mailbeacon.io/v1alpha1/namespaces/marketing/campaigns/leaving"
        ):
            pass

        async def kubelet() -> None:
            """Ends the operator's pod a moment after its Deployment was scaled to 0."""

            async def scaled() -> bool:
                deployment = kube.get("deployments", RELEASE, "mb-mailbeacon-operator")
                return deployment is not None and deployment["spec"]["replicas"] == 0

            await eventually(scaled)
            await asyncio.sleep(0.5)
            async with http.delete(kube.url + f"/api/v1/namespaces/{RELEASE}/pods/op-1") as response:
                assert response.status == 200

        ending = asyncio.create_task(kubelet())
        info = kopf.ConnectionInfo(server=kube.url, token="test-token")
        result = await run(["marketing", "shop"], "mb-mailbeacon-operator", RELEASE, within=20, info=info)
        await ending

    assert sorted(result.released) == ["marketing/shared", "shop/receipts"]
    assert result.deleted == ["marketing/leaving"]
    campaign = lambda ns, name: kube.get("campaigns", ns, name)  # noqa: E731
    assert campaign("marketing", "shared")["metadata"]["finalizers"] == [other]  # others' stay
    assert campaign("marketing", "leaving") is None  # it was being deleted: now it is gone
    assert not campaign("shop", "receipts")["metadata"].get("finalizers")
    assert campaign("other", "unserved")["metadata"]["finalizers"] == [FINALIZER]
    assert kube.get("pods", RELEASE, "tr-1") is not None
    # No finalizer was touched while the operator's pod could still put it back.
    requests = kube.requests
    pod_gone = requests.index(("DELETE", f"/api/v1/namespaces/{RELEASE}/pods/op-1"))
    patches = [i for i, (method, path) in enumerate(requests) if method == "PATCH" and "/campaigns/" in path]
    assert patches and min(patches) > pod_gone


@pytest.mark.slow
async def test_an_operator_that_does_not_stop_fails_the_hook(kube: FakeKubernetes) -> None:
    async with aiohttp.ClientSession() as http:
        await _create(
            http,
            kube,
            f"/apis/apps/v1/namespaces/{RELEASE}/deployments",
            {
                "metadata": {"name": "op"},
                "spec": {"replicas": 1, "selector": {"matchLabels": OPERATOR_LABELS}},
            },
        )
        await _create(
            http,
            kube,
            f"/api/v1/namespaces/{RELEASE}/pods",
            {"metadata": {"name": "op-1", "labels": OPERATOR_LABELS}},
        )
        await _create(http, kube, *_campaign("shop", "receipts", [FINALIZER]))
    info = kopf.ConnectionInfo(server=kube.url, token="test-token")
    with pytest.raises(KubeError, match="did not end within"):
        await run([], "op", RELEASE, within=0.5, info=info)
    # Nothing released while the operator could still run: it would undo it.
    assert kube.get("campaigns", "shop", "receipts")["metadata"]["finalizers"] == [FINALIZER]
    # Without an operator Deployment (already gone) there is nothing to wait for.
    result = await run([], "not-there", RELEASE, within=0.5, info=info)
    assert result.released == ["shop/receipts"]


def test_the_patch_removes_exactly_the_operators_finalizer() -> None:
    campaign = {"metadata": {"finalizers": ["a/b", FINALIZER, "c/d"]}}
    assert finalizer_removal(campaign) == [
        {"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER},
        {"op": "remove", "path": "/metadata/finalizers/1"},
    ]
    assert finalizer_removal({"metadata": {"finalizers": ["a/b"]}}) is None
    assert finalizer_removal({"metadata": {}}) is None
