"""The flow controller: holds requests while the pool is saturated, releases them in policy order.

Request side (the Director, once per request, between admission and scheduling)::

    ticket = await controller.wait_for_dispatch(request, fairness_id=..., priority=..., byte_size=...)
    ... schedule; then ticket.scheduled(targets) ...   # or ticket.finish() if scheduling failed
    ... when the response ends: ticket.finish()

``wait_for_dispatch`` returns at once, without suspending, when nothing is queued and the
request's band is below its ceiling (the fast path costs one saturation reading). Otherwise the
request is queued and the coroutine awaits a plain future: the ext_proc stream is parked and
nothing runs for it until the future is resolved (dispatched) or fails with the ``RequestError``
of its outcome (TTL, shutdown). If the caller goes away, ``CancelledError`` arrives at that
await and the request leaves the queue at once.

Dispatch is event-driven, never a polling tick: a cycle runs when a request is queued, when a
dispatched request is scheduled or finishes, when fresh metrics arrive, when endpoints come or
go (``notify``), and when a TTL expires (one timer, armed for the earliest deadline). A cycle
releases at most one request, then waits until that request has been scheduled and booked in
the in-flight ledger, so the next saturation reading includes it: releases never overshoot
between two scrapes (see ``saturation.py``).

Everything runs on the event loop; no locks.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import sys
import time
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

from epp.datalayer.endpoint import Endpoint, now
from epp.flowcontrol import outcomes as oc
from epp.flowcontrol.outcomes import Outcome
from epp.flowcontrol.queue import DONE, HANDOFF, IN_FLIGHT, QUEUED, FlowItem
from epp.flowcontrol.registry import BandState, FlowRegistry
from epp.flowcontrol.saturation import DispatchLedger, StageCache, pool_saturation
from epp.flowcontrol.settings import FlowControlSettings
from epp.flowcontrol.telemetry import FlowMetrics
from epp.framework.flowcontrol import FlowKey
from epp.framework.durations import parse_duration
from epp.framework.types import DEFAULT_FAIRNESS_ID, InferenceRequest
from epp.requestcontrol.errors import RequestError

log = logging.getLogger(__name__)

TTL_HEADER = "x-llm-d-inference-ttl"  # upstream's per-request queue-wait budget (a Go duration)


def request_ttl(headers: Mapping[str, str]) -> float | None:
    """The request's own queue-wait budget, if it sends a valid positive one."""
    raw = headers.get(TTL_HEADER)
    if raw is None:
        return None
    try:
        ttl = parse_duration(raw.strip())
    except ValueError:
        log.debug("ignoring invalid %s header %r", TTL_HEADER, raw)
        return None
    return ttl if ttl > 0 else None


# A released request that has not been scheduled within this long stops holding back the
# next release (a safety net; the Director always reports back).
HANDOFF_GRACE = 0.5
GC_EVERY = 30.0
GAUGE_EVERY = 0.05


