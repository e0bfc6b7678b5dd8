"""The request headers that steer the EPP, under upstream's current and legacy names.

Upstream (llm-d router) moved its control headers to an ``x-llm-d-`` prefix and keeps the
older names as aliases; when a request carries both, the new name wins. None of them is
meant for the model server, so the EPP removes every one of them from the routed request.

| new name (wins)                  | legacy alias                      | read into                 |
|----------------------------------|-----------------------------------|---------------------------|
| x-llm-d-inference-objective      | x-gateway-inference-objective     | ``request.objective``     |
| x-llm-d-inference-fairness-id    | x-gateway-inference-fairness-id   | ``request.fairness_id``   |
| x-llm-d-model-name-rewrite       | x-gateway-model-name-rewrite      | the target model          |
| x-llm-d-slo-ttft-ms              | x-slo-ttft-ms                     | ``request.slo_ttft_ms``   |
| x-llm-d-slo-tpot-ms              | x-slo-tpot-ms                     | ``request.slo_tpot_ms``   |
"""

from __future__ import annotations

import math
from typing import Mapping

from epp.framework.types import DEFAULT_FAIRNESS_ID, InferenceRequest

OBJECTIVE = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
FAIRNESS_ID = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
MODEL_REWRITE = ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite")
SLO_TTFT_MS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
SLO_TPOT_MS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")

CONTROL_HEADERS: tuple[str, ...] = (*OBJECTIVE, *FAIRNESS_ID, *MODEL_REWRITE, *SLO_TTFT_MS, *SLO_TPOT_MS)
_CONTROL = frozenset(CONTROL_HEADERS)


def control_header(headers: Mapping[str, str], names: tuple[str, str]) -> str:
    """The value under the new name, else under the legacy one, else ""."""
    return headers.get(names[0]) or headers.get(names[1]) or ""


def _milliseconds(text: str) -> float:
    """A positive finite number of milliseconds, else 0 (= no objective), as upstream treats
    a missing or invalid SLO header."""
    try:
        value = float(text) if text else 0.0
    except ValueError:
        return 0.0
    return value if value > 0 and math.isfinite(value) else 0.0


def read_control_headers(request: InferenceRequest, headers: Mapping[str, str]) -> list[str]:
    """Fill the request fields the control headers carry (the model rewrite is read by the
    rewriter) and return the names present, which are removed before the request is
    routed. One C-level disjointness check when none is present (the common case)."""
    present = present_control_headers(headers)
    if present:
        request.objective = control_header(headers, OBJECTIVE) or request.objective
        request.fairness_id = control_header(headers, FAIRNESS_ID) or DEFAULT_FAIRNESS_ID
        request.slo_ttft_ms = _milliseconds(control_header(headers, SLO_TTFT_MS))
        request.slo_tpot_ms = _milliseconds(control_header(headers, SLO_TPOT_MS))
    return present


def present_control_headers(headers: Mapping[str, str]) -> list[str]:
    """The control headers a request carries (they are removed before it is routed)."""
    return [] if _CONTROL.isdisjoint(headers) else sorted(_CONTROL.intersection(headers))
