"""Load scorers: queue depth, running requests, KV-cache use, and this EPP's in-flight load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from epp.framework import Duration, Scorer, register
from epp.framework.plugin import Handle
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest
from plugins.requestcontrol.data import INFLIGHT_LOAD_KEY, NO_INFLIGHT
from plugins.scheduling.scorers._util import lower_is_better


@register("queue-scorer")
class QueueScorer(Scorer):
    """Fewer waiting requests is better, min-max normalised over the candidates."""

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        return lower_is_better([c.metrics.waiting_queue_size for c in candidates])


@register("running-requests-size-scorer")
class RunningRequestsSizeScorer(Scorer):
    """Fewer running requests is better, min-max normalised over the candidates."""

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        return lower_is_better([c.metrics.running_requests for c in candidates])


@register("kv-cache-utilization-scorer")
class KVCacheUtilizationScorer(Scorer):
    """1 - KV-cache usage (a 0..1 fraction)."""

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        return [1.0 - c.metrics.kv_cache_usage for c in candidates]


@dataclass
class LoadAwareParams:
    threshold: int = 128


@register("load-aware-scorer")
class LoadAwareScorer(Scorer):
    """Empty queue -> 0.5; otherwise 0.5 * (1 - min(queue, threshold) / threshold)."""

    Params = LoadAwareParams

    def __init__(self, name: str | None = None, params: LoadAwareParams | None = None) -> None:
        super().__init__(name, params)
        self.threshold = self.params.threshold if self.params.threshold > 0 else 128

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        thr = self.threshold
        out = []
        for c in candidates:
            q = c.metrics.waiting_queue_size
            out.append(0.5 if q <= 0 else 0.5 * (1.0 - min(q, thr) / thr))
        return out


@dataclass
class ActiveRequestParams:
    idleThreshold: int = 0
    maxBusyScore: float = 1.0
    requestTimeout: Duration | None = None  # accepted for compatibility; the inflight producer tracks lifetimes


@register("active-request-scorer")
class ActiveRequestScorer(Scorer):
    """Requests this EPP has in flight per endpoint: count <= idleThreshold -> 1.0,
    else (maxCount - count) / maxCount * maxBusyScore, maxCount over the candidates."""

    Params = ActiveRequestParams
    consumes = frozenset({INFLIGHT_LOAD_KEY})

    def __init__(self, name: str | None = None, params: ActiveRequestParams | None = None) -> None:
        super().__init__(name, params)
        p: ActiveRequestParams = self.params
        self.idle = max(p.idleThreshold, 0)
        self.max_busy = p.maxBusyScore if 0.0 <= p.maxBusyScore <= 1.0 else 1.0

    @classmethod
    def create(cls, name: str, params: ActiveRequestParams, handle: Handle) -> "ActiveRequestScorer":
        if params.requestTimeout is not None:
            handle.warn("parameter 'requestTimeout' is ignored; request lifetimes are tracked by inflight-load-producer")
        return cls(name, params)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        key = INFLIGHT_LOAD_KEY
        counts = [c.data.get(key, NO_INFLIGHT).requests for c in candidates]
        max_count = max(counts, default=0)
        idle, busy = self.idle, self.max_busy
        return [1.0 if n <= idle or max_count == 0 else (max_count - n) / max_count * busy for n in counts]


@dataclass
class TokenLoadParams:
    queueThresholdTokens: int = 4194304

    def validate(self) -> None:
        if self.queueThresholdTokens <= 0:
            raise ValueError("'queueThresholdTokens' must be > 0")


@register("token-load-scorer")
class TokenLoadScorer(Scorer):
    """1 - min(1, in-flight tokens / queueThresholdTokens)."""

    Params = TokenLoadParams
    consumes = frozenset({INFLIGHT_LOAD_KEY})

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        key = INFLIGHT_LOAD_KEY
        thr = float(self.params.queueThresholdTokens)
        out = []
        for c in candidates:
            t = c.data.get(key, NO_INFLIGHT).tokens / thr
            out.append(0.0 if t >= 1.0 else 1.0 - t)
        return out
