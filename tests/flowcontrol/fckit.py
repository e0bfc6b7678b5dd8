"""Flow-control test kit: a real EndpointPool whose endpoints' metrics the test sets, the
real built-in policies, and a detector whose verdict the test sets directly."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from epp.datalayer.endpoint import EndpointMetadata, now
from epp.datalayer.pool import EndpointPool
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.settings import BandSettings, FlowControlSettings
from epp.framework import SaturationDetector
from epp.framework.headers import read_control_headers
from epp.framework.types import InferenceRequest
from plugins.flowcontrol.fairness import GlobalStrictFairness, RoundRobinFairness
from plugins.flowcontrol.ordering import EDFOrdering, FCFSOrdering, SLODeadlineOrdering
from plugins.flowcontrol.usage_limits import HoldbackParams, PriorityHoldback, StaticUsageLimit
from plugins.requestcontrol.saturation import UtilizationDetector, UtilizationParams

FAIRNESS = {"global-strict": GlobalStrictFairness, "round-robin": RoundRobinFairness}
ORDERING = {"fcfs": FCFSOrdering, "edf": EDFOrdering, "slo": SLODeadlineOrdering}


class Dial(SaturationDetector):
    """Saturation is whatever the test says (``value``), plus 1/``room`` per pending request
    (so with ``room`` set, it behaves like a pool with that much headroom between scrapes)."""

    plugin_type = "test-dial"

    def __init__(self) -> None:
        super().__init__("dial")
        self.value = 0.0
        self.room = 0

    def saturation(self, candidates):
        return self.value

    def saturation_with_pending(self, candidates, pending):
        if not self.room:
            return self.value
        return self.value + sum(pending.values()) / self.room


def pool_of(n: int = 2) -> EndpointPool:
    pool = EndpointPool("test-pool")
    pool.sync([EndpointMetadata("10.0.0.%d" % (i + 1), 8000) for i in range(n)])
    return pool


def settings(detector: SaturationDetector | None = None, *, fairness: str = "global-strict", ordering: str = "fcfs",
             bands: Sequence[tuple[int, int, int]] = (), ttl: float = 60.0, no_endpoint_ttl: float | None = None,
             max_requests: int = 0, max_bytes: int = 0, holdback: HoldbackParams | None = None,
             band_max_requests: int = 5000, band_max_bytes: int = 1_000_000_000) -> FlowControlSettings:
    f, o = FAIRNESS[fairness](), ORDERING[ordering]()
    usage = PriorityHoldback("holdback", holdback) if holdback is not None else StaticUsageLimit()
    return FlowControlSettings(
        detector=detector or Dial(), usage_limit=usage,
        default_band=BandSettings(None, f, o, band_max_bytes, band_max_requests),
        bands=tuple(BandSettings(p, f, o, mb, mr) for p, mr, mb in bands),
        max_requests=max_requests, max_bytes=max_bytes, default_ttl=ttl,
        no_endpoint_ttl=ttl if no_endpoint_ttl is None else no_endpoint_ttl)


def controller(s: FlowControlSettings, pool: EndpointPool | None = None) -> FlowController:
    pool = pool if pool is not None else pool_of()
    return FlowController(s, pool.schedulable, pool_name="test-pool")


def request(i: int, *, headers: dict[str, str] | None = None, model: str = "m") -> InferenceRequest:
    r = InferenceRequest(request_id=f"r{i}", headers=headers or {}, body=b"x" * 10)
    r.incoming_model = r.target_model = model
    r.received_at = now()
    read_control_headers(r, r.headers)  # as the Director does
    return r


class Waiter:
    """One request going through the controller as the Director would drive it."""

    def __init__(self, fc: FlowController, i: int, *, fid: str = "default-flow", priority: int = 0,
                 size: int = 10, ttl: float | None = None, headers: dict[str, str] | None = None) -> None:
        self.i, self.fid, self.priority = i, fid, priority
        self.req = request(i, headers=headers)
        self.task = asyncio.get_running_loop().create_task(
            fc.wait_for_dispatch(self.req, fairness_id=fid, priority=priority, byte_size=size, ttl=ttl))

    @property
    def dispatched(self) -> bool:
        return self.task.done() and not self.task.cancelled() and self.task.exception() is None

    def schedule(self, target: str = "10.0.0.1:8000") -> Any:
        ticket = self.task.result()
        ticket.scheduled((target,))
        return ticket


async def settle(rounds: int = 5) -> None:
    """Let the loop run the cycles the last events scheduled."""
    for _ in range(rounds):
        await asyncio.sleep(0)
