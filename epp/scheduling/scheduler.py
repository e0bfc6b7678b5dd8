"""The scheduler: runs the profile handler's rounds of profiles and combines the results."""

from __future__ import annotations

import logging
from typing import Mapping

from epp.framework.scheduling import CycleState, ProfileHandler, ProfileResult, SchedulingResult
from epp.framework.types import Candidate, InferenceRequest
from epp.scheduling.profile import NoCandidatesError, SchedulingProfile

log = logging.getLogger(__name__)

# A handler that never stops asking for profiles is a bug; bound the rounds.
MAX_ROUNDS = 16


class SchedulingError(LookupError):
    """No profile produced a result; the request cannot be routed."""


class Scheduler:
    def __init__(self, handler: ProfileHandler, profiles: Mapping[str, SchedulingProfile]) -> None:
        self.handler = handler
        self.profiles = dict(profiles)

    def schedule(self, request: InferenceRequest, candidates: list[Candidate], cycle: CycleState | None = None) -> SchedulingResult:
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
