"""``mailbeacon operator release-campaigns``: let Campaigns go before the operator does.

kopf keeps its finalizer (:data:`~campaign_operator.resource.FINALIZER`) on every Campaign it
serves, so that it can take the campaign out of the KV bucket when the Campaign is deleted. Once
the operator is uninstalled nobody removes it, and a Campaign deleted then (or being deleted)
hangs with its ``deletionTimestamp`` set. This command, run by the chart's ``pre-delete`` hook
(or by hand, docs/kubernetes.md "Uninstall"), first stops the operator when told its Deployment (a running
operator would put the finalizer straight back), then takes the finalizer off every Campaign in
the namespaces the operator served. Other finalizers are left alone.

It talks to the Kubernetes API over HTTPS with aiohttp, with the credentials kopf's own login
handlers find: the pod's service account in a cluster, else KUBECONFIG.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf

from campaign_operator.resource import FINALIZER, GROUP, PLURAL, VERSION
from mailbeacon.contract.settings import Settings

log = logging.getLogger(__name__)

JSON = dict[str, Any]
# A Campaign changed between our read and our patch (the test of its finalizers failed): read
# it again, this many times.
PATCH_ATTEMPTS = 5


class KubeError(Exception):
    """The Kubernetes API refused a request this command cannot do without."""


def finalizer_removal(campaign: JSON, finalizer: str = FINALIZER) -> list[JSON] | None:
    """A JSON patch taking ``finalizer`` off ``campaign``, or None when it has none.

    The ``test`` makes the patch fail (422) if the list changed since it was read, so another
    controller's finalizer is never removed by mistake.
    """
    finalizers = list((campaign.get("metadata") or {}).get("finalizers") or [])
    if finalizer not in finalizers:
        return None
    index = finalizers.index(finalizer)
    path = f"/metadata/finalizers/{index}"
    return [{"op": "test", "path": path, "value": finalizer}, {"op": "remove", "path": path}]


def label_selector(match_labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(match_labels.items()))


@dataclass
class Released:
    """What the command did, for its summary line."""

    released: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # were being deleted: gone with the finalizer
    untouched: int = 0  # Campaigns without our finalizer


class Kube:
    """A few calls of the Kubernetes API."""

    def __init__(self, session: aiohttp.ClientSession, server: str) -> None:
        self.session = session
        self.server = server.rstrip("/")

    async def call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(method, self.server + path, json=body, headers=headers) as response:
            try:
                payload = await response.json(content_type=None)
            except ValueError:
                payload = None
            return response.status, payload

    async def ok(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        status, payload = await self.call(method, path, body, content_type)
        if status >= 300:
            message = payload.get("message") if isinstance(payload, dict) else payload
            raise KubeError(f"{method} {path}: {status} {message}")
        return payload


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    """TLS to the API server: its CA (a file, or a kubeconfig's base64 data) and a client
    certificate when the credentials have one."""
    if info.insecure:
        return False
    ca_data = base64.b64decode(info.ca_data).decode() if info.ca_data else None
    context = ssl.create_default_context(cafile=info.ca_path, cadata=ca_data)
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(info.certificate_path, info.private_key_path)
    elif info.certificate_data and info.private_key_data:
        # ssl loads certificates from files only: a private directory for the moment it reads them.
        with tempfile.TemporaryDirectory() as directory:
            cert, key = Path(directory, "client.crt"), Path(directory, "client.key")
            cert.write_bytes(base64.b64decode(info.certificate_data))
            key.write_bytes(base64.b64decode(info.private_key_data))
            context.load_cert_chain(cert, key)
    return context


def connection_info() -> kopf.ConnectionInfo:
    """The service account's credentials in a pod, else KUBECONFIG's (kopf's login handlers)."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise SystemExit(
            "release-campaigns: no Kubernetes credentials (no service account token, no KUBECONFIG)"
        )
    return info


def open_session(info: kopf.ConnectionInfo) -> aiohttp.ClientSession:
    headers: dict[str, str] = {"Accept": "application/json"}
    if info.token:
        headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
    auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
    connector = aiohttp.TCPConnector(ssl=_ssl_context(info)) if info.server.startswith("https") else None
    return aiohttp.ClientSession(
        headers=headers, auth=auth, connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    )


async def stop_deployment(kube: Kube, namespace: str, name: str, within: float, poll: float = 1.0) -> None:
    """Scale the Deployment to 0 and wait until none of its pods is left (terminating ones
    included: kopf still handles events until its process ends)."""
    path = f"/apis/apps/v1/namespaces/{quote(namespace)}/deployments/{quote(name)}"
    status, deployment = await kube.call("GET", path)
    if status == 404:
        log.info("deployment %s/%s not found: no operator to stop", namespace, name)
        return
    if status >= 300:
        raise KubeError(f"GET {path}: {status}")
    selector = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    await kube.ok("PATCH", path, {"spec": {"replicas": 0}}, "application/merge-patch+json")
    log.info("scaled deployment %s/%s to 0; waiting for its pods to end", namespace, name)
    if not selector:
        return
    pods = (
        f"/api/v1/namespaces/{quote(namespace)}/pods?{urlencode({'labelSelector': label_selector(selector)})}"
    )
    deadline = time.monotonic() + within
    while True:
        remaining = [p["metadata"]["name"] for p in (await kube.ok("GET", pods)).get("items") or []]
        if not remaining:
            log.info("the operator's pods have ended")
            return
        if time.monotonic() >= deadline:
            raise KubeError(f"the operator's pods did not end within {within:g} s: {', '.join(remaining)}")
        await asyncio.sleep(poll)


def _campaigns_path(namespace: str | None, name: str = "") -> str:
    scope = f"/namespaces/{quote(namespace)}" if namespace else ""
    return f"/apis/{GROUP}/{VERSION}{scope}/{PLURAL}" + (f"/{quote(name)}" if name else "")


async def release_campaigns(kube: Kube, namespaces: list[str]) -> Released:
    """Take the operator's finalizer off every Campaign in ``namespaces`` (empty: all)."""
    result = Released()
    scopes: list[str | None] = list(namespaces) or [None]
    for namespace in scopes:
        listing = await kube.ok("GET", _campaigns_path(namespace))
        for campaign in listing.get("items") or []:
            meta = campaign["metadata"]
            ref = f"{meta['namespace']}/{meta['name']}"
            outcome = await _release_one(kube, meta["namespace"], meta["name"], campaign)
            if outcome == "released":
                (result.deleted if meta.get("deletionTimestamp") else result.released).append(ref)
            else:
                result.untouched += 1
    return result


async def _release_one(kube: Kube, namespace: str, name: str, campaign: JSON) -> str:
    path = _campaigns_path(namespace, name)
    for _ in range(PATCH_ATTEMPTS):
        patch = finalizer_removal(campaign)
        if patch is None:
            return "untouched"
        status, body = await kube.call("PATCH", path, patch, "application/json-patch+json")
        if status < 300:
            log.info("released campaign %s/%s", namespace, name)
            return "released"
        if status == 404:
            return "untouched"  # deleted meanwhile
        if status not in (409, 422):
            message = body.get("message") if isinstance(body, dict) else body
            raise KubeError(f"PATCH {path}: {status} {message}")
        status, campaign = await kube.call("GET", path)  # changed since we read it: again
        if status == 404:
            return "untouched"
    raise KubeError(f"campaign {namespace}/{name} kept changing; its finalizer is still on")


async def run(
    namespaces: list[str],
    deployment: str | None = None,
    deployment_namespace: str | None = None,
    within: float = 120.0,
    info: kopf.ConnectionInfo | None = None,
) -> Released:
    """The command: stop the operator's ``deployment`` (in ``deployment_namespace``, else the
    service account's namespace), then release the Campaigns."""
    info = info or connection_info()
    async with open_session(info) as session:
        kube = Kube(session, info.server)
        if deployment:
            namespace = deployment_namespace or info.default_namespace
            if not namespace:
                raise SystemExit("release-campaigns: --namespace is required with --stop-deployment here")
            await stop_deployment(kube, namespace, deployment, within)
        result = await release_campaigns(kube, namespaces)
    print(
        f"released {len(result.released) + len(result.deleted)} Campaign(s) from finalizer {FINALIZER}"
        f" ({len(result.deleted)} of them were being deleted and are gone); "
        f"{result.untouched} had none",
        flush=True,
    )
    return result


def release_command(
    settings: Settings, deployment: str | None, namespace: str | None, timeout: float
) -> None:
    """``mailbeacon operator release-campaigns``: errors become one line and exit status 1."""
    try:
        asyncio.run(run(settings.operator.namespaces, deployment, namespace, timeout))
    except (KubeError, aiohttp.ClientError, OSError) as exc:
        raise SystemExit(f"release-campaigns: {exc}") from exc
