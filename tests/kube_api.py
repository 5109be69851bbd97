"""A Kubernetes API server for tests: enough of the real protocol for kopf's runtime.

The Kubernetes API server lies outside our walls, so tests talk to this one instead. It
serves discovery (``/api``, ``/apis``), namespaces, core Events and the custom resources of
the CRDs it is given (with their ``/status`` subresource), over real HTTP on 127.0.0.1, in
its own thread and event loop. It keeps the semantics kopf depends on:

- one resourceVersion counter; list answers carry it and a watch replays every change
  newer than the version it was asked for, then streams live changes;
- merge patches and JSON patches (with ``test`` operations: a stale resourceVersion gets 422);
- the status subresource: the main resource ignores status changes and ``/status`` ignores
  everything else; ``metadata.generation`` moves only when the spec changes;
- finalizers: DELETE marks the object with a deletionTimestamp while finalizers remain, and
  it disappears when the last one is removed;
- the CRD's structural schema: defaults applied, unknown fields pruned (and recorded in
  :attr:`FakeKubernetes.pruned`), invalid objects refused with 422.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
from aiohttp import web

from tests.kube_patch import PatchConflict, json_patch, merge_patch
from tests.kube_schema import apply_defaults, crd_json_schema, prune

JSON = dict[str, Any]


# --- resources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    schema: JSON | None = None  # openAPIV3Schema of a custom resource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def discovery(self) -> list[JSON]:
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        entries = [
            {
                "name": self.plural,
                "singularName": self.kind.lower(),
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": verbs,
                "shortNames": list(self.short_names),
            }
        ]
        if self.status_subresource:
            entries.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        return entries


NAMESPACES = ResourceType("", "v1", "namespaces", "Namespace", namespaced=False)
EVENTS = ResourceType("", "v1", "events", "Event", namespaced=True)
# Served on request (``FakeKubernetes(builtins=[...])``): no schema, stored as given, nothing
# reconciles them.
DEPLOYMENTS = ResourceType("apps", "v1", "deployments", "Deployment", namespaced=True)
PODS = ResourceType("", "v1", "pods", "Pod", namespaced=True)
MUTATING_WEBHOOK_CONFIGURATIONS = ResourceType(
    "admissionregistration.k8s.io",
    "v1",
    "mutatingwebhookconfigurations",
    "MutatingWebhookConfiguration",
    namespaced=False,
)


def resource_from_crd(crd: Mapping[str, Any]) -> ResourceType:
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v.get("storage"))
    return ResourceType(
        group=spec["group"],
        version=version["name"],
        plural=spec["names"]["plural"],
        kind=spec["names"]["kind"],
        namespaced=spec["scope"] == "Namespaced",
        short_names=tuple(spec["names"].get("shortNames", [])),
        status_subresource="status" in (version.get("subresources") or {}),
        schema=version["schema"]["openAPIV3Schema"],
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message}
    return web.json_response(body | {"reason": reason, "code": code}, status=code)


@dataclass
class Change:
    rv: int
    resource: ResourceType
    namespace: str | None
    type: str  # ADDED, MODIFIED, DELETED
    object: JSON


@dataclass
class FakeKubernetes:
    """The API server. ``start()`` serves it from a thread; ``url`` is its address."""

    crds: list[JSON]
    namespaces: list[str] = field(default_factory=lambda: ["default"])
    pruned: list[str] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    builtins: list[ResourceType] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.types = [NAMESPACES, EVENTS, *self.builtins, *(resource_from_crd(crd) for crd in self.crds)]
        self.objects: dict[tuple[str, str, str | None, str], JSON] = {}
        self.history: list[Change] = []
        self.rv = 0
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Condition | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._runner: web.AppRunner | None = None

    # --- lifecycle (called from the test's thread) ---

    def start(self) -> FakeKubernetes:
        self._thread = threading.Thread(target=self._serve, name="fake-kubernetes", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake Kubernetes API did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(config))
        return path

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._startup())
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _startup(self) -> None:
        self._changed = asyncio.Condition()
        for name in self.namespaces:
            self._store(NAMESPACES, None, name, {"metadata": {"name": name}, "status": {"phase": "Active"}})
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def _shutdown(self) -> None:
        self._closing = True
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- reading state from tests (thread-safe snapshots) ---

    def _call(self, fn: Any) -> Any:
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def get(self, plural: str, namespace: str | None, name: str) -> JSON | None:
        def read() -> JSON | None:
            resource = self._type(plural)
            found = self.objects.get((resource.api_version, plural, namespace, name))
            return copy.deepcopy(found) if found is not None else None

        result: JSON | None = self._call(read)
        return result

    def events(self, namespace: str | None = None) -> list[JSON]:
        def read() -> list[JSON]:
            return [
                copy.deepcopy(obj)
                for (_, plural, ns, _), obj in self.objects.items()
                if plural == "events" and (namespace is None or ns == namespace)
            ]

        result: list[JSON] = self._call(read)
        return result

    # --- storage ---

    def _type(self, plural: str, group: str | None = None) -> ResourceType:
        for resource in self.types:
            if resource.plural == plural and (group is None or resource.group == group):
                return resource
        raise KeyError(plural)

    def _store(
        self, resource: ResourceType, namespace: str | None, name: str, obj: JSON | None
    ) -> JSON | None:
        """Write (or with None delete) an object: a new resourceVersion and a watch change."""
        key = (resource.api_version, resource.plural, namespace, name)
        self.rv += 1
        if obj is None:
            gone = self.objects.pop(key)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._record(Change(self.rv, resource, namespace, "DELETED", gone))
            return None
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        meta = obj.setdefault("metadata", {})
        meta["name"] = name
        if namespace is not None:
            meta["namespace"] = namespace
        meta["resourceVersion"] = str(self.rv)
        created = key not in self.objects
        if created:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("generation", 1)
        self.objects[key] = obj
        self._record(Change(self.rv, resource, namespace, "ADDED" if created else "MODIFIED", obj))
        return obj

    def _record(self, change: Change) -> None:
        change.object = copy.deepcopy(change.object)
        self.history.append(change)
        assert self._changed is not None

        async def notify() -> None:
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def _admit(self, resource: ResourceType, obj: JSON) -> JSON | web.Response:
        """Defaults, pruning and validation of a custom resource, as the API server admits it."""
        if resource.schema is None:
            return obj
        for part in ("spec", "status"):
            sub = resource.schema.get("properties", {}).get(part)
            if sub is not None and part in obj:
                obj[part] = apply_defaults(sub, obj[part])
                obj[part] = prune(sub, obj[part], f".{part}", self.pruned)
        schema = crd_json_schema(resource.schema)
        schema["properties"]["metadata"] = {"type": "object"}
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            detail = "; ".join(f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors)
            return _status(
                422, "Invalid", f"{resource.kind} {obj['metadata'].get('name')} is invalid: {detail}"
            )
        return obj

    # --- HTTP ---

    def _parse(self, path: str) -> tuple[ResourceType, str | None, str | None, str | None] | None:
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 3:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, rest = parts[1], parts[3:]
        else:
            return None
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        try:
            resource = self._type(rest[0], group)
        except KeyError:
            return None
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        return resource, namespace, name, subresource

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        path = request.path.rstrip("/")
        if path == "/version":
            return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
        if path == "/api":
            return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            return web.json_response(self._groups())
        if path.startswith(("/api/", "/apis/")) and len([p for p in path.split("/") if p]) == (
            2 if path.startswith("/api/") else 3
        ):
            return self._resource_list(path)
        parsed = self._parse(path)
        if parsed is None:
            return _status(404, "NotFound", f"the server could not find {path}")
        resource, namespace, name, subresource = parsed
        if subresource not in (None, "status") or (
            subresource == "status" and not resource.status_subresource
        ):
            return _status(404, "NotFound", f"no subresource {subresource}")
        if request.method == "GET" and name is None:
            if request.query.get("watch") in ("true", "1"):
                return await self._watch(request, resource, namespace)
            return self._list(resource, namespace, request.query.get("labelSelector", ""))
        if request.method == "GET":
            found = self.objects.get((resource.api_version, resource.plural, namespace, name))
            if found is None:
                return _status(404, "NotFound", f'{resource.plural} "{name}" not found')
            return web.json_response(found)
        if request.method == "POST" and name is None:
            return await self._create(request, resource, namespace)
        if request.method == "PATCH" and name is not None:
            return await self._patch(request, resource, namespace, name, subresource)
        if request.method == "DELETE" and name is not None:
            return self._delete(resource, namespace, name)
        return _status(405, "MethodNotAllowed", f"{request.method} is not supported here")

    def _groups(self) -> JSON:
        groups: dict[str, list[str]] = {}
        for resource in self.types:
            if resource.group:
                groups.setdefault(resource.group, [])
                if resource.version not in groups[resource.group]:
                    groups[resource.group].append(resource.version)
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": group,
                    "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                    "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]},
                }
                for group, versions in groups.items()
            ],
        }

    def _resource_list(self, path: str) -> web.Response:
        group_version = path.removeprefix("/api/").removeprefix("/apis/")
        entries = [
            entry
            for resource in self.types
            if resource.api_version == group_version
            for entry in resource.discovery()
        ]
        if not entries:
            return _status(404, "NotFound", f"no API {group_version}")
        return web.json_response(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": entries,
            }
        )

    def _select(self, resource: ResourceType, namespace: str | None) -> list[JSON]:
        return [
            obj
            for (api_version, plural, ns, _), obj in sorted(self.objects.items(), key=lambda kv: str(kv[0]))
            if api_version == resource.api_version
            and plural == resource.plural
            and (namespace is None or ns == namespace)
        ]

    def _list(self, resource: ResourceType, namespace: str | None, selector: str = "") -> web.Response:
        # Equality-based label selectors ("a=b,c=d"), as kubectl's -l sends them.
        wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
        items = [
            obj
            for obj in self._select(resource, namespace)
            if wanted.items() <= (obj["metadata"].get("labels") or {}).items()
        ]
        return web.json_response(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, resource: ResourceType, namespace: str | None
    ) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.rv)
        timeout = float(request.query.get("timeoutSeconds") or 3600)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        assert self._changed is not None
        try:
            while not self._closing and loop.time() < deadline:
                for change in [c for c in self.history if c.rv > since]:
                    since = change.rv
                    if change.resource != resource or (
                        namespace is not None and change.namespace != namespace
                    ):
                        continue
                    line = json.dumps({"type": change.type, "object": change.object}) + "\n"
                    await response.write(line.encode())
                async with self._changed:
                    if self.history and self.history[-1].rv > since:
                        continue  # changed while we were writing: no notification will come
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        break
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        return response

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            return None

    async def _create(
        self, request: web.Request, resource: ResourceType, namespace: str | None
    ) -> web.Response:
        obj = await self._body(request)
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            return _status(400, "BadRequest", "the body must be an object with metadata")
        if not obj["metadata"].get("name") and obj["metadata"].get("generateName"):
            obj["metadata"]["name"] = obj["metadata"]["generateName"] + uuid.uuid4().hex[:5]
        if not obj["metadata"].get("name"):
            return _status(422, "Invalid", "metadata.name or metadata.generateName is required")
        if resource.namespaced and (
            namespace is None or (NAMESPACES.api_version, "namespaces", None, namespace) not in self.objects
        ):
            return _status(404, "NotFound", f'namespaces "{namespace}" not found')
        name = obj["metadata"]["name"]
        if (resource.api_version, resource.plural, namespace, name) in self.objects:
            return _status(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
        obj = copy.deepcopy(obj)
        if resource.status_subresource:
            obj.pop("status", None)
        for server_owned in (
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
        ):
            obj["metadata"].pop(server_owned, None)
        admitted = self._admit(resource, obj)
        if isinstance(admitted, web.Response):
            return admitted
        stored = self._store(resource, namespace, name, admitted)
        return web.json_response(stored, status=201)

    async def _patch(
        self,
        request: web.Request,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        subresource: str | None,
    ) -> web.Response:
        key = (resource.api_version, resource.plural, namespace, name)
        current = self.objects.get(key)
        if current is None:
            return _status(404, "NotFound", f'{resource.plural} "{name}" not found')
        body = await self._body(request)
        content_type = request.content_type
        try:
            if content_type == "application/merge-patch+json" and isinstance(body, dict):
                patched = merge_patch(current, body)
            elif content_type == "application/json-patch+json" and isinstance(body, list):
                patched = json_patch(current, body)
            else:
                return _status(
                    415, "UnsupportedMediaType", f"{content_type} is not supported for this resource"
                )
        except PatchConflict as exc:
            return _status(422, "Invalid", str(exc))
        # The main resource ignores status; the status subresource ignores everything else.
        if resource.status_subresource:
            if subresource == "status":
                patched = copy.deepcopy(current) | {"status": patched.get("status")}
                if patched["status"] is None:
                    patched.pop("status")
            else:
                patched.pop("status", None)
                if "status" in current:
                    patched["status"] = copy.deepcopy(current["status"])
        meta, before = patched.setdefault("metadata", {}), current["metadata"]
        for server_owned in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
            "name",
            "namespace",
        ):
            if server_owned in before:
                meta[server_owned] = before[server_owned]
            else:
                meta.pop(server_owned, None)
        admitted = self._admit(resource, patched)
        if isinstance(admitted, web.Response):
            return admitted
        if admitted == current:
            return web.json_response(current)  # no change: no new resourceVersion, no watch event
        if admitted.get("spec") != current.get("spec"):
            meta["generation"] = int(before.get("generation", 1)) + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._store(resource, namespace, name, None)
            return web.json_response(admitted)
        stored = self._store(resource, namespace, name, admitted)
        return web.json_response(stored)

    def _delete(self, resource: ResourceType, namespace: str | None, name: str) -> web.Response:
        key = (resource.api_version, resource.plural, namespace, name)
        current = self.objects.get(key)
        if current is None:
            return _status(404, "NotFound", f'{resource.plural} "{name}" not found')
        if current["metadata"].get("finalizers"):
            if not current["metadata"].get("deletionTimestamp"):
                marked = copy.deepcopy(current)
                marked["metadata"]["deletionTimestamp"] = _now()
                marked["metadata"]["deletionGracePeriodSeconds"] = 0
                current = self._store(resource, namespace, name, marked) or current
            return web.json_response(current, status=202)
        self._store(resource, namespace, name, None)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})
