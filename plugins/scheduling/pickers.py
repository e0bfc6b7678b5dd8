"""Pickers: choose the target(s) from the scored candidates (upstream §3.3).

``maxNumOfEndpoints`` (default 1; <= 0 means 1) targets are returned, primary first.
Ties are broken uniformly at random without shuffling the whole list: shuffling 1024
candidates per request costs more than all the scoring.

Besides ``Picker.pick`` (ScoredCandidate objects), these pickers implement
``pick_scores(cycle, request, candidates, scores)`` on parallel lists, which
``SchedulingProfile`` prefers when present: it saves building one object per candidate
per request.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Sequence

from epp.framework import Picker, register
from epp.framework.scheduling import CycleState, ScoredCandidate
from epp.framework.types import Candidate, InferenceRequest


@dataclass
class PickerParams:
    maxNumOfEndpoints: int = 1


class _Picker(Picker):
    Params = PickerParams

    def __init__(self, name: str | None = None, params: PickerParams | None = None,
                 rng: random.Random | None = None) -> None:
        super().__init__(name, params)
        self.n = self.params.maxNumOfEndpoints if self.params.maxNumOfEndpoints > 0 else 1
        self.rng = rng or random.Random()

    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredCandidate]) -> list[Candidate]:
        return self.pick_scores(cycle, request, [s.candidate for s in scored], [s.score for s in scored])

    def pick_scores(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Candidate],
                    scores: Sequence[float]) -> list[Candidate]:
        raise NotImplementedError

    def _random(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        if self.n == 1:
            return [candidates[self.rng.randrange(len(candidates))]]
        return self.rng.sample(list(candidates), min(self.n, len(candidates)))


@register("max-score-picker")
class MaxScorePicker(_Picker):
    """Highest total score first; equal scores in uniformly random order."""

    def pick_scores(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Candidate],
                    scores: Sequence[float]) -> list[Candidate]:
        if not candidates:
            return []
        if self.n == 1:
            best = max(scores)
            ties = scores.count(best) if isinstance(scores, list) else sum(1 for s in scores if s == best)
            if ties <= 1:  # also a NaN best, which equals nothing
                return [candidates[list(scores).index(best) if ties else 0]]
            nth = self.rng.randrange(ties)
            for i, s in enumerate(scores):
                if s == best:
                    if nth == 0:
                        return [candidates[i]]
                    nth -= 1
        rnd = self.rng.random
        top = heapq.nlargest(self.n, range(len(candidates)), key=lambda i: (scores[i], rnd()))
        return [candidates[i] for i in top]


@register("random-picker")
class RandomPicker(_Picker):
    """Uniformly random, ignoring scores."""

    def pick_scores(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Candidate],
                    scores: Sequence[float]) -> list[Candidate]:
        if not candidates:
            return []
        return self._random(candidates)


@register("weighted-random-picker")
class WeightedRandomPicker(_Picker):
    """Random in proportion to score (A-Res: key = U^(1/score), highest keys win).

    Scores <= 0 get key 0 (chosen only when nothing positive is left); with no positive
    score at all this is the random picker.
    """

    def pick_scores(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Candidate],
                    scores: Sequence[float]) -> list[Candidate]:
        if not candidates:
            return []
        if not any(s > 0 for s in scores):
            return self._random(candidates)
        rnd = self.rng.random
        keys = [math.pow(rnd() or 1e-10, 1.0 / s) if s > 0 else 0.0 for s in scores]
        if self.n == 1:
            return [candidates[max(range(len(keys)), key=keys.__getitem__)]]
        return [candidates[i] for i in heapq.nlargest(self.n, range(len(keys)), key=keys.__getitem__)]
