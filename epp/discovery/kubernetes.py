"""Kubernetes discovery: an InferencePool (or a label selector) and its pods -> the EndpointPool.

Upstream's semantics (``pkg/epp/controller``, ``pkg/epp/datastore``):

- Pool mode (``--pool-name``): watch the InferencePool by name in ``--pool-namespace`` (group
  ``--pool-group``: ``inference.networking.k8s.io`` v1, or the legacy
  ``inference.networking.x-k8s.io`` v1alpha2 shape). Its selector and target ports decide the
  endpoints. A selector change restarts the pod watch with the new selector (a full resync);
  a targetPorts change recomputes every pod's endpoints. The pool deleted (or being deleted)
  drops every endpoint and makes ``ready()`` False (health NOT_SERVING) until it returns.
- Standalone mode (``--endpoint-selector`` + ``--endpoint-target-ports``): the same pod logic
  with a fixed selector and ports, no InferencePool.
- A pod contributes endpoints only while its ``Ready`` condition is True, it is not being
  deleted and it has an IP: one per active target port, named ``<pod>-rank-<i>`` (``i`` the
  port's index in targetPorts), carrying all the pod's labels. The pod annotation
  ``llm-d.ai/active-ports`` (legacy ``inference.networking.k8s.io/active-ports``), a comma
  separated port list, restricts which target ports are active.

The watches run in the background; the request path only reads the EndpointPool. An API
outage keeps the last known endpoints (see ``informer.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.pool import EndpointPool
from epp.discovery import resources as R
from epp.discovery.informer import Informer
from epp.discovery.kubeclient import KubeClient, Obj
from epp.discovery.labels import LabelSelector, SelectorError, parse_selector, selector_from_match_labels
from epp.framework.datalayer import Discovery
from epp.framework.params import NoParams
from epp.observability import metrics as m

log = logging.getLogger(__name__)

# The parsers we have (openai-parser) speak HTTP/1.1 JSON; upstream reports NOT_SERVING when the
# pool's appProtocol (e.g. kubernetes.io/h2c for gRPC model servers) has no parser.
SUPPORTED_APP_PROTOCOLS = frozenset({"http"})
ACTIVE_PORTS_ANNOTATION = "llm-d.ai/active-ports"
LEGACY_ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"


class PoolSpecError(ValueError):
    """The InferencePool's spec cannot be used; the message names the field."""


@dataclass(frozen=True)
class PoolSpec:
    """What the EPP needs from an InferencePool (either API shape)."""

    name: str
    namespace: str
    selector: LabelSelector
    target_ports: tuple[int, ...]
    app_protocol: str = "http"


def parse_pool(obj: Obj, group: str) -> PoolSpec:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    where = f"InferencePool {meta.get('namespace', '')}/{meta.get('name', '')}"
    if group == R.LEGACY_GROUP:  # v1alpha2: plain map selector, a single targetPortNumber
        labels = spec.get("selector")
        ports_raw: Any = [spec.get("targetPortNumber")]
        labels_field, ports_field = "spec.selector", "spec.targetPortNumber"
    else:
        labels = (spec.get("selector") or {}).get("matchLabels")
        ports_raw = [p.get("number") if isinstance(p, dict) else None for p in spec.get("targetPorts") or []]
        labels_field, ports_field = "spec.selector.matchLabels", "spec.targetPorts"
    if not isinstance(labels, dict) or not labels:
        raise PoolSpecError(f"{where}: {labels_field} must be a non-empty map of labels")
    ports: list[int] = []
    for p in ports_raw:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
            raise PoolSpecError(f"{where}: {ports_field}: {p!r} is not a port number 1-65535")
        ports.append(p)
    if not ports or len(set(ports)) != len(ports):
        raise PoolSpecError(f"{where}: {ports_field} must list 1-8 distinct ports")
    return PoolSpec(meta.get("name", ""), meta.get("namespace", ""), selector_from_match_labels(labels),
                    tuple(ports), str(spec.get("appProtocol") or "http"))


