"""The set of endpoints the EPP may route to, fed by discovery, read by scheduling."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from epp.datalayer.endpoint import Endpoint, EndpointMetadata, now

log = logging.getLogger(__name__)

# A request-path exclusion (``exclude``) ends with the first good scrape that started after it;
# repeated exclusions without a successful response in between must also wait out a hold that
# doubles from HOLD_BASE up to HOLD_MAX (a server whose metrics answer but whose serving port
# does not would otherwise cost a failed request per scrape interval). Without any scrape
# (no collector), an exclusion lapses LINGER seconds after its hold.
HOLD_BASE = 0.1
HOLD_MAX = 2.0
LINGER = 5.0

Listener = Callable[[str, Endpoint], None]  # ("added" | "removed" | "updated", endpoint)


class EndpointPool:
    """Endpoints keyed by ``ip:port``.

    ``endpoints()`` returns a tuple built once per change, so the request path gets a cheap,
    stable list. Discovery calls ``sync()`` with the full desired set; listeners (the
    collector, stateful plugins) hear about additions and removals.

    ``schedulable()`` is the subset the scheduler may pick from, best tier first:

    1. endpoints whose data is current: reachable, not excluded by the request path, and whose
       last scrape succeeded (``failures == 0``);
    2. if there is none: reachable and not excluded (their metrics may be stale);
    3. if there is none: every endpoint (never schedule into nothing).

    So an endpoint that went silent (its scrapes fail or time out) stops attracting requests
    with its last, possibly idle-looking, metrics as soon as its first scrape fails, long
    before the collector declares it unreachable. Health changes go through
    ``set_reachable`` / ``set_failures`` / ``exclude`` / ``scrape_succeeded`` so the tuple
    stays current.
    """

    def __init__(self, name: str = "", namespace: str = "default") -> None:
        self.name = name
        self.namespace = namespace
        self._by_key: dict[str, Endpoint] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self._schedulable: tuple[Endpoint, ...] = ()
        self._listeners: list[Listener] = []
        self._data_watchers: list[Callable[[], None]] = []
        self._lapse_at = 0.0  # earliest time a request-path exclusion lapses without a scrape; 0 = none
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
        """The best tier of endpoints (see the class docstring); never empty unless the pool is."""
        if self._lapse_at and now() >= self._lapse_at:
            self._lapse()
        return self._schedulable

    # -- health --------------------------------------------------------------------------------

    def set_reachable(self, ep: Endpoint, reachable: bool) -> bool:
        """Record a health verdict of the collector; returns whether it changed anything."""
        if ep.reachable == reachable:
            return False
        ep.reachable = reachable
        self._changed(ep)
        return True

    def set_failures(self, ep: Endpoint, failures: int) -> None:
        """The collector's count of consecutive failed scrapes (0 after a good one)."""
        before, ep.failures = ep.failures, failures
        if (before > 0) != (failures > 0):
            self._changed(ep)

    def exclude(self, ep: Endpoint, reason: str) -> bool:
        """The request path learned that ``ep`` cannot be reached (e.g. the proxy's connection
        was refused): leave it out of scheduling now, before any scrape notices. Returns False
        if it was already excluded."""
        if ep.excluded_at or self._by_key.get(ep.key) is not ep:
            return False
        t = now()
        ep.strikes += 1
        hold = 0.0 if ep.strikes == 1 else min(HOLD_MAX, HOLD_BASE * 2 ** (ep.strikes - 2))
        ep.excluded_at = t
        ep.excluded_until = t + hold
        lapse = ep.excluded_until + LINGER
        if not self._lapse_at or lapse < self._lapse_at:
            self._lapse_at = lapse
        self._rebuild()
        log.warning("endpoint %s excluded from scheduling: %s; it is back after a successful scrape%s",
                    ep.metadata.name, reason, f" and {hold:g}s (excluded {ep.strikes} times in a row)" if hold else "")
        return True

    def scrape_succeeded(self, ep: Endpoint, started: float) -> None:
        """A scrape of ``ep`` that started at ``started`` succeeded: it ends a request-path
        exclusion that began before it (once the exclusion's hold is over)."""
        if ep.excluded_at and started >= ep.excluded_at and now() >= ep.excluded_until:
            self._readmit(ep, "a scrape succeeded")

    def response_succeeded(self, ep: Endpoint) -> None:
        """The endpoint served a request: repeated exclusions start over with no hold."""
        ep.strikes = 0

    def _readmit(self, ep: Endpoint, why: str) -> None:
        excluded_for = now() - ep.excluded_at
        ep.excluded_at = ep.excluded_until = 0.0
        self._changed(ep)
        log.info("endpoint %s is back in scheduling after %.2fs: %s", ep.metadata.name, excluded_for, why)

    def _lapse(self) -> None:
        t = now()
        self._lapse_at = 0.0
        for ep in self._snapshot:
            if not ep.excluded_at:
                continue
            lapse = ep.excluded_until + LINGER
            if t >= lapse:
                self._readmit(ep, f"no scrape for {LINGER:g}s after its exclusion")
            elif not self._lapse_at or lapse < self._lapse_at:
                self._lapse_at = lapse

    def _changed(self, ep: Endpoint) -> None:
        if self._by_key.get(ep.key) is ep:
            self._rebuild()

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
        if all(ep.reachable and not ep.excluded_at and not ep.failures for ep in snapshot):
            self._schedulable = snapshot  # the usual case: no second tuple
            return
        usable = tuple(ep for ep in snapshot if ep.reachable and not ep.excluded_at)
        self._schedulable = tuple(ep for ep in usable if not ep.failures) or usable or snapshot

    def _emit(self, event: str, ep: Endpoint) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, ep)
            except Exception:  # one broken listener must not break discovery
                log.exception("endpoint pool listener failed on %s %s", event, ep.key)


def schedulable_endpoints(pool: EndpointPool) -> tuple[Endpoint, ...]:
    """The endpoints scheduling may use (see ``EndpointPool.schedulable``)."""
    return pool.schedulable()
