"""The endpoint model: who a model server is, and what we last learned about it.

Concurrency rule: readers never see a half-written update. ``Metrics`` and
``EndpointMetadata`` are immutable; a writer builds a new object and swaps the reference
(a single attribute store, atomic under the GIL and on one event loop). A scheduling cycle
reads ``endpoint.metrics`` once and keeps that snapshot for the whole cycle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def now() -> float:
    """The clock of the data layer (monotonic seconds); ``update_time`` uses it."""
    return time.monotonic()


@dataclass(frozen=True, slots=True)
class EndpointMetadata:
    """Identity of one serving endpoint (one model-server rank: address + port)."""

    address: str
    port: int
    name: str = ""
    namespace: str = "default"
    metrics_port: int = 0
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    # ``ip:port``: the value Envoy routes to and the pool's identity for this endpoint.
    # Computed once: the request path reads it for every candidate of every request.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", join_host_port(self.address, self.port))
        if not self.name:
            object.__setattr__(self, "name", f"{self.address}:{self.port}")
        if not self.metrics_port:
            object.__setattr__(self, "metrics_port", self.port)
        if not isinstance(self.labels, MappingProxyType):
            object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @property
    def metrics_host(self) -> str:
        return join_host_port(self.address, self.metrics_port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Metrics:
    """What the data layer last extracted for an endpoint. Replaced wholesale, never mutated.

    ``update_time`` is the data-layer clock (``now()``) of the last successful extraction of
    the standard fields; 0.0 means never. ``custom`` holds arbitrary named metrics (written
    by e.g. the ``prometheus-metric`` extractor) and ``custom_time`` when each was written,
    so a consumer can judge staleness per metric.
    """

    waiting_queue_size: int = 0
    running_requests: int = 0
    kv_cache_usage: float = 0.0
    active_models: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    waiting_models: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    max_active_models: int = 0
    cache_block_size: int = 0
    cache_num_blocks: int = 0
    custom: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    custom_time: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    update_time: float = 0.0

    def with_updates(self, **changes: Any) -> "Metrics":
        return replace(self, **changes)

    def with_custom(self, values: Mapping[str, float], at: float) -> "Metrics":
        custom = dict(self.custom)
        custom.update(values)
        times = dict(self.custom_time)
        for k in values:
            times[k] = at
        return replace(self, custom=MappingProxyType(custom), custom_time=MappingProxyType(times))

    def age(self, at: float | None = None) -> float:
        """Seconds since the standard fields were updated (inf if never)."""
        if self.update_time == 0.0:
            return float("inf")
        return (now() if at is None else at) - self.update_time


EMPTY_METRICS = Metrics()


class Endpoint:
    """A live endpoint in the pool.

    ``metadata`` and ``metrics`` are immutable snapshots swapped by writers. ``attributes``
    is a typed map for plugin data (e.g. the ``/v1/models`` list); it is also replaced
    copy-on-write by ``set_attribute``, so a reader holding the mapping is never surprised.
    Health fields are maintained by the collector (``reachable``, ``failures``, ...) and, for
    exclusions reported by the request path, by ``EndpointPool.exclude`` (see
    ``epp/datalayer/pool.py`` for what each means to scheduling).
    """

    __slots__ = ("metadata", "metrics", "attributes", "last_scrape_ok", "first_failure", "failures", "reachable",
                 "excluded_at", "excluded_until", "strikes")

    def __init__(self, metadata: EndpointMetadata, metrics: Metrics = EMPTY_METRICS) -> None:
        self.metadata = metadata
        self.metrics = metrics
        self.attributes: Mapping[str, Any] = _EMPTY
        self.last_scrape_ok = 0.0  # data-layer time the last successful scrape STARTED
        self.first_failure = 0.0  # data-layer time of the first failure in the current run; 0 = healthy
        self.failures = 0  # consecutive failed scrapes (0 = the data is current)
        self.reachable = True  # the collector's verdict
        # Exclusion by the request path (the proxy could not reach it): when, and the earliest
        # time a good scrape may end it; 0.0 = not excluded. ``strikes`` counts exclusions
        # without a successful response in between (each holds it out longer).
        self.excluded_at = 0.0
        self.excluded_until = 0.0
        self.strikes = 0

    @property
    def key(self) -> str:
        return self.metadata.key

    def update_metrics(self, **changes: Any) -> None:
        """Swap in a new Metrics with ``changes``; sets ``update_time`` to now unless given."""
        changes.setdefault("update_time", now())
        self.metrics = replace(self.metrics, **changes)

    def set_custom(self, values: Mapping[str, float], at: float | None = None) -> None:
        self.metrics = self.metrics.with_custom(values, now() if at is None else at)

    def set_attribute(self, key: str, value: Any) -> None:
        attrs = dict(self.attributes)
        attrs[key] = value
        self.attributes = MappingProxyType(attrs)

    def get_attribute(self, key: str, default: Any = None) -> Any:
        return self.attributes.get(key, default)

    def __repr__(self) -> str:
        return f"<Endpoint {self.metadata.name} {self.key}>"