def pod_is_ready(pod: Obj) -> bool:
    """Ready=True, not being deleted, and it has an IP to route to."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())


def active_ports(pod: Obj, target_ports: tuple[int, ...]) -> set[int]:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(ACTIVE_PORTS_ANNOTATION)
    if text is None:
        text = annotations.get(LEGACY_ACTIVE_PORTS_ANNOTATION)
    if text is None:
        return set(target_ports)
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        if part.isdigit() and int(part) in target_ports:
            out.add(int(part))
    return out


def slim_pod(pod: Obj) -> Obj:
    """The fields discovery reads: a real pod (spec, managedFields, container statuses) is
    several KB and hundreds of objects; this is a few dozen."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "annotations", "deletionTimestamp",
                                          "resourceVersion") if k in meta},
        "status": {"podIP": status.get("podIP"), "hostIP": status.get("hostIP"),
                   "conditions": [c for c in status.get("conditions") or () if c.get("type") == "Ready"]},
    }


def pod_endpoints(pod: Obj, target_ports: tuple[int, ...]) -> list[EndpointMetadata]:
    """The endpoints one pod contributes (none unless it is ready)."""
    if not pod_is_ready(pod):
        return []
    meta = pod.get("metadata") or {}
    ip = pod["status"]["podIP"]
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    active = active_ports(pod, target_ports)
    name, ns = meta.get("name", ""), meta.get("namespace") or "default"
    return [EndpointMetadata(address=ip, port=port, name=f"{name}-rank-{i}", namespace=ns, labels=labels)
            for i, port in enumerate(target_ports) if port in active]


class PodEndpoints:
    """Informer handler: pods -> EndpointPool, incrementally (one pod's ranks per event)."""

    def __init__(self, pool: EndpointPool, target_ports: tuple[int, ...],
                 on_change: Callable[[], None] | None = None) -> None:
        self.pool = pool
        self.target_ports = target_ports
        self.pods: Mapping[str, Obj] = {}
        self._by_pod: dict[str, tuple[EndpointMetadata, ...]] = {}
        self._on_change = on_change
        self.listed = False

    def replaced(self, objects: dict[str, Obj]) -> None:
        self.pods = objects
        self.listed = True
        self.resync()

    def resync(self) -> None:
        """Recompute every pod's endpoints (after a list or a targetPorts change)."""
        self._by_pod = {name: tuple(pod_endpoints(pod, self.target_ports)) for name, pod in self.pods.items()}
        self.pool.sync([meta for metas in self._by_pod.values() for meta in metas])
        self._changed()

    def changed(self, name: str, obj: Obj | None) -> None:
        new = tuple(pod_endpoints(obj, self.target_ports)) if obj is not None else ()
        old = self._by_pod.get(name, ())
        if new == old:
            return
        keep = {meta.key for meta in new}
        for meta in old:
            # Remove only what is still this pod's: a new pod may already hold the same ip:port.
            ep = self.pool.get(meta.key)
            if meta.key not in keep and ep is not None and ep.metadata.name == meta.name:
                self.pool.remove(meta.key)
        for meta in new:
            self.pool.upsert(meta)
        if new:
            self._by_pod[name] = new
        else:
            self._by_pod.pop(name, None)
        self._changed()

    def clear(self) -> None:
        self._by_pod = {}
        self.pods = {}
        self.listed = False
        self.pool.sync([])
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


class _PoolHandler:
    """Informer handler for the single InferencePool object (field selector on its name)."""

    def __init__(self, owner: "KubernetesDiscovery") -> None:
        self.owner = owner

    def replaced(self, objects: dict[str, Obj]) -> None:
        self.owner._pool_object(objects.get(self.owner.pool_name))

    def changed(self, name: str, obj: Obj | None) -> None:
        if name == self.owner.pool_name:
            self.owner._pool_object(obj)


