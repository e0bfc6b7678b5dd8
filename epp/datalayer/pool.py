"""The set of endpoints the EPP may route to, fed by discovery, read by scheduling."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from epp.datalayer.endpoint import Endpoint, EndpointMetadata

log = logging.getLogger(__name__)

Listener = Callable[[str, Endpoint], None]  # ("added" | "removed" | "updated", endpoint)


class EndpointPool:
    """Endpoints keyed by ``ip:port``.

    ``endpoints()`` returns a tuple built once per change, so the request path gets a cheap,
    stable list. Discovery calls ``sync()`` with the full desired set; listeners (the
    collector, stateful plugins) hear about additions and removals.

    ``schedulable()`` is the subset the scheduler may pick from: endpoints the collector
    has not marked unreachable, or all of them when every one is (never schedule into
    nothing). Reachability changes go through ``set_reachable`` so that tuple stays current.
    """

    def __init__(self, name: str = "", namespace: str = "default") -> None:
        self.name = name
        self.namespace = namespace
        self._by_key: dict[str, Endpoint] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self._schedulable: tuple[Endpoint, ...] = ()
        self._listeners: list[Listener] = []
        self._data_watchers: list[Callable[[], None]] = []
        self.synced = False

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def watch_data(self, watcher: Callable[[], None]) -> None:
        """Call ``watcher()`` whenever collectors have written fresh endpoint data (flow control
        re-reads saturation then instead of polling)."""
        self._data_watchers.append(watcher)

    def unwatch_data(self, watcher: Callable[[], None]) -> None:
        if watcher in self._data_watchers:
            self._data_watchers.remove(watcher)

    def data_changed(self) -> None:
        """Collectors call this after writing a batch of metrics/attributes/reachability."""
        for watcher in self._data_watchers:
            try:
                watcher()
            except Exception:  # one broken watcher must not break collection
                log.exception("endpoint pool data watcher failed")

    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._snapshot

    def schedulable(self) -> tuple[Endpoint, ...]:
        """Reachable endpoints, or every endpoint if none is reachable."""
        return self._schedulable

    def set_reachable(self, ep: Endpoint, reachable: bool) -> bool:
        """Record a health verdict of the collector; returns whether it changed anything."""
        if ep.reachable == reachable:
            return False
        ep.reachable = reachable
        if self._by_key.get(ep.key) is ep:
            self._rebuild()
        return True

    def get(self, key: str) -> Endpoint | None:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self):
        return iter(self._snapshot)

    def upsert(self, meta: EndpointMetadata) -> Endpoint:
        ep = self._by_key.get(meta.key)
        if ep is None:
            ep = Endpoint(meta)
            self._by_key[meta.key] = ep
            self._rebuild()
            self._emit("added", ep)
        elif ep.metadata != meta:
            ep.metadata = meta  # same Endpoint object: the snapshots need no rebuild
            self._emit("updated", ep)
        return ep

    def remove(self, key: str) -> None:
        ep = self._by_key.pop(key, None)
        if ep is not None:
            self._rebuild()
            self._emit("removed", ep)

    def sync(self, metas: Iterable[EndpointMetadata]) -> None:
        """Make the pool hold exactly ``metas`` (by key); marks the pool synced."""
        wanted = {m.key: m for m in metas}
        for key in [k for k in self._by_key if k not in wanted]:
            self.remove(key)
        for meta in wanted.values():
            self.upsert(meta)
        self.synced = True

    def _rebuild(self) -> None:
        self._snapshot = snapshot = tuple(self._by_key.values())
        if all(ep.reachable for ep in snapshot):  # the usual case: no second tuple
            self._schedulable = snapshot
        else:
            self._schedulable = tuple(ep for ep in snapshot if ep.reachable) or snapshot

    def _emit(self, event: str, ep: Endpoint) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, ep)
            except Exception:  # one broken listener must not break discovery
                log.exception("endpoint pool listener failed on %s %s", event, ep.key)


def schedulable_endpoints(pool: EndpointPool) -> tuple[Endpoint, ...]:
    """The endpoints scheduling may use (see ``EndpointPool.schedulable``)."""
    return pool.schedulable()
