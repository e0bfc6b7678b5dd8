"""Fairness policies: which flow (fairness id) of a priority band is served next."""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

from epp.framework import register
from epp.framework.flowcontrol import Band, FairnessPolicy, FlowQueue


@register("global-strict-fairness-policy")
class GlobalStrictFairness(FairnessPolicy):
    """The best head request of the whole band, by the band's ordering policy: no tenant
    isolation (with FCFS ordering, the band behaves as one queue)."""

    def pick(self, band: Band, state: Any) -> FlowQueue | None:
        best: FlowQueue | None = None
        best_key: Any = None
        for q in band.flows():
            head = q.peek()
            key = (head.order, head.seq)
            if best is None or key < best_key:
                best, best_key = q, key
        return best


class _Cursor:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: str | None = None


@register("round-robin-fairness-policy")
class RoundRobinFairness(FairnessPolicy):
    """Takes turns between the band's non-empty flows in fairness-id order, one request each,
    whatever their backlog: a light tenant waits behind at most one request per busy tenant."""

    def new_state(self) -> _Cursor:
        return _Cursor()

    def pick(self, band: Band, state: Any) -> FlowQueue | None:
        flows = band.flows()
        if not flows:
            return None
        cursor: _Cursor = state
        if cursor.last is None:
            q = flows[0]
        else:
            i = bisect_right([f.key.id for f in flows], cursor.last)
            q = flows[i] if i < len(flows) else flows[0]
        cursor.last = q.key.id
        return q