class KubernetesDiscovery(Discovery):
    """Pool or standalone mode (see the module doc). ``ready()`` feeds gRPC health."""

    plugin_type = "kubernetes-discovery"

    def __init__(self, client: KubeClient, namespace: str, *, pool_name: str = "",
                 pool_group: str = R.POOL_GROUP, endpoint_selector: str = "",
                 target_ports: tuple[int, ...] = (), watch_timeout: int = 300, backoff_initial: float = 0.2,
                 backoff_max: float = 30.0) -> None:
        super().__init__(self.plugin_type, NoParams())
        if bool(pool_name) == bool(endpoint_selector):
            raise ValueError("give exactly one of a pool name and an endpoint selector")
        if pool_group not in R.INFERENCE_POOLS:
            raise ValueError(f"unknown pool group {pool_group!r}; use one of {', '.join(R.INFERENCE_POOLS)}")
        self.client = client
        self.namespace = namespace
        self.pool_name = pool_name
        self.pool_group = pool_group
        self.standalone_selector = parse_selector(endpoint_selector) if endpoint_selector else None
        self.standalone_ports = tuple(target_ports)
        self._informer_kw = dict(watch_timeout=watch_timeout, backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.spec: PoolSpec | None = None
        self.pool: EndpointPool | None = None
        self.pods: PodEndpoints | None = None
        self._pool_informer: Informer | None = None
        self._pod_informer: Informer | None = None
        self._pod_task: asyncio.Task | None = None
        self._stopped: list[asyncio.Task] = []
        self._present = False  # pool mode: the InferencePool exists and is not being deleted
        self.listeners: list[Callable[[PoolSpec | None], None]] = []  # pool set/cleared (CRD sync)
        self._m_present = m.KUBE_POOL_PRESENT.labels(pool_name or "")

    # --- state ---------------------------------------------------------------------------
    @property
    def standalone(self) -> bool:
        return self.standalone_selector is not None

    @property
    def pool_informer(self) -> Informer | None:
        return self._pool_informer

    @property
    def pod_informer(self) -> Informer | None:
        """The current pod watch (replaced when the pool's selector changes)."""
        return self._pod_informer

    @property
    def pool_spec(self) -> PoolSpec | None:
        """The InferencePool in force (None while it is missing or being deleted)."""
        return self.spec if (self.standalone or self._present) else None

    def ready(self) -> bool:
        """The pool is known and its pods were listed at least once."""
        if not self.standalone and not self._present:
            return False
        if self.spec is not None and self.spec.app_protocol not in SUPPORTED_APP_PROTOCOLS:
            return False
        return self.pods is not None and self.pods.listed

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": "kubernetes", "mode": "standalone" if self.standalone else "pool",
                               "namespace": self.namespace, "ready": self.ready()}
        if not self.standalone:
            out.update(pool=self.pool_name, group=self.pool_group, pool_present=self._present)
        if self.spec is not None:
            out.update(selector=str(self.spec.selector), target_ports=list(self.spec.target_ports),
                       app_protocol=self.spec.app_protocol)
        out["watches"] = [i.status() for i in (self._pool_informer, self._pod_informer) if i is not None]
        out["connected"] = all(w["connected"] for w in out["watches"]) if out["watches"] else False
        return out

    # --- running -------------------------------------------------------------------------
    async def run(self, pool: EndpointPool) -> None:
        self.pool = pool
        pool.namespace = self.namespace
        if self.standalone:
            assert self.standalone_selector is not None
            self._set_spec(PoolSpec("", self.namespace, self.standalone_selector, self.standalone_ports))
            try:
                await asyncio.Event().wait()  # the pod watch runs in its own task
            finally:
                await self._stop_pods()
        if self.pool_name:
            pool.name = self.pool_name
        self._pool_informer = Informer(self.client, R.INFERENCE_POOLS[self.pool_group], self.namespace,
                                       _PoolHandler(self), field_selector=f"metadata.name={self.pool_name}",
                                       **self._informer_kw)
        try:
            await self._pool_informer.run()
        finally:
            await self._stop_pods()

    def _pool_object(self, obj: Obj | None) -> None:
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            if self._present or self.spec is not None:
                log.warning("kubernetes: InferencePool %s/%s %s; dropping every endpoint (health NOT_SERVING) "
                            "until it is back", self.namespace, self.pool_name,
                            "is being deleted" if obj is not None else "is gone")
            elif not self._present:
                log.warning("kubernetes: InferencePool %s/%s (%s) not found; waiting for it (health NOT_SERVING)",
                            self.namespace, self.pool_name, self.pool_group)
            self._present = False
            self._m_present.set(0)
            self.spec = None
            self._cancel_pods()
            if self.pods is not None:
                self.pods.clear()
            self._notify(None)
            return
        try:
            spec = parse_pool(obj, self.pool_group)
        except PoolSpecError as e:
            log.error("kubernetes: %s; keeping the previous pool state", e)
            return
        if not self._present:
            log.info("kubernetes: InferencePool %s/%s: selector %s, targetPorts %s", self.namespace,
                     self.pool_name, spec.selector, list(spec.target_ports))
        if spec.app_protocol not in SUPPORTED_APP_PROTOCOLS and (self.spec is None or
                                                                 self.spec.app_protocol != spec.app_protocol):
            log.error("kubernetes: InferencePool %s/%s has appProtocol %r, which no parser here supports (%s); "
                      "health NOT_SERVING", self.namespace, self.pool_name, spec.app_protocol,
                      ", ".join(sorted(SUPPORTED_APP_PROTOCOLS)))
        self._present = True
        self._m_present.set(1)
        self._set_spec(spec)
        self._notify(spec)

    def _set_spec(self, spec: PoolSpec) -> None:
        old, self.spec = self.spec, spec
        assert self.pool is not None
        if self.pods is None:
            self.pods = PodEndpoints(self.pool, spec.target_ports)
        if old is None or old.selector != spec.selector or self._pod_task is None:
            if old is not None:
                log.info("kubernetes: pool selector changed to %s; resyncing pods", spec.selector)
            self.pods.target_ports = spec.target_ports
            self._start_pods(spec.selector, "initial" if old is None else "resync")
        elif old.target_ports != spec.target_ports:
            log.info("kubernetes: pool targetPorts changed to %s; recomputing endpoints", list(spec.target_ports))
            self.pods.target_ports = spec.target_ports
            if self.pods.listed:
                self.pods.resync()

    def _start_pods(self, selector: LabelSelector, reason: str) -> None:
        self._cancel_pods()
        assert self.pods is not None
        informer = Informer(self.client, R.PODS, self.namespace, self.pods, label_selector=str(selector),
                            transform=slim_pod, **self._informer_kw)
        informer._list_reason = reason
        self._pod_informer = informer
        self._pod_task = asyncio.create_task(informer.run(), name="kubernetes-pods")

    def _cancel_pods(self) -> None:
        # Synchronous: a cancelled informer resumes only to raise, so no pod event of the old
        # watch reaches the pool after this returns.
        if self._pod_task is not None:
            self._pod_task.cancel()
            self._stopped.append(self._pod_task)
            self._pod_task = None

    async def _stop_pods(self) -> None:
        self._cancel_pods()
        tasks, self._stopped = self._stopped, []
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _notify(self, spec: PoolSpec | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(spec)
            except Exception:
                log.exception("kubernetes: pool listener failed")


def validate_standalone(selector: str, ports: tuple[int, ...]) -> None:
    """The flag checks upstream makes for ``--endpoint-selector`` / ``--endpoint-target-ports``."""
    try:
        parsed = parse_selector(selector)
    except SelectorError as e:
        raise ValueError(f"--endpoint-selector: {e}") from None
    if parsed.empty:
        raise ValueError("--endpoint-selector must not be empty")
    if not 1 <= len(ports) <= 8 or len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
        raise ValueError("--endpoint-target-ports must list 1-8 distinct ports (1-65535)")
