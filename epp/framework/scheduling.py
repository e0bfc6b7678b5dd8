"""Scheduling extension points: filters, scorers, pickers, profile handlers.

One scheduling cycle: the profile handler chooses profiles; each profile runs its filters
in order (an empty result ends the profile), every scorer scores every remaining candidate
(scores are clamped to [0, 1] and multiplied by the profile's weight, unnormalised), and
the picker chooses; the handler then combines the profile results.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence, TypeVar

from epp.framework.plugin import Plugin
from epp.framework.types import Candidate, InferenceRequest

if TYPE_CHECKING:
    from epp.scheduling.profile import SchedulingProfile

T = TypeVar("T")


class CycleState(dict):
    """Per-cycle scratch space plugins share (one dict per scheduling cycle)."""

    def read(self, key: str, tp: type[T]) -> T | None:
        value = self.get(key)
        return value if isinstance(value, tp) else None


class Filter(Plugin, ABC):
    @abstractmethod
    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> list[Candidate]:
        """Return the candidates to keep (a subset, in any order)."""


class Scorer(Plugin, ABC):
    # Per-request data keys (Candidate.data) this scorer reads; the loader auto-creates the
    # registered default producer of each key when none is configured.
    consumes: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        """One score per candidate, aligned with ``candidates``; nominally in [0, 1]."""


@dataclass(slots=True)
class ScoredCandidate:
    candidate: Candidate
    score: float


class Picker(Plugin, ABC):
    @abstractmethod
    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredCandidate]) -> list[Candidate]:
        """Ordered targets (primary first); empty means no pick."""


@dataclass(slots=True)
class ScoreBreakdown:
    """Why a candidate got its total: per scorer, the raw (clamped) score and weighted share."""

    key: str
    total: float
    scorers: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (raw, weighted)


@dataclass(slots=True)
class ProfileResult:
    targets: list[Candidate]
    breakdown: list[ScoreBreakdown] = field(default_factory=list)
    filtered_out: dict[str, list[str]] = field(default_factory=dict)  # filter name -> removed keys


@dataclass(slots=True)
class SchedulingResult:
    profile_results: dict[str, ProfileResult | None]
    primary_profile: str

    @property
    def primary(self) -> ProfileResult:
        result = self.profile_results.get(self.primary_profile)
        if result is None:
            raise LookupError(f"primary profile '{self.primary_profile}' has no result")
        return result

    @property
    def targets(self) -> list[Candidate]:
        return self.primary.targets


class ProfileHandler(Plugin, ABC):
    """Decides which profiles run (possibly over several rounds) and merges their results.

    ``pick_profiles`` is called repeatedly with the results so far until it returns no
    profiles, so a prefill/decode handler can run ``decode`` first and ``prefill`` only if
    a decider says so, without the scheduler knowing about disaggregation.
    """

    max_profiles: ClassVar[int | None] = None  # None = any number of profiles

    @abstractmethod
    def pick_profiles(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        profiles: Mapping[str, "SchedulingProfile"],
        results: Mapping[str, ProfileResult | None],
    ) -> Mapping[str, "SchedulingProfile"]:
        ...

    @abstractmethod
    def process_results(
        self, cycle: CycleState, request: InferenceRequest, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        ...


def clamp01(x: Any) -> float:
    """Scores outside [0, 1] (or NaN) are clamped; this is the framework's contract."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0
    if x != x:  # NaN
        return 0.0
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x
