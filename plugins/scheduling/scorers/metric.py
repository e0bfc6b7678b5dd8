"""``metric-scorer``: score endpoints by any custom metric the data layer collected.

Reads ``Metrics.custom[metricName]`` (written e.g. by the ``prometheus-metric``
extractor). With ``min``/``max`` the score is the value's linear position between them,
clamped; without, min-max normalisation over the candidates (all equal -> 1.0). With
``higherIsBetter: false`` (the default) the position is inverted.

A metric that is missing, not a finite number, or older than ``metricsStalenessThreshold``
scores 0 (the worst case, so nothing is scheduled on blind faith) and is counted in
``epp_scorer_stale_or_missing_metric_total{plugin_name,metric,reason}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from epp.datalayer.endpoint import now
from epp.framework import Duration, Scorer, register
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest
from epp.observability.metrics import STALE_METRIC_SCORES


@dataclass
class MetricScorerParams:
    metricName: str
    higherIsBetter: bool = False
    min: float | None = None
    max: float | None = None
    metricsStalenessThreshold: Duration = Duration(2.0)

    def validate(self) -> None:
        if not self.metricName:
            raise ValueError("'metricName' must not be empty")
        if (self.min is None) != (self.max is None):
            raise ValueError("'min' and 'max' must be given together")
        if self.min is not None and self.max is not None and not self.max > self.min:
            raise ValueError(f"'max' ({self.max}) must be greater than 'min' ({self.min})")
        if self.metricsStalenessThreshold <= 0:
            raise ValueError("'metricsStalenessThreshold' must be > 0")


@register("metric-scorer")
class MetricScorer(Scorer):
    Params = MetricScorerParams

    def __init__(self, name: str | None = None, params: MetricScorerParams | None = None) -> None:
        super().__init__(name, params)
        metric = self.params.metricName
        self._missing = STALE_METRIC_SCORES.labels(self.name, metric, "missing")
        self._stale = STALE_METRIC_SCORES.labels(self.name, metric, "stale")
        self._invalid = STALE_METRIC_SCORES.labels(self.name, metric, "invalid")

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        p: MetricScorerParams = self.params
        metric = p.metricName
        oldest = now() - p.metricsStalenessThreshold
        values: list[float | None] = []
        missing = stale = invalid = 0
        for c in candidates:
            mt = c.metrics
            v = mt.custom.get(metric)
            if v is None:
                missing += 1
                values.append(None)
                continue
            t = mt.custom_time.get(metric)
            if t is None or t < oldest:
                stale += 1
                values.append(None)
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                f = math.nan
            if not math.isfinite(f):
                invalid += 1
                values.append(None)
                continue
            values.append(f)
        if missing:
            self._missing.inc(missing)
        if stale:
            self._stale.inc(stale)
        if invalid:
            self._invalid.inc(invalid)
        if p.min is not None and p.max is not None:
            lo, span = p.min, p.max - p.min
        else:
            present = [v for v in values if v is not None]
            if not present:
                return [0.0] * len(values)
            lo, hi = min(present), max(present)
            if hi == lo:
                return [0.0 if v is None else 1.0 for v in values]
            span = hi - lo
        higher = p.higherIsBetter
        out = []
        for v in values:
            if v is None:
                out.append(0.0)
                continue
            pos = (v - lo) / span
            pos = 0.0 if pos < 0.0 else 1.0 if pos > 1.0 else pos
            out.append(pos if higher else 1.0 - pos)
        return out