class FlowController:
    def __init__(self, settings: FlowControlSettings, locate: Callable[[], Sequence[Endpoint]], *,
                 ledger: DispatchLedger | None = None, pool_name: str = "",
                 clock: Callable[[], float] = now) -> None:
        self.settings = settings
        self._locate = locate
        self._clock = clock
        t = clock()
        self.registry = FlowRegistry(settings, t)
        # Shared across config reloads: it is the EPP's in-flight state, not the config's.
        self.ledger = ledger if ledger is not None else DispatchLedger()
        self.metrics = FlowMetrics(pool_name)
        self.outcomes: Counter[str] = Counter()
        self.last_saturation = 0.0
        self.last_stages: dict[str, float] = {}
        self._stages = StageCache()
        self._gauge_at = -math.inf
        self._seq = 0
        self._handoff = 0
        self._handoff_since = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cycle_pending = False
        self._deadlines: list[tuple[float, int, FlowItem]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._pool_empty = False
        self._stopped = False
        self._last_gc = t
        self._successor: FlowController | None = None
        self._warned: set[str] = set()

    # --- the request side ------------------------------------------------------------------------
    async def wait_for_dispatch(self, request: InferenceRequest, *, fairness_id: str | None = None,
                                priority: int | None = None, byte_size: int | None = None,
                                ttl: float | None = None) -> FlowItem:
        """Wait until the request may be scheduled; returns its ticket.

        The flow is (``request.fairness_id``, ``request.priority``), the size its body, the
        queue-wait budget ``x-llm-d-inference-ttl`` or else ``defaultRequestTTL``; the keyword
        arguments override them. Raises ``RequestError`` for a rejection or eviction
        (upstream's status, body and ``x-llm-d-request-dropped-reason``).
        """
        t0 = time.perf_counter()
        t = self._clock()
        if fairness_id is None:
            fairness_id = request.fairness_id or DEFAULT_FAIRNESS_ID
        if priority is None:
            priority = request.priority
        if byte_size is None:
            byte_size = len(request.body)
        if ttl is None:
            ttl = request_ttl(request.headers)
        self._seq += 1
        budget = self.settings.default_ttl if ttl is None else ttl
        item = FlowItem(request, FlowKey(fairness_id, priority), byte_size, t, budget or None, self._seq)
        item.controller = self
        item.labels = (request.incoming_model, request.target_model)
        if self._stopped:
            self._end(item, Outcome.REJECTED_OTHER, 0.0)
            raise oc.shutting_down(queued=False)
        if t - self._last_gc >= GC_EVERY:
            self._last_gc = t
            self.registry.collect_garbage(t, self.metrics.forget_flow)
        reg = self.registry
        band = reg.band(priority, t)

        endpoints = self._locate()
        self._set_regime(not endpoints, t)
        if not reg.len and not self._holding(t) and endpoints and self._may_dispatch(band, endpoints, t):
            self._release(item, t)
            self.metrics.enqueue_decision(item, Outcome.DISPATCHED.value, time.perf_counter() - t0)
            return item
        if not reg.has_room(band, byte_size):
            outcome = Outcome.REJECTED_NO_ENDPOINTS if self._pool_empty else Outcome.REJECTED_CAPACITY
            self._end(item, outcome, 0.0)
            self.metrics.enqueue_decision(item, outcome.value, time.perf_counter() - t0)
            raise oc.rejected_capacity(self._pool_empty)
        try:
            item.order = band.ordering.sort_key(item)
        except Exception as e:  # a broken third-party policy costs this request, not the queue
            self._warn_once(band.ordering.name, "ordering policy %s failed", band.ordering.name)
            self._end(item, Outcome.REJECTED_OTHER, 0.0)
            raise oc.internal(f"ordering policy {band.ordering.name!r} failed: {type(e).__name__}: {e}") from None
        if self._loop is None:  # needed from here on: timers, futures, deferred cycles
            self._loop = asyncio.get_running_loop()
        reg.add(band, item)
        self.metrics.queued(item)
        self.metrics.capacity(reg, band)
        item.deadline = self._deadline_for(item, t)
        if item.deadline:
            heapq.heappush(self._deadlines, (item.deadline, item.seq, item))
            self._arm_timer()
        self.metrics.enqueue_decision(item, "NotYetFinalized", time.perf_counter() - t0)

        self._cycle()  # this request may be the one to go: then no suspension at all
        if item.state != QUEUED:
            if item.state == DONE:  # cannot happen today (a cycle only releases); kept honest
                raise oc.internal("request ended while being queued")
            return item
        fut = item.future = self._loop.create_future()  # type: ignore[union-attr]
        try:
            await fut
        except asyncio.CancelledError:
            self._cancelled(item)
            raise
        return item

    def on_scheduled(self, item: FlowItem, targets: tuple[str, ...]) -> None:
        if item.state != HANDOFF:
            return
        item.state = IN_FLIGHT
        item.targets = targets
        sent = item.sent_at = self._clock()
        for key in targets:
            self.ledger.add(key, sent)
        self._end_handoff()

    def on_finished(self, item: FlowItem) -> None:
        state = item.state
        if state == DONE:
            return
        item.state = DONE
        if state == HANDOFF:
            self._end_handoff()
        elif state == IN_FLIGHT:
            for key in item.targets:
                self.ledger.remove(key, item.sent_at)
            self.notify()
        elif state == QUEUED:  # finished without waiting (never happens through the Director)
            self._leave_queue(item, Outcome.EVICTED_OTHER)

    # --- events ----------------------------------------------------------------------------------
    def notify(self) -> None:
        """Capacity may have changed (a request ended, fresh metrics, endpoints came or went)."""
        target = self._successor or self
        if target._cycle_pending or not target.registry.len or target._loop is None:
            return
        target._cycle_pending = True
        target._loop.call_soon(target._cycle)

    # --- dispatch --------------------------------------------------------------------------------
    def _holding(self, t: float) -> bool:
        """Whether a released request is still on its way to being scheduled."""
        if not self._handoff:
            return False
        if t - self._handoff_since < HANDOFF_GRACE:
            return True
        self._warn_once("handoff", "a dispatched request was not scheduled within %.1fs; releasing more",
                        HANDOFF_GRACE)
        return False

    def _measure(self, endpoints: Sequence[Endpoint], t: float) -> tuple[float, list[int], Sequence[float]]:
        try:
            sat, stages = pool_saturation(self.settings.detector, endpoints, self.ledger, self._stages)
        except Exception:
            self._warn_once(self.settings.detector.name, "saturation detector %s failed; treating the pool as "
                            "saturated", self.settings.detector.name)
            sat, stages = 1.0, {}
        self.last_saturation, self.last_stages = sat, stages
        if t - self._gauge_at >= GAUGE_EVERY:  # a gauge, not a log: the latest value every 50 ms will do
            self._gauge_at = t
            self.metrics.saturation(sat, stages)
        prios = self.registry.priorities
        try:
            ceilings = self.settings.usage_limit.ceilings(sat, prios)
        except Exception:
            self._warn_once(self.settings.usage_limit.name, "usage limit policy %s failed; using ceiling 1.0",
                            self.settings.usage_limit.name)
            ceilings = [1.0] * len(prios)
        return sat, prios, ceilings

    def _may_dispatch(self, band: BandState, endpoints: Sequence[Endpoint], t: float) -> bool:
        """The fast path's question: with nothing queued, may a request of ``band`` go now?"""
        sat, prios, ceilings = self._measure(endpoints, t)
        for prio, ceiling in zip(prios, ceilings):
            if sat >= ceiling:
                return False  # head-of-line: a band above (or this one) is gated
            if prio == band.priority:
                return True
        return False

    def _cycle(self) -> None:
        self._cycle_pending = False
        try:
            self._dispatch_one()
        except Exception:  # a bug must not leave the queue stuck: the next event retries
            log.exception("flow control dispatch cycle failed")

    def _dispatch_one(self) -> None:
        reg = self.registry
        if not reg.len or self._stopped:
            return
        t = self._clock()
        if self._holding(t):
            return
        endpoints = self._locate()
        self._set_regime(not endpoints, t)
        if not endpoints:
            return  # queued requests wait for endpoints (noEndpointRequestTTL)
        t0 = time.perf_counter()
        sat, prios, ceilings = self._measure(endpoints, t)
        for prio, ceiling in zip(prios, ceilings):
            if sat >= ceiling:
                break  # head-of-line blocking: lower bands must not take what this one cannot
            band = reg.bands[prio]
            if not band.len:
                continue
            try:
                q = band.fairness.pick(band, band.fairness_state)
            except Exception:
                self._warn_once(band.fairness.name, "fairness policy %s failed; skipping its band this cycle",
                                band.fairness.name)
                continue
            if q is None or not len(q):
                continue
            item = reg.pop(q, t)
            self._leave_queue(item, None)
            self.metrics.capacity(reg, band)
            self._release(item, t)
            break
        self.metrics.cycle(time.perf_counter() - t0)

    def _release(self, item: FlowItem, t: float) -> None:
        item.state = HANDOFF
        item.released_at = t
        if not self._handoff:
            self._handoff_since = t
        self._handoff += 1
        self._end(item, Outcome.DISPATCHED, t - item.enqueued_at)
        fut = item.future
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _end_handoff(self) -> None:
        if self._handoff:
            self._handoff -= 1
        self.notify()

    # --- leaving without dispatch ------------------------------------------------------------
    def _leave_queue(self, item: FlowItem, outcome: Outcome | None) -> None:
        """Bookkeeping for an item that left its queue (already removed from the registry)."""
        self.metrics.left_queue(item)
        if outcome is not None:
            item.state = DONE
            self._end(item, outcome, self._clock() - item.enqueued_at)

    def _evict(self, item: FlowItem, outcome: Outcome, error: RequestError, t: float) -> None:
        band = item.flow.band if item.flow is not None else None
        self.registry.remove(item, t)
        self._leave_queue(item, outcome)
        if band is not None:
            self.metrics.capacity(self.registry, band)
        fut = item.future
        if fut is not None and not fut.done():
            fut.set_exception(error)

    def _cancelled(self, item: FlowItem) -> None:
        """The caller went away (client disconnect, the EPP's deadline) while waiting."""
        fut = item.future
        if fut is not None and fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: no "exception never retrieved" noise
        if item.state == QUEUED:
            t = self._clock()
            band = item.flow.band if item.flow is not None else None
            self.registry.remove(item, t)
            self._leave_queue(item, Outcome.EVICTED_CONTEXT_CANCELLED)
            if band is not None:
                self.metrics.capacity(self.registry, band)
        elif item.state == HANDOFF:  # released, but gone before it could be scheduled
            item.state = DONE
            self._end_handoff()

    def _end(self, item: FlowItem, outcome: Outcome, queue_seconds: float) -> None:
        item.outcome = outcome.value
        self.outcomes[outcome.value] += 1
        self.metrics.finished(item, outcome.value, queue_seconds)

    # --- TTLs --------------------------------------------------------------------------------------
    def _deadline_for(self, item: FlowItem, start: float) -> float:
        ttl = self.settings.no_endpoint_ttl if self._pool_empty else item.ttl
        return start + ttl if ttl else 0.0

    def _set_regime(self, empty: bool, t: float) -> None:
        """Entering or leaving the no-endpoints regime gives every queued request a fresh budget."""
        if empty == self._pool_empty:
            return
        self._pool_empty = empty
        if not self.registry.len:
            return
        heap = []
        for item in self.registry.items():
            item.deadline = self._deadline_for(item, t)
            if item.deadline:
                heap.append((item.deadline, item.seq, item))
        heapq.heapify(heap)
        self._deadlines = heap
        self._cancel_timer()
        self._arm_timer()

    def _arm_timer(self) -> None:
        heap = self._deadlines
        if len(heap) > 64 and len(heap) > 2 * self.registry.len:  # drop entries of requests long gone
            heap = self._deadlines = [e for e in heap if e[2].state == QUEUED and e[2].deadline == e[0]]
            heapq.heapify(heap)
        while heap and (heap[0][2].state != QUEUED or heap[0][2].deadline != heap[0][0]):
            heapq.heappop(heap)
        if not heap or self._loop is None:
            return
        at = heap[0][0]
        if self._timer is not None and self._timer_at <= at:
            return
        self._cancel_timer()
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - self._clock()), self._expire)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf

    def _expire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        t = self._clock()
        heap = self._deadlines
        empty = self._pool_empty
        while heap and heap[0][0] <= t:
            deadline, _, item = heapq.heappop(heap)
            if item.state == QUEUED and item.deadline == deadline:
                outcome = Outcome.EVICTED_NO_ENDPOINTS if empty else Outcome.EVICTED_TTL
                self._evict(item, outcome, oc.evicted_ttl(empty), t)
        self._arm_timer()

    # --- lifecycle ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Shut down: every queued request gets upstream's 503 ``rejected-shutting-down``."""
        if self._stopped:
            return
        self._stopped = True
        self._cancel_timer()
        t = self._clock()
        for item in self.registry.drain(t):
            self._leave_queue(item, Outcome.EVICTED_OTHER)
            fut = item.future
            if fut is not None and not fut.done():
                fut.set_exception(oc.shutting_down(queued=True))
        self._deadlines = []

    def release_all(self) -> None:
        """Let every queued request through (flow control was turned off by a config reload)."""
        self._cancel_timer()
        t = self._clock()
        for item in self.registry.drain(t):
            self.metrics.left_queue(item)
            self._release(item, t)
        self._deadlines = []

    def adopt(self, old: "FlowController") -> None:
        """Take over the queued requests of ``old`` (config reload): they keep their place in
        time (enqueue time, deadline) and are ordered by this config's policies."""
        t = self._clock()
        self._loop = self._loop or old._loop
        old._successor = self
        old._cancel_timer()
        moved = old.registry.drain(t)
        old._deadlines = []
        for item in sorted(moved, key=lambda i: i.seq):
            band = self.registry.band(item.key.priority, t)
            try:
                item.order = band.ordering.sort_key(item)
            except Exception as e:
                item.state = DONE
                old.metrics.left_queue(item)
                old._end(item, Outcome.EVICTED_OTHER, t - item.enqueued_at)
                if item.future is not None and not item.future.done():
                    item.future.set_exception(oc.internal(f"ordering policy {band.ordering.name!r} failed: {e}"))
                continue
            item.controller = self
            item.state = QUEUED
            self.registry.add(band, item)  # the queue gauges stay as they were: same labels
            if item.flow is not None:
                item.flow.labels.add(item.labels)
            if item.deadline:
                heapq.heappush(self._deadlines, (item.deadline, item.seq, item))
        self._seq = max(self._seq, old._seq)
        self._arm_timer()
        self.notify()

    # --- introspection ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Queue state for /debug: bands, flows, what each waits for."""
        t = self._clock()
        bands = []
        for prio in self.registry.priorities:
            band = self.registry.bands[prio]
            flows = []
            for q in band.flows():
                items = q.live_items()
                oldest = min((i.enqueued_at for i in items), default=t)
                flows.append({"fairness_id": q.key.id, "queued": len(q), "bytes": q.byte_size,
                              "oldest_wait_s": round(t - oldest, 3)})
            bands.append({"priority": prio, "queued": band.len, "bytes": band.byte_size,
                          "max_requests": band.settings.max_requests, "max_bytes": band.settings.max_bytes,
                          "fairness": band.fairness.name, "ordering": band.ordering.name, "flows": flows})
        return {
            "queued": self.registry.len, "bytes": self.registry.byte_size,
            "saturation": round(self.last_saturation, 4),
            "stages": {k: round(v, 4) for k, v in self.last_stages.items()},
            "pool_empty": self._pool_empty, "dispatching": self._handoff,
            "in_flight": self.ledger.snapshot(), "outcomes": dict(self.outcomes), "bands": bands,
        }

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        """Log a problem once per key (with the traceback when called from an except block)."""
        if key in self._warned:
            log.debug(msg, *args)
            return
        self._warned.add(key)
        log.warning(msg, *args, exc_info=sys.exc_info()[0] is not None)
