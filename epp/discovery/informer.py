"""List-then-watch one resource type, keeping a local cache and telling a handler what changed.

The loop a controller-runtime informer runs, written for our needs:

1. LIST (with the selectors) -> the full set and its resourceVersion; the handler gets
   ``replaced(all objects)`` so it can drop whatever vanished while we were not watching.
2. WATCH from that version with ``allowWatchBookmarks``; every event and bookmark advances
   the version; the handler gets ``changed(name, object or None)``.
3. The server ends a watch (its timeout): watch again from the last version, no relist.
4. 410 Gone (the version was compacted away): relist (step 1).
5. Any other failure (API server down, network, 5xx): keep the cache as it is (the pool keeps
   its last known endpoints), report the outage once (log, ``connected`` False, metrics), and
   retry with exponential backoff and full jitter: watch from the last version if we have
   one, else list.

The handler runs on the event loop between two awaits; it must be quick (it is: a few dict
operations per pod). Nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Callable, Protocol

from epp.discovery.kubeclient import Gone, KubeApiError, KubeClient, Obj
from epp.discovery.resources import ResourceType
from epp.observability import metrics as m

log = logging.getLogger(__name__)


class InformerHandler(Protocol):
    def replaced(self, objects: dict[str, Obj]) -> None:
        """The complete current set (after a list), by name."""

    def changed(self, name: str, obj: Obj | None) -> None:
        """One object added or modified (``obj``) or deleted (None)."""


class InformerStats:
    """Counters an informer keeps for metrics and /debug."""

    def __init__(self) -> None:
        self.lists = 0
        self.events = 0
        self.bookmarks = 0
        self.gone = 0
        self.failures = 0
        self.last_error = ""
        self.outage_since = 0.0  # wall time the current outage began; 0 = connected


class Informer:
    def __init__(self, client: KubeClient, rtype: ResourceType, namespace: str | None, handler: InformerHandler, *,
                 label_selector: str = "", field_selector: str = "", watch_timeout: int = 300,
                 backoff_initial: float = 0.2, backoff_max: float = 30.0, on_state: Any = None,
                 rng: random.Random | None = None, transform: Callable[[Obj], Obj] | None = None) -> None:
        self.client = client
        self.rtype = rtype
        self.namespace = namespace
        self.handler = handler
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.watch_timeout = watch_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.on_state = on_state  # called with no arguments when synced/connected change
        # Applied to every object before it is cached (client-go's SetTransform): keep only what
        # the handler reads, so the cache holds a fraction of the objects the GC has to walk.
        self.transform = transform or (lambda obj: obj)
        self.cache: dict[str, Obj] = {}
        self.resource_version = ""
        self.synced = False  # a first list succeeded
        self.connected = False
        self.stats = InformerStats()
        self._rng = rng or random.Random()
        self._list_reason = "initial"
        label = rtype.plural
        self._m_connected = m.KUBE_CONNECTED.labels(label)
        self._m_failures = m.KUBE_WATCH_FAILURES.labels(label)
        self._m_events = {t: m.KUBE_EVENTS.labels(label, t) for t in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK")}
        self._m_label = label
        m.KUBE_OUTAGE_SECONDS.labels(label).set_function(
            lambda: time.time() - self.stats.outage_since if self.stats.outage_since else 0.0)

    @property
    def what(self) -> str:
        sel = f" {self.label_selector}" if self.label_selector else ""
        sel += f" {self.field_selector}" if self.field_selector else ""
        return f"{self.rtype.plural} in {self.namespace or 'all namespaces'}{sel}"

    async def run(self) -> None:
        attempt = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self.resource_version:
                    await self._list()
                started = loop.time()
                got = self.stats.events + self.stats.bookmarks
                await self._watch()  # returns when the server ends the stream
                attempt = 0
                if loop.time() - started < 1.0 and got == self.stats.events + self.stats.bookmarks:
                    await asyncio.sleep(self.backoff_initial)  # a server ending watches at once: no busy loop
            except Gone as e:
                self.stats.gone += 1
                log.info("kubernetes: watch of %s expired (%s); listing again", self.what, e.message)
                self.resource_version = ""
                self._list_reason = "gone"
            except asyncio.CancelledError:
                raise
            except KubeApiError as e:
                attempt += 1
                self._outage(str(e))
                await asyncio.sleep(self._backoff(attempt))
            except Exception as e:  # a bug or an unexpected payload: same recovery, louder
                attempt += 1
                log.exception("kubernetes: informer for %s failed", self.what)
                self._outage(repr(e))
                await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        # Full jitter: replicas that lost the API server together do not come back in step.
        return self._rng.uniform(0, min(self.backoff_max, self.backoff_initial * 2 ** min(attempt, 20)))

    async def _list(self) -> None:
        items, rv = await self.client.list(self.rtype, self.namespace, label_selector=self.label_selector,
                                           field_selector=self.field_selector)
        self.stats.lists += 1
        m.KUBE_LISTS.labels(self._m_label, self._list_reason).inc()
        self._list_reason = "reconnect"
        transform = self.transform
        self.cache = {_name(o): transform(o) for o in items}
        self.resource_version = rv
        self._connected()
        first = not self.synced
        self.synced = True
        self.handler.replaced(dict(self.cache))
        if first and self.on_state is not None:
            self.on_state()

    async def _watch(self) -> None:
        async for event in self.client.watch(self.rtype, self.namespace, self.resource_version,
                                             label_selector=self.label_selector, field_selector=self.field_selector,
                                             timeout_seconds=self.watch_timeout):
            self._connected()
            kind = event.get("type")
            obj = event.get("object") or {}
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            counter = self._m_events.get(kind or "")
            if counter is not None:
                counter.inc()
            if kind == "BOOKMARK":
                self.stats.bookmarks += 1
            elif kind in ("ADDED", "MODIFIED"):
                self.stats.events += 1
                name = _name(obj)
                self.cache[name] = obj = self.transform(obj)
                self.handler.changed(name, obj)
            elif kind == "DELETED":
                self.stats.events += 1
                name = _name(obj)
                if self.cache.pop(name, None) is not None:
                    self.handler.changed(name, None)
            if rv:
                self.resource_version = str(rv)

    def _connected(self) -> None:
        if self.stats.outage_since:
            log.warning("kubernetes: API server reachable again for %s after %.1f s; resuming from "
                        "resourceVersion %s", self.what, time.time() - self.stats.outage_since,
                        self.resource_version or "(relist)")
            self.stats.outage_since = 0.0
        if not self.connected:
            self.connected = True
            self._m_connected.set(1)
            if self.on_state is not None:
                self.on_state()

    def _outage(self, error: str) -> None:
        self.stats.failures += 1
        self._m_failures.inc()
        self.stats.last_error = error
        if not self.stats.outage_since:
            self.stats.outage_since = time.time()
            log.warning("kubernetes: lost the watch of %s (%s); keeping the last known %d object(s) and retrying "
                        "with backoff", self.what, error, len(self.cache))
        else:
            log.debug("kubernetes: %s still unreachable: %s", self.what, error)
        self._m_connected.set(0)
        if self.connected:
            self.connected = False
            if self.on_state is not None:
                self.on_state()


    def status(self) -> dict[str, Any]:
        """For /debug: where this watch stands."""
        st = self.stats
        return {"resource": self.what, "synced": self.synced, "connected": self.connected,
                "resource_version": self.resource_version, "objects": len(self.cache), "lists": st.lists,
                "events": st.events, "bookmarks": st.bookmarks, "gone": st.gone, "failures": st.failures,
                "outage_seconds": round(time.time() - st.outage_since, 1) if st.outage_since else 0.0,
                "last_error": st.last_error}


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))
