"""``lora-affinity-scorer``: prefer endpoints that already have the request's adapter loaded."""

from __future__ import annotations

from typing import Sequence

from epp.framework import Scorer, register
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest


@register("lora-affinity-scorer")
class LoraAffinityScorer(Scorer):
    """Adapter active -> 1.0; a free adapter slot -> 0.8; adapter waiting to load -> 0.6; else 0.

    The adapter is the request's ``lora_adapter`` or, as upstream, its target model (vLLM
    serves adapters as model names).
    """

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        model = request.lora_adapter or request.target_model or request.incoming_model
        out = []
        for c in candidates:
            mt = c.metrics
            active, waiting = mt.active_models, mt.waiting_models
            if model in active:
                out.append(1.0)
            elif len(active) + len(waiting) < mt.max_active_models:
                out.append(0.8)
            elif model in waiting:
                out.append(0.6)
            else:
                out.append(0.0)
        return out
