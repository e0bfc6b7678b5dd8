"""Prefill backlog: prefer endpoints with less prompt work queued ahead of a new request.

A new request's time to first token on an endpoint is roughly the prefill still pending there
(chunked prefill serves it first-come first-served) plus its own uncached prompt. The backlog
comes from ``prefill-backlog-producer`` (this EPP's own bookings, so no scrape lag).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from epp.framework import Scorer, register
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest
from plugins.requestcontrol.data import NO_INFLIGHT, PREFILL_BACKLOG_KEY
from plugins.requestcontrol.inflight import estimate_tokens
from plugins.scheduling.scorers._util import lower_is_better

NORMALIZATIONS = ("minmax", "threshold")


@dataclass
class PrefillBacklogParams:
    # minmax: (max - b) / (max - min) over the candidates (all equal -> 1.0);
    # threshold: 1 - min(1, b / thresholdTokens), comparable across requests.
    normalization: str = "minmax"
    thresholdTokens: int = 16384
    # Add the request's own uncached prompt on each candidate (needs prefix-cache data to differ
    # between candidates), so the score tracks the prefill work until this request's first token.
    includeRequest: bool = False

    def validate(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"'normalization' must be one of {', '.join(NORMALIZATIONS)}, "
                             f"not {self.normalization!r}")
        if self.thresholdTokens <= 0:
            raise ValueError("'thresholdTokens' must be > 0")


def threshold_scores(backlogs: Sequence[float], threshold: float) -> list[float]:
    """1 - min(1, b / threshold) for each backlog."""
    return [0.0 if b >= threshold else 1.0 - b / threshold for b in backlogs]


@register("prefill-backlog-scorer")
class PrefillBacklogScorer(Scorer):
    """Less pending prefill (uncached prompt tokens awaiting a first token) scores higher."""

    Params = PrefillBacklogParams
    consumes = frozenset({PREFILL_BACKLOG_KEY})

    def backlogs(self, request: InferenceRequest, candidates: Sequence[Candidate]) -> list[int]:
        key = PREFILL_BACKLOG_KEY
        out = [c.data.get(key, NO_INFLIGHT).tokens for c in candidates]
        if self.params.includeRequest:
            out = [b + estimate_tokens(request, c) for b, c in zip(out, candidates)]
        return out

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        backlogs = self.backlogs(request, candidates)
        if self.params.normalization == "threshold":
            return threshold_scores(backlogs, float(self.params.thresholdTokens))
        return lower_is_better(backlogs)
