"""The pool's saturation as flow control sees it: the detector's verdict, corrected for the
requests this EPP sent since the endpoints' metrics were scraped, taken per serving stage.

Why the correction: scraped gauges (queue depth, KV use) lag by up to a scrape interval.
Without it, one fresh scrape saying "room for 3" would let every queued request through
before the next scrape shows the result. The ``DispatchLedger`` remembers, per endpoint, when
each in-flight request was sent; those sent after the endpoint's last scrape are handed to
the detector as pending (``SaturationDetector.saturation_with_pending``). Detectors that count
in-flight requests themselves (``concurrency-detector``) ignore them.

Stages follow upstream: endpoints labelled ``llm-d.ai/role`` are split into prefill
(``prefill``, ``encode-prefill``) and decode (``decode`` or no label); ``prefill-decode``,
``both`` and ``encode-prefill-decode`` serve both; ``encode`` and unknown roles serve neither.
Saturation is the worst stage's; a pool without role labels is one stage.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.framework.requestcontrol import SaturationDetector
from epp.framework.types import Candidate

ROLE_LABEL = "llm-d.ai/role"
_PREFILL = frozenset({"prefill", "encode-prefill"})
_DECODE = frozenset({"decode"})
_BOTH = frozenset({"prefill-decode", "both", "encode-prefill-decode"})
# A request sent this long before a scrape may still not be in what the scrape saw (it was
# on its way through the proxy); it counts as pending a little longer.
SCRAPE_LAG = 0.005


class DispatchLedger:
    """Per endpoint key, the send times (monotonic, ascending) of this EPP's in-flight requests."""

    __slots__ = ("_times", "total")

    def __init__(self) -> None:
        self._times: dict[str, list[float]] = {}
        self.total = 0

    def add(self, key: str, t: float) -> None:
        times = self._times.get(key)
        if times is None:
            self._times[key] = [t]
        elif not times or times[-1] <= t:
            times.append(t)
        else:  # a clock step backwards: keep the list sorted anyway
            times.insert(bisect_right(times, t), t)
        self.total += 1

    def remove(self, key: str, t: float) -> None:
        times = self._times.get(key)
        if not times:
            return
        i = bisect_right(times, t) - 1
        if i >= 0 and times[i] == t:
            del times[i]
            self.total -= 1
            if not times:
                del self._times[key]

    def in_flight(self, key: str) -> int:
        times = self._times.get(key)
        return len(times) if times else 0

    def unseen(self, key: str, scraped_at: float) -> int:
        """In-flight requests sent to ``key`` that a scrape taken at ``scraped_at`` cannot show."""
        times = self._times.get(key)
        if not times:
            return 0
        return len(times) - bisect_right(times, scraped_at - SCRAPE_LAG)

    def snapshot(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._times.items()}


def _stages(endpoints: Sequence[Endpoint]) -> list[tuple[str, list[Endpoint]]] | None:
    """(stage, endpoints) for the non-empty stages, or None when no endpoint has a role."""
    prefill: list[Endpoint] = []
    decode: list[Endpoint] = []
    labelled = False
    for ep in endpoints:
        role = ep.metadata.labels.get(ROLE_LABEL)
        if role is None:
            decode.append(ep)
            continue
        labelled = True
        if role in _BOTH:
            prefill.append(ep)
            decode.append(ep)
        elif role in _PREFILL:
            prefill.append(ep)
        elif role in _DECODE:
            decode.append(ep)
    if not labelled:
        return None
    out = [(name, eps) for name, eps in (("prefill", prefill), ("decode", decode)) if eps]
    return out or None


class StageCache:
    """The stage split of the last endpoint list seen: the pool hands out the same tuple until
    it changes, so the split is recomputed only then."""

    __slots__ = ("_endpoints", "_stages")

    def __init__(self) -> None:
        self._endpoints: Sequence[Endpoint] | None = None
        self._stages: list[tuple[str, list[Endpoint]]] | None = None

    def __call__(self, endpoints: Sequence[Endpoint]) -> list[tuple[str, list[Endpoint]]] | None:
        if endpoints is not self._endpoints or not isinstance(endpoints, tuple):
            self._stages = _stages(endpoints)
            self._endpoints = endpoints
        return self._stages


def pool_saturation(detector: SaturationDetector, endpoints: Sequence[Endpoint], ledger: DispatchLedger,
                    stages_of: StageCache | None = None) -> tuple[float, dict[str, float]]:
    """(effective saturation, per-stage saturations) over ``endpoints``."""
    stages = stages_of(endpoints) if stages_of is not None else _stages(endpoints)
    if stages is None:
        sat = _measure(detector, endpoints, ledger)
        return sat, {}
    per_stage = {name: _measure(detector, eps, ledger) for name, eps in stages}
    return max(per_stage.values()), per_stage


def _measure(detector: SaturationDetector, endpoints: Sequence[Endpoint], ledger: DispatchLedger) -> float:
    cands = [Candidate(ep) for ep in endpoints]
    if not ledger.total:
        return detector.saturation(cands)
    pending: dict[str, int] = {}
    for c in cands:
        n = ledger.unseen(c.key, c.metrics.update_time)
        if n:
            pending[c.key] = n
    return detector.saturation_with_pending(cands, pending) if pending else detector.saturation(cands)
