"""Scheduling: profiles of filters, weighted scorers and a picker, run by the Scheduler."""

from epp.scheduling.profile import NoCandidatesError, SchedulingProfile, WeightedScorer
from epp.scheduling.scheduler import Scheduler, SchedulingError

__all__ = ["NoCandidatesError", "Scheduler", "SchedulingError", "SchedulingProfile", "WeightedScorer"]
