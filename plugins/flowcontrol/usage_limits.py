"""Usage-limit policies: per priority band, the saturation below which the band may dispatch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from epp.framework import register
from epp.framework.flowcontrol import UsageLimitPolicy


@dataclass
class StaticParams:
    threshold: float = 1.0

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"'threshold' must be in (0, 1], got {self.threshold:g}")


@register("static-usage-limit-policy")
class StaticUsageLimit(UsageLimitPolicy):
    """The same ceiling (``threshold``) for every band."""

    Params = StaticParams

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        return [self.params.threshold] * len(priorities)


@dataclass
class HoldbackParams:
    shape: Literal["linear"] | None = None
    domain: Literal["rank", "value", "explicit"] = "rank"
    minCeiling: float | None = None
    maxCeiling: float | None = None
    ceilings: dict[Any, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.domain == "explicit":
            if not self.ceilings:
                raise ValueError("'ceilings' is required when domain is 'explicit'")
            for name in ("shape", "minCeiling", "maxCeiling"):
                if getattr(self, name) is not None:
                    raise ValueError(f"'{name}' must not be set when domain is 'explicit'")
            try:
                self.ceilings = {int(k): float(v) for k, v in self.ceilings.items()}
            except (TypeError, ValueError):
                raise ValueError("'ceilings' keys must be integer priorities") from None
            for p, c in self.ceilings.items():
                if not 0.0 <= c <= 1.0:
                    raise ValueError(f"ceiling for priority {p} must be in [0, 1], got {c:g}")
            ordered = sorted(self.ceilings, reverse=True)
            for hi, lo in zip(ordered, ordered[1:]):
                if self.ceilings[lo] > self.ceilings[hi]:
                    raise ValueError(f"'ceilings' must not increase as priority falls: priority {lo} has "
                                     f"{self.ceilings[lo]:g}, above priority {hi}'s {self.ceilings[hi]:g}")
            return
        if self.ceilings:
            raise ValueError("'ceilings' must not be set unless domain is 'explicit'")
        if self.minCeiling is None:
            raise ValueError("'minCeiling' is required")
        if self.maxCeiling is None:
            self.maxCeiling = 1.0
        if not 0.0 <= self.minCeiling < 1.0:
            raise ValueError(f"'minCeiling' must be in [0, 1), got {self.minCeiling:g}")
        if not 0.0 < self.maxCeiling <= 1.0:
            raise ValueError(f"'maxCeiling' must be in (0, 1], got {self.maxCeiling:g}")
        if self.minCeiling >= self.maxCeiling:
            raise ValueError(f"'minCeiling' ({self.minCeiling:g}) must be below 'maxCeiling' ({self.maxCeiling:g})")


@register("priority-holdback-policy")
class PriorityHoldback(UsageLimitPolicy):
    """Lower bands get lower ceilings, so they are held back first as the pool fills.

    ``rank``: evenly spaced by rank, maxCeiling for the highest band to minCeiling for the
    lowest; ``value``: proportional to the priority values; ``explicit``: a ceiling per
    priority (a priority not listed gets 0: fully gated). One band alone gets maxCeiling.
    """

    Params = HoldbackParams

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        p: HoldbackParams = self.params
        n = len(priorities)
        if p.domain == "explicit":
            return [p.ceilings.get(prio, 0.0) for prio in priorities]
        hi, lo = float(p.maxCeiling or 1.0), float(p.minCeiling or 0.0)
        if n <= 1:
            return [hi] * n
        if p.domain == "rank":
            step = (hi - lo) / (n - 1)
            return [hi - i * step for i in range(n)]
        top, bottom = priorities[0], priorities[-1]
        if top == bottom:
            return [hi] * n
        return [lo + (prio - bottom) / (top - bottom) * (hi - lo) for prio in priorities]
