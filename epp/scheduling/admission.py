"""Legacy admission (no flow control): shed sheddable requests when the pool is saturated.

Upstream's ``LegacyAdmissionController``: only requests with priority < 0 are sheddable;
they are refused with 429 when the saturation detector reports >= 1.0 over the request's
candidates. Everything else is admitted without even asking the detector.
"""

from __future__ import annotations

from typing import Sequence

from epp.framework.requestcontrol import AdmissionDenied, SaturationDetector
from epp.framework.types import Candidate, InferenceRequest

SHED_STATUS = 429
SHED_REASON = "system saturated, sheddable request dropped"


class LegacyAdmission:
    def __init__(self, detector: SaturationDetector) -> None:
        self.detector = detector

    def check(self, request: InferenceRequest, candidates: Sequence[Candidate]) -> AdmissionDenied | None:
        """None to admit; otherwise the 429 the director turns into an ImmediateResponse."""
        if request.priority >= 0:
            return None
        if self.detector.saturation(candidates) >= 1.0:
            return AdmissionDenied(SHED_STATUS, SHED_REASON)
        return None
