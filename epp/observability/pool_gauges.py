"""Pool-level gauges (upstream ``inference_pool_*``), refreshed periodically off the request path.

Averages are over endpoints whose standard metrics are fresher than the staleness threshold
(``--metrics-staleness-threshold``, default 2 s), as upstream. ``ready_pods`` counts endpoints
the data layer considers reachable.
"""

from __future__ import annotations

import asyncio
import logging

from epp.datalayer.endpoint import now
from epp.datalayer.pool import EndpointPool
from epp.observability import metrics as m

log = logging.getLogger(__name__)


class PoolGauges:
    def __init__(self, pool: EndpointPool, name: str, staleness: float = 2.0) -> None:
        self.pool = pool
        self.name = name or pool.name or "default"
        self.staleness = staleness
        self._pod_labels: set[str] = set()

    def refresh(self) -> None:
        t = now()
        endpoints = self.pool.endpoints()
        fresh = [ep for ep in endpoints if ep.metrics.age(t) <= self.staleness]
        n = len(fresh)
        kv = sum(ep.metrics.kv_cache_usage for ep in fresh) / n if n else 0.0
        queue = sum(ep.metrics.waiting_queue_size for ep in fresh) / n if n else 0.0
        running = sum(ep.metrics.running_requests for ep in fresh) / n if n else 0.0
        m.POOL_AVG_KV_CACHE.labels(self.name).set(kv)
        m.POOL_AVG_QUEUE.labels(self.name).set(queue)
        m.POOL_AVG_RUNNING.labels(self.name).set(running)
        m.POOL_READY_PODS.labels(self.name).set(sum(1 for ep in endpoints if ep.reachable))

        pods = set()
        for ep in endpoints:
            pod = ep.metadata.name
            pods.add(pod)
            m.POOL_PER_POD_QUEUE.labels(self.name, pod).set(ep.metrics.waiting_queue_size)
            age = ep.metrics.age(t)  # (reachability is the collector's gauge)
            m.ENDPOINT_DATA_AGE.labels(self.name, pod).set(age if age != float("inf") else -1)
        # Endpoints that left the pool must not keep reporting their last value.
        for pod in self._pod_labels - pods:
            _remove(m.POOL_PER_POD_QUEUE, self.name, pod)
            _remove(m.ENDPOINT_DATA_AGE, self.name, pod)
        self._pod_labels = pods

    async def run(self, interval: float = 5.0) -> None:
        while True:
            try:
                self.refresh()
            except Exception:
                log.exception("refreshing pool gauges failed")
            await asyncio.sleep(interval)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
