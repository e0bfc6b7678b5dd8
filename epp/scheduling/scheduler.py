"""The scheduler: runs the profile handler's rounds of profiles and combines the results.

Each ``schedule`` call records ``inference_extension_scheduler_e2e_duration_seconds`` and
``inference_extension_scheduler_attempts_total`` (as upstream's scheduler does), so the
director must not record them again. Histogram observations go through
``epp.observability.deferred`` (binned in bulk off the request path).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from epp.framework.scheduling import CycleState, ProfileHandler, ProfileResult, SchedulingResult
from epp.framework.types import Candidate, InferenceRequest
from epp.observability import deferred
from epp.observability.metrics import SCHEDULER_ATTEMPTS, SCHEDULER_E2E
from epp.scheduling.profile import NoCandidatesError, SchedulingProfile

log = logging.getLogger(__name__)

# A handler that never stops asking for profiles is a bug; bound the rounds.
MAX_ROUNDS = 16
_ATTEMPT_CHILDREN_LIMIT = 4096


class SchedulingError(LookupError):
    """No profile produced a result; the request cannot be routed."""


class Scheduler:
    def __init__(self, handler: ProfileHandler, profiles: Mapping[str, SchedulingProfile]) -> None:
        self.handler = handler
        self.profiles = dict(profiles)
        self._attempts: dict[tuple[str, str, str], Any] = {}

    def schedule(self, request: InferenceRequest, candidates: list[Candidate], cycle: CycleState | None = None) -> SchedulingResult:
        start = time.perf_counter()
        try:
            result = self._schedule(request, candidates, cycle)
        except SchedulingError:
            deferred.observe(SCHEDULER_E2E, time.perf_counter() - start)
            self._attempt("failure", request.target_model, None)
            raise
        deferred.observe(SCHEDULER_E2E, time.perf_counter() - start)
        targets = result.profile_results.get(result.primary_profile)
        self._attempt("success", request.target_model, targets.targets[0] if targets and targets.targets else None)
        return result

    def _schedule(self, request: InferenceRequest, candidates: list[Candidate], cycle: CycleState | None) -> SchedulingResult:
        cycle = CycleState() if cycle is None else cycle
        results: dict[str, ProfileResult | None] = {}
        errors: list[str] = []
        for _ in range(MAX_ROUNDS):
            picked = self.handler.pick_profiles(cycle, request, self.profiles, results)
            if not picked:
                break
            for name, profile in picked.items():
                try:
                    results[name] = profile.run(cycle, request, list(candidates))
                except NoCandidatesError as e:
                    results[name] = None
                    errors.append(f"{name}: {e}")
        else:
            log.warning("profile handler %s asked for more than %d rounds", self.handler.name, MAX_ROUNDS)
        if not any(r is not None for r in results.values()):
            detail = "; ".join(errors) or "no profile was run"
            raise SchedulingError(f"failed to run any scheduler profile for request {request.request_id}: {detail}")
        try:
            return self.handler.process_results(cycle, request, results)
        except (LookupError, ValueError) as e:
            raise SchedulingError(str(e)) from e

    def _attempt(self, status: str, model: str, target: Candidate | None) -> None:
        key = (status, model, target.key if target is not None else "")
        child = self._attempts.get(key)
        if child is None:
            if len(self._attempts) >= _ATTEMPT_CHILDREN_LIMIT:
                self._attempts.clear()
            if target is None:
                child = SCHEDULER_ATTEMPTS.labels(status, model, "", "", "")
            else:
                md = target.metadata
                child = SCHEDULER_ATTEMPTS.labels(status, model, md.name, md.namespace, str(md.port))
            self._attempts[key] = child
        child.inc()
