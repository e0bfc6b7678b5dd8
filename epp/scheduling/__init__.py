"""Scheduling: profiles of filters, weighted scorers and a picker, run by the Scheduler."""

from epp.scheduling.admission import LegacyAdmission
from epp.scheduling.profile import Breakdown, NoCandidatesError, SchedulingProfile, WeightedScorer
from epp.scheduling.scheduler import Scheduler, SchedulingError

__all__ = [
    "Breakdown", "LegacyAdmission", "NoCandidatesError", "Scheduler", "SchedulingError", "SchedulingProfile",
    "WeightedScorer",
]
