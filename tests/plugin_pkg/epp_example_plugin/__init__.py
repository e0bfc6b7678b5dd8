"""An out-of-tree scorer: gives every candidate the same configurable score.

Importing this module (which the ``epp.plugins`` entry point does) registers the type.
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.framework import Scorer, register


@dataclass
class ConstantParams:
    score: float = 0.5

    def validate(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"'score' must be within [0, 1], got {self.score}")


@register("example-constant-scorer")
class ConstantScorer(Scorer):
    Params = ConstantParams

    def score(self, cycle, request, candidates):
        return [self.params.score] * len(candidates)
