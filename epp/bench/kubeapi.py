"""An in-memory Kubernetes API server for the tests and ``epp bench discovery``.

There is no kube-apiserver on our machines, so this speaks the part of the real HTTP API
that the EPP's client uses, with the semantics that matter for correctness:

- API discovery: ``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>``, ``/apis/<group>/<version>``
  list only the resource types installed (so CRD group fallback can be tested);
- list with ``labelSelector`` (full syntax), ``fieldSelector`` (``path=v``, ``path!=v``) and
  the list's ``metadata.resourceVersion``;
- watch with ``resourceVersion`` (replays history after it, or ``ERROR`` 410 Gone when that
  version was compacted away, as the real server does inside a 200 stream), synthetic
  ``ADDED`` events for a watch without a version, ``allowWatchBookmarks`` (periodic
  ``BOOKMARK``), ``timeoutSeconds``, and label-selector transitions turned into
  ``ADDED``/``DELETED`` like the watch cache does;
- create (409 AlreadyExists), replace with optimistic concurrency (409 Conflict when the
  body's ``metadata.resourceVersion`` is not the current one), JSON merge patch, delete;
- a global, monotonically increasing resourceVersion (etcd's revision);
- optional bearer-token authentication (401 otherwise).

The store is usable from any thread (tests change objects synchronously while the server
runs on its own loop); ``KubeApiThread`` runs a server in a background thread and
``stop_listener``/``start_listener`` simulate an API-server restart (watches cut, state kept).

``python -m epp.bench.kubeapi --port P`` runs one standalone (the discovery benchmark runs
it as a separate process that also generates pod churn).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import json
import random
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from aiohttp import web

from epp.discovery import resources as R
from epp.discovery.labels import LabelSelector, SelectorError, parse_selector
from epp.discovery.resources import ResourceType

Obj = dict[str, Any]
_END = object()  # queued to end a watch stream


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


@dataclass(eq=False)
class _Watcher:
    rtype: ResourceType
    namespace: str | None
    labels: LabelSelector
    fields: list[tuple[str, str, str]]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def push(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _field_value(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return "" if cur is None else str(cur)


def _parse_fields(text: str) -> list[tuple[str, str, str]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        for op in ("!=", "==", "="):
            if op in part:
                path, _, value = part.partition(op)
                out.append((path.strip(), "!=" if op == "!=" else "=", value.strip()))
                break
        else:
            raise ApiError(400, "BadRequest", f"invalid field selector {part!r}")
    return out


def _matches(obj: Obj, namespace: str | None, labels: LabelSelector, fields: list[tuple[str, str, str]]) -> bool:
    meta = obj.get("metadata") or {}
    if namespace and meta.get("namespace") != namespace:
        return False
    if not labels.matches(meta.get("labels") or {}):
        return False
    return all((_field_value(obj, p) == v) == (op == "=") for p, op, v in fields)


def _go_bool(text: str | None) -> bool:
    return text in ("1", "t", "T", "true", "TRUE", "True")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class KubeStore:
    """Objects by (resource type, namespace, name), a revision counter and the event history."""

    def __init__(self, types: Iterable[ResourceType] = R.ALL, *, history: int = 100_000,
                 first_revision: int = 1000) -> None:
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for t in types:
            self.install(t)
        self._lock = threading.RLock()
        self._objects: dict[tuple[ResourceType, str, str], Obj] = {}
        self.revision = first_revision
        self._history: collections.deque[tuple[int, ResourceType, str, Obj | None, Obj]] = collections.deque(
            maxlen=history)
        self.compacted = first_revision  # watches from an older revision get 410 Gone
        self._watchers: set[_Watcher] = set()
        self.writes = 0

    # --- resource types (CRDs) -------------------------------------------------------------
    def install(self, t: ResourceType) -> None:
        self.types[(t.group, t.version, t.plural)] = t

    def uninstall(self, t: ResourceType) -> None:
        self.types.pop((t.group, t.version, t.plural), None)

    def installed(self, t: ResourceType) -> bool:
        return (t.group, t.version, t.plural) in self.types

    # --- reads -----------------------------------------------------------------------------
    def get(self, t: ResourceType, namespace: str, name: str) -> Obj | None:
        with self._lock:
            obj = self._objects.get((t, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, t: ResourceType, namespace: str | None = None, labels: LabelSelector = LabelSelector(),
             fields: list[tuple[str, str, str]] | None = None) -> tuple[list[Obj], int]:
        with self._lock:
            items = [copy.deepcopy(o) for (rt, _, _), o in sorted(self._objects.items(), key=lambda kv: kv[0][1:])
                     if rt == t and _matches(o, namespace, labels, fields or [])]
            return items, self.revision

    # --- writes ----------------------------------------------------------------------------
    def create(self, t: ResourceType, obj: Obj, namespace: str | None = None) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        ns = (namespace or meta.get("namespace") or "default") if t.namespaced else ""
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        with self._lock:
            if (t, ns, name) in self._objects:
                raise ApiError(409, "AlreadyExists", f'{t.plural}.{t.group} "{name}" already exists')
            if t.namespaced:
                meta["namespace"] = ns
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            meta["generation"] = 1
            obj["apiVersion"], obj["kind"] = t.api_version, t.kind
            return self._commit(t, ns, name, None, obj, "ADDED")

    def replace(self, t: ResourceType, obj: Obj, namespace: str | None = None) -> Obj:
        """PUT: optimistic concurrency on metadata.resourceVersion when the body carries one."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        ns = (namespace or meta.get("namespace") or "default") if t.namespaced else ""
        name = meta.get("name", "")
        with self._lock:
            old = self._objects.get((t, ns, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{t.plural}.{t.group} "{name}" not found')
            sent = meta.get("resourceVersion")
            if sent and sent != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {t.plural}.{t.group} "{name}": '
                                                "the object has been modified; please apply your changes to the "
                                                "latest version and try again")
            return self._update(t, ns, name, old, obj)

    def patch(self, t: ResourceType, namespace: str, name: str, patch: Obj) -> Obj:
        with self._lock:
            old = self._objects.get((t, namespace, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{t.plural}.{t.group} "{name}" not found')
            return self._update(t, namespace, name, old, merge_patch(old, patch))

    def delete(self, t: ResourceType, namespace: str, name: str) -> Obj:
        with self._lock:
            old = self._objects.get((t, namespace, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{t.plural}.{t.group} "{name}" not found')
            gone = copy.deepcopy(old)
            return self._commit(t, namespace, name, old, gone, "DELETED")

    def _update(self, t: ResourceType, ns: str, name: str, old: Obj, new: Obj) -> Obj:
        meta = new["metadata"] = dict(new.get("metadata") or {})  # never alter the old version in place
        for keep in ("uid", "creationTimestamp", "namespace", "name"):
            if keep in old["metadata"]:
                meta[keep] = old["metadata"][keep]
        meta["generation"] = old["metadata"].get("generation", 1) + (old.get("spec") != new.get("spec"))
        new["apiVersion"], new["kind"] = t.api_version, t.kind
        return self._commit(t, ns, name, old, new, "MODIFIED")

    def _commit(self, t: ResourceType, ns: str, name: str, old: Obj | None, new: Obj, kind: str) -> Obj:
        self.revision += 1
        self.writes += 1
        new["metadata"]["resourceVersion"] = str(self.revision)
        if kind == "DELETED":
            self._objects.pop((t, ns, name), None)
        else:
            self._objects[(t, ns, name)] = new
        self._history.append((self.revision, t, kind, old, new))
        if len(self._history) == self._history.maxlen:
            self.compacted = self._history[0][0] - 1
        for w in list(self._watchers):
            if w.rtype == t:
                ev = _event_for(w, kind, old, new)
                if ev is not None:
                    w.push(ev)
        return copy.deepcopy(new)

    def compact(self) -> None:
        """Forget the history, as etcd compaction does: older watches get 410 Gone."""
        with self._lock:
            self._history.clear()
            self.compacted = self.revision

    # --- watches ---------------------------------------------------------------------------
    def open_watch(self, w: _Watcher, since: str) -> list[Obj]:
        """Register ``w``; return the events it must see first (or raise 410)."""
        with self._lock:
            if since in ("", "0"):
                items, _ = self.list(w.rtype, w.namespace, w.labels, w.fields)
                first = [{"type": "ADDED", "object": o} for o in items]
            else:
                try:
                    rv = int(since)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resourceVersion {since!r}") from None
                if rv < self.compacted:
                    raise ApiError(410, "Expired", f"too old resource version: {rv} ({self.compacted})")
                first = []
                for rev, t, kind, old, new in self._history:
                    if rev > rv and t == w.rtype:
                        ev = _event_for(w, kind, old, new)
                        if ev is not None:
                            first.append(ev)
                first = [{"type": e["type"], "object": copy.deepcopy(e["object"])} for e in first]
            self._watchers.add(w)
            return first

    def close_watch(self, w: _Watcher) -> None:
        with self._lock:
            self._watchers.discard(w)

    def end_all_watches(self) -> None:
        with self._lock:
            for w in list(self._watchers):
                w.push(_END)


def _event_for(w: _Watcher, kind: str, old: Obj | None, new: Obj) -> Obj | None:
    now_in = _matches(new, w.namespace, w.labels, w.fields)
    was_in = old is not None and _matches(old, w.namespace, w.labels, w.fields)
    if kind == "DELETED":
        return {"type": "DELETED", "object": new} if was_in else None
    if now_in and was_in:
        return {"type": "MODIFIED", "object": new}
    if now_in:
        return {"type": "ADDED", "object": new}
    if was_in:  # left the selector: the watch cache reports it as deleted
        return {"type": "DELETED", "object": new}
    return None


class KubeApiServer:
    """The HTTP front of a KubeStore (aiohttp)."""

    def __init__(self, store: KubeStore | None = None, *, token: str | None = None,
                 bookmark_interval: float = 1.0, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store or KubeStore()
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.host, self.port = host, port
        self.requests: collections.Counter[str] = collections.Counter()  # "GET pods watch" -> count
        self._runner: web.AppRunner | None = None
        self._streams: set[web.StreamResponse] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> "KubeApiServer":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        """Close the port first, then end every watch cleanly (clients see the stream end and
        cannot reconnect to this instance), then drop the connections."""
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
            self.store.end_all_watches()
            await asyncio.sleep(0.01)
            await self._runner.cleanup()
            self._runner = None

    # --- routing ---------------------------------------------------------------------------
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            parts = [p for p in request.path.split("/") if p]
            disc = self._discovery(parts)
            if disc is not None:
                return web.json_response(disc)
            t, ns, name = self._resolve(parts)
            verb = request.method
            watching = _go_bool(request.query.get("watch"))
            self.requests[f"{verb} {t.plural}{' watch' if watching else ''}"] += 1
            if verb == "GET" and watching:
                return await self._watch(request, t, ns)
            if verb == "GET" and name is None:
                return self._list(request, t, ns)
            if verb == "GET":
                obj = self.store.get(t, ns or "", name)
                if obj is None:
                    raise ApiError(404, "NotFound", f'{t.plural}.{t.group} "{name}" not found')
                return web.json_response(obj)
            if verb == "POST" and name is None:
                return web.json_response(self.store.create(t, await request.json(), ns), status=201)
            if verb == "PUT" and name is not None:
                body = await request.json()
                body.setdefault("metadata", {})["name"] = name
                return web.json_response(self.store.replace(t, body, ns))
            if verb == "PATCH" and name is not None:
                return web.json_response(self.store.patch(t, ns or "", name, await request.json()))
            if verb == "DELETE" and name is not None:
                return web.json_response(self.store.delete(t, ns or "", name))
            raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported on {request.path}")
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)
        except (json.JSONDecodeError, SelectorError) as e:
            return web.json_response(ApiError(400, "BadRequest", str(e)).status(), status=400)

    def _discovery(self, parts: list[str]) -> Obj | None:
        types = list(self.store.types.values())
        if parts == ["version"]:
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-epp-emulator"}
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"]}
        if parts == ["apis"]:
            groups = sorted({t.group for t in types if t.group})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [self._group(g, types) for g in groups]}
        if len(parts) == 2 and parts[0] == "apis":
            if not any(t.group == parts[1] for t in types):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {"kind": "APIGroup", "apiVersion": "v1", **self._group(parts[1], types)}
        if (len(parts) == 2 and parts[0] == "api") or (len(parts) == 3 and parts[0] == "apis"):
            group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
            found = [t for t in types if t.group == group and t.version == version]
            if not found:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": found[0].api_version,
                    "resources": [{"name": t.plural, "singularName": t.kind.lower(), "namespaced": t.namespaced,
                                   "kind": t.kind, "verbs": ["create", "delete", "get", "list", "patch", "update",
                                                             "watch"]} for t in found]}
        return None

    @staticmethod
    def _group(group: str, types: list[ResourceType]) -> Obj:
        versions = sorted({t.version for t in types if t.group == group})
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": gvs, "preferredVersion": gvs[-1]}

    def _resolve(self, parts: list[str]) -> tuple[ResourceType, str | None, str | None]:
        if parts[:1] == ["api"] and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        t = self.store.types.get((group, version, rest[0]))
        if t is None or len(rest) > 2:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return t, ns, rest[1] if len(rest) == 2 else None

    @staticmethod
    def _selectors(request: web.Request) -> tuple[LabelSelector, list[tuple[str, str, str]]]:
        return (parse_selector(request.query.get("labelSelector", "")),
                _parse_fields(request.query.get("fieldSelector", "")))

    def _list(self, request: web.Request, t: ResourceType, ns: str | None) -> web.Response:
        labels, fields = self._selectors(request)
        items, rev = self.store.list(t, ns, labels, fields)
        for o in items:  # list items carry no kind/apiVersion, as from the real server
            o.pop("kind", None)
            o.pop("apiVersion", None)
        return web.json_response({"kind": f"{t.kind}List", "apiVersion": t.api_version,
                                  "metadata": {"resourceVersion": str(rev)}, "items": items})

    async def _watch(self, request: web.Request, t: ResourceType, ns: str | None) -> web.StreamResponse:
        labels, fields = self._selectors(request)
        w = _Watcher(t, ns, labels, fields, asyncio.get_running_loop())
        since = request.query.get("resourceVersion", "")
        bookmarks = _go_bool(request.query.get("allowWatchBookmarks"))
        timeout = float(request.query.get("timeoutSeconds") or 0) or None
        # Connection: close: a client re-watching after the stream ends opens a new connection,
        # so a watch never lands on an instance that is shutting down.
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Connection": "close"})
        await resp.prepare(request)
        try:
            first = self.store.open_watch(w, since)
        except ApiError as e:  # 410 and friends arrive inside the 200 stream, as from the real server
            await resp.write(json.dumps({"type": "ERROR", "object": e.status()}).encode() + b"\n")
            return resp
        self._streams.add(resp)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            for ev in first:
                await resp.write(json.dumps(ev).encode() + b"\n")
            next_bookmark = loop.time() + self.bookmark_interval
            while True:
                wait = next_bookmark - loop.time() if bookmarks else None
                if deadline is not None:
                    wait = min(wait, deadline - loop.time()) if wait is not None else deadline - loop.time()
                try:
                    item = await asyncio.wait_for(w.queue.get(), timeout=max(wait, 0) if wait is not None else None)
                except asyncio.TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        break
                    next_bookmark = loop.time() + self.bookmark_interval
                    mark = {"type": "BOOKMARK", "object": {"kind": t.kind, "apiVersion": t.api_version,
                                                           "metadata": {"resourceVersion": str(self.store.revision)}}}
                    await resp.write(json.dumps(mark).encode() + b"\n")
                    continue
                if item is _END:
                    break
                await resp.write(json.dumps(item).encode() + b"\n")
        except ConnectionResetError:
            pass
        finally:
            self.store.close_watch(w)
            self._streams.discard(resp)
        return resp


class KubeApiThread:
    """A KubeApiServer on its own event loop in a daemon thread (for synchronous tests)."""

    def __init__(self, store: KubeStore | None = None, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kubeapi", daemon=True)
        self._thread.start()
        self.server = KubeApiServer(store, **kw)
        self.call(self.server.start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    @property
    def store(self) -> KubeStore:
        return self.server.store

    @property
    def url(self) -> str:
        return self.server.url

    def stop_listener(self) -> None:
        """The API server goes away: every watch is cut, the port closes, the state stays."""
        self.call(self.server.stop())

    def start_listener(self) -> None:
        self.call(self.server.start())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def write_kubeconfig(path: Any, server: str, token: str | None = None, namespace: str = "default") -> str:
    """A kubeconfig file for ``server`` (bearer token user if given); returns the path."""
    user: Obj = {"token": token} if token else {}
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "emulator",
           "clusters": [{"name": "emulator", "cluster": {"server": server}}],
           "users": [{"name": "emulator", "user": user}],
           "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                         "namespace": namespace}}]}
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


# --- objects ---------------------------------------------------------------------------------
def pod(name: str, ip: str, labels: dict[str, str] | None = None, *, ready: bool = True, namespace: str = "default",
        host_ip: str = "10.0.0.1", annotations: dict[str, str] | None = None) -> Obj:
    """A scheduled, running pod with an IP (``ready`` sets its Ready condition)."""
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {}),
                     "annotations": dict(annotations or {})},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {"phase": "Running", "podIP": ip, "hostIP": host_ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def ready_patch(ready: bool) -> Obj:
    return {"status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def inference_pool(name: str, match_labels: dict[str, str], ports: list[int], *, namespace: str = "default",
                   legacy: bool = False) -> Obj:
    """An InferencePool in the v1 shape, or the legacy v1alpha2 one (single port, plain map)."""
    if legacy:
        spec: Obj = {"selector": dict(match_labels), "targetPortNumber": ports[0],
                     "extensionRef": {"name": f"{name}-epp"}}
    else:
        spec = {"selector": {"matchLabels": dict(match_labels)}, "targetPorts": [{"number": p} for p in ports],
                "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}}}
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


# --- standalone process with churn (the discovery benchmark) -------------------------------------
CHURN_LABEL = "bench.epp/written-at"  # a label: endpoints carry the pod's labels, so the pool sees it


async def _churn(store: KubeStore, names: list[str], rate: float, duration: float, namespace: str,
                 seed: int = 1) -> None:
    """Patch ``rate * duration`` pods, ``rate`` per second: a label with the wall time of the write."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * duration)
    for n in range(1, total + 1):
        name = rng.choice(names)
        store.patch(R.PODS, namespace, name, {"metadata": {"labels": {CHURN_LABEL: f"{time.time():.6f}"}}})
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif n % 100 == 0:
            await asyncio.sleep(0)  # behind schedule: still let the watches drain
    print(f"churn done writes={total} seconds={loop.time() - start:.2f}", flush=True)


async def _main(args: argparse.Namespace) -> None:
    store = KubeStore()
    ns = args.namespace
    names = [f"vllm-{i}" for i in range(args.pods)]
    for i, name in enumerate(names):
        store.create(R.PODS, pod(name, f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", {"app": "vllm"},
                                 namespace=ns))
    store.create(R.INFERENCE_POOLS[R.POOL_GROUP], inference_pool(args.pool, {"app": "vllm"}, [8000], namespace=ns))
    server = await KubeApiServer(store, port=args.port, bookmark_interval=args.bookmark_interval).start()
    print(f"kubeapi ready url={server.url} pods={args.pods}", flush=True)
    control = asyncio.get_running_loop().create_future()

    async def on_line() -> None:  # "churn RATE DURATION" on stdin starts a churn phase
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().split():
            if line[0] == "churn":
                await _churn(store, names, float(line[1]), float(line[2]), ns)
        control.set_result(None)

    reader_task = asyncio.ensure_future(on_line())  # keep a reference: a pending task can be collected
    await control
    reader_task.cancel()
    await server.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m epp.bench.kubeapi", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--pods", type=int, default=1000)
    p.add_argument("--pool", default="bench-pool")
    p.add_argument("--namespace", default="default")
    p.add_argument("--bookmark-interval", type=float, default=5.0)
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
