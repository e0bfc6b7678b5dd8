"""A scheduling profile: filters, weighted scorers and one picker, run over candidates."""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.framework.scheduling import (
    CycleState,
    Filter,
    Picker,
    ProfileResult,
    ScoreBreakdown,
    ScoredCandidate,
    Scorer,
    clamp01,
)
from epp.framework.types import Candidate, InferenceRequest


class NoCandidatesError(LookupError):
    """A profile ended with no endpoint (every candidate filtered out, or no pick)."""


@dataclass
class WeightedScorer:
    scorer: Scorer
    weight: float = 1.0


@dataclass
class SchedulingProfile:
    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)
    picker: Picker | None = None

    def run(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> ProfileResult:
        filtered_out: dict[str, list[str]] = {}
        for f in self.filters:
            kept = f.filter(cycle, request, candidates)
            if len(kept) != len(candidates):
                kept_keys = {c.key for c in kept}
                filtered_out[f.name] = [c.key for c in candidates if c.key not in kept_keys]
            candidates = kept
            if not candidates:
                raise NoCandidatesError(f"no endpoints available for the given request (filter '{f.name}' removed all)")
        n = len(candidates)
        totals = [0.0] * n
        breakdown = [ScoreBreakdown(c.key, 0.0) for c in candidates]
        for ws in self.scorers:
            scores = ws.scorer.score(cycle, request, candidates)
            weight = ws.weight
            name = ws.scorer.name
            for i in range(n):
                raw = clamp01(scores[i]) if i < len(scores) else 0.0
                weighted = raw * weight
                totals[i] += weighted
                breakdown[i].scorers[name] = (raw, weighted)
        for i in range(n):
            breakdown[i].total = totals[i]
        if self.picker is None:
            raise NoCandidatesError(f"profile '{self.name}' has no picker")
        targets = self.picker.pick(cycle, request, [ScoredCandidate(c, t) for c, t in zip(candidates, totals)])
        if not targets:
            raise NoCandidatesError(f"picker '{self.picker.name}' returned no endpoint")
        return ProfileResult(targets=targets, breakdown=breakdown, filtered_out=filtered_out)
