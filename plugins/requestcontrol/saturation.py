"""Saturation detectors: how full the pool is (0 idle, >= 1 saturated), and as filters, who is not full.

``utilization-detector`` (the default) reads the scraped queue depth and KV-cache use;
``concurrency-detector`` counts what this EPP itself has in flight. Both also implement
Filter: referenced in a profile they drop saturated endpoints, keeping all of them if
every one is saturated (a filter must not be the reason a request fails).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from epp.datalayer.endpoint import now
from epp.framework import Duration, Filter, SaturationDetector, register
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest
from plugins.requestcontrol.inflight import InflightHooks, InflightTracker


_NONE_PENDING: Mapping[str, int] = {}


@dataclass
class UtilizationParams:
    queueDepthThreshold: int = 5
    kvCacheUtilThreshold: float = 0.8
    metricsStalenessThreshold: Duration = Duration(0.2)
    headroom: float = 0.0

    def validate(self) -> None:
        if self.queueDepthThreshold <= 0:
            raise ValueError("'queueDepthThreshold' must be > 0")
        if not 0.0 < self.kvCacheUtilThreshold <= 1.0:
            raise ValueError("'kvCacheUtilThreshold' must be in (0, 1]")
        if self.metricsStalenessThreshold <= 0:
            raise ValueError("'metricsStalenessThreshold' must be > 0")
        if self.headroom < 0:
            raise ValueError("'headroom' must be >= 0")


@register("utilization-detector")
class UtilizationDetector(SaturationDetector, Filter):
    """Saturation = mean over endpoints of max(queue / queueDepthThreshold, kv / kvCacheUtilThreshold).

    An endpoint whose metrics are older than ``metricsStalenessThreshold`` (or were never
    scraped) counts as fully saturated (1.0): without fresh data we must assume the worst.
    """

    Params = UtilizationParams

    def saturation(self, candidates: Sequence[Candidate]) -> float:
        return self.saturation_with_pending(candidates, _NONE_PENDING)

    def saturation_with_pending(self, candidates: Sequence[Candidate], pending: Mapping[str, int]) -> float:
        """Requests sent since the last scrape (``pending``) count as queued on their endpoint."""
        if not candidates:
            return 1.0
        p: UtilizationParams = self.params
        q_thr = float(p.queueDepthThreshold)
        kv_thr = p.kvCacheUtilThreshold
        oldest = now() - p.metricsStalenessThreshold
        total = 0.0
        for c in candidates:
            mt = c.metrics
            t = mt.update_time
            if t == 0.0 or t < oldest:
                total += 1.0
                continue
            waiting = mt.waiting_queue_size
            if pending:
                waiting += pending.get(c.key, 0)
            q = waiting / q_thr
            kv = mt.kv_cache_usage / kv_thr
            total += q if q > kv else kv
        return total / len(candidates)

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> list[Candidate]:
        p: UtilizationParams = self.params
        q_lim = p.queueDepthThreshold * (1.0 + p.headroom)
        kv_lim = p.kvCacheUtilThreshold * (1.0 + p.headroom)
        oldest = now() - p.metricsStalenessThreshold
        kept = [
            c for c in candidates
            if c.metrics.update_time != 0.0 and c.metrics.update_time >= oldest
            and c.metrics.waiting_queue_size < q_lim and c.metrics.kv_cache_usage < kv_lim
        ]
        return kept or candidates


@dataclass
class ConcurrencyParams:
    concurrencyMode: Literal["requests", "tokens"] = "requests"
    maxConcurrency: int = 100
    maxTokenConcurrency: int = 1_000_000
    headroom: float = 0.0
    requestTimeout: Duration = Duration(600.0)

    def validate(self) -> None:
        if self.maxConcurrency <= 0:
            raise ValueError("'maxConcurrency' must be > 0")
        if self.maxTokenConcurrency <= 0:
            raise ValueError("'maxTokenConcurrency' must be > 0")
        if self.headroom < 0:
            raise ValueError("'headroom' must be >= 0")


@register("concurrency-detector")
class ConcurrencyDetector(InflightHooks, SaturationDetector, Filter):
    """Saturation = requests (or tokens) this EPP has in flight / (per-endpoint limit x endpoints).

    It books requests itself (PreRequest/ResponseComplete), so it works without the
    inflight-load producer being configured.
    """

    Params = ConcurrencyParams

    def __init__(self, name: str | None = None, params: ConcurrencyParams | None = None) -> None:
        super().__init__(name, params)
        self.tracker = InflightTracker(float(self.params.requestTimeout))

    def _limit_and_reader(self):
        p: ConcurrencyParams = self.params
        if p.concurrencyMode == "tokens":
            return p.maxTokenConcurrency, self.tracker.tokens
        return p.maxConcurrency, self.tracker.requests

    def saturation(self, candidates: Sequence[Candidate]) -> float:
        if not candidates:
            return 1.0
        limit, read = self._limit_and_reader()
        used = sum(read(c.key) for c in candidates)
        return used / (limit * len(candidates))

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> list[Candidate]:
        limit, read = self._limit_and_reader()
        cap = limit * (1.0 + self.params.headroom)
        kept = [c for c in candidates if read(c.key) < cap]
        return kept or candidates
