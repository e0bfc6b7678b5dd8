"""Pickers: choose the target(s) from the scored candidates (upstream §3.3).

``maxNumOfEndpoints`` (default 1; <= 0 means 1) targets are returned, primary first.
Ties are broken uniformly at random without shuffling the whole list: shuffling 1024
candidates per request costs more than all the scoring.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass

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

    def _random(self, scored: list[ScoredCandidate]) -> list[Candidate]:
        if self.n == 1:
            return [scored[self.rng.randrange(len(scored))].candidate]
        return [s.candidate for s in self.rng.sample(scored, min(self.n, len(scored)))]


@register("max-score-picker")
class MaxScorePicker(_Picker):
    """Highest total score first; equal scores in uniformly random order."""

    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredCandidate]) -> list[Candidate]:
        if not scored:
            return []
        if self.n == 1:
            best = max(s.score for s in scored)
            ties = [s for s in scored if s.score == best]
            chosen = ties[0] if len(ties) == 1 else ties[self.rng.randrange(len(ties))]
            return [chosen.candidate]
        rnd = self.rng.random
        top = heapq.nlargest(self.n, ((s.score, rnd(), s) for s in scored), key=lambda t: (t[0], t[1]))
        return [t[2].candidate for t in top]


@register("random-picker")
class RandomPicker(_Picker):
    """Uniformly random, ignoring scores."""

    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredCandidate]) -> list[Candidate]:
        if not scored:
            return []
        return self._random(scored)


@register("weighted-random-picker")
class WeightedRandomPicker(_Picker):
    """Random in proportion to score (A-Res: key = U^(1/score), highest keys win).

    Scores <= 0 get key 0 (chosen only when nothing positive is left); with no positive
    score at all this is the random picker.
    """

    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredCandidate]) -> list[Candidate]:
        if not scored:
            return []
        if not any(s.score > 0 for s in scored):
            return self._random(scored)
        rnd = self.rng.random
        keyed = []
        for s in scored:
            if s.score > 0:
                u = rnd() or 1e-10
                keyed.append((math.pow(u, 1.0 / s.score), s))
            else:
                keyed.append((0.0, s))
        if self.n == 1:
            return [max(keyed, key=lambda t: t[0])[1].candidate]
        return [t[1].candidate for t in heapq.nlargest(self.n, keyed, key=lambda t: t[0])]
