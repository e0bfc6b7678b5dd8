"""Property tests of the flow controller with the built-in policies: strict priority, ordering
inside a flow, round-robin turns, capacity limits in bytes and count, and that every request
ends exactly once with the queue gauges back where they started."""

from __future__ import annotations

import asyncio
from collections import Counter

from hypothesis import given, settings as hsettings, strategies as st

from epp.observability import metrics as m
from epp.requestcontrol.errors import RequestError
from fckit import Waiter, controller, settings
from epp.framework import SaturationDetector

FIDS = ("a", "b", "c")
PRIOS = (0, 1, 2)
PROPS = hsettings(max_examples=60, deadline=None)


class Budget(SaturationDetector):
    """Saturated once ``budget`` requests are in flight (nothing ever finishes in these tests)."""

    plugin_type = "test-budget"

    def __init__(self) -> None:
        super().__init__("budget")
        self.budget = 0

    def saturation(self, candidates):
        return 0.0 if self.budget > 0 else 1.0

    def saturation_with_pending(self, candidates, pending):
        return 0.0 if sum(pending.values()) < self.budget else 1.0


async def _drain(waiters: list[Waiter], log: list[Waiter], queued_at_release: list[list[Waiter]]) -> None:
    """Schedule released requests as the Director would, recording the order and the queue then."""
    for _ in range(20):
        await asyncio.sleep(0)
        for w in waiters:
            if w.task.done() and w not in log and w.dispatched:
                queued_at_release.append([x for x in waiters if not x.task.done()])
                log.append(w)
                w.schedule()


arrivals = st.lists(st.tuples(st.sampled_from(FIDS), st.sampled_from(PRIOS)), min_size=1, max_size=30)


@PROPS
@given(arrivals, st.sampled_from(["global-strict", "round-robin"]))
def test_release_order_respects_bands_ordering_and_fairness(reqs, fairness) -> None:
    async def run() -> list[Waiter]:
        budget = Budget()
        fc = controller(settings(budget, fairness=fairness, bands=[(p, 5000, 10**9) for p in PRIOS]))
        waiters = [Waiter(fc, i, fid=f, priority=p) for i, (f, p) in enumerate(reqs)]
        await asyncio.sleep(0)
        budget.budget = len(reqs)
        fc.notify()
        log: list[Waiter] = []
        while len(log) < len(reqs):
            before = len(log)
            await _drain(waiters, log, [])
            assert len(log) > before, "dispatch stalled"
        assert fc.registry.len == 0 and fc.outcomes["Dispatched"] == len(reqs)
        return log

    log = asyncio.run(run())
    prios = [w.priority for w in log]
    assert prios == sorted(prios, reverse=True)  # strict priority: all were queued before the first release
    for p in PRIOS:
        band = [w for w in log if w.priority == p]
        for f in FIDS:  # FCFS inside each flow
            mine = [w.i for w in band if w.fid == f]
            assert mine == sorted(mine)
        if fairness == "global-strict":  # FCFS over the whole band
            assert [w.i for w in band] == sorted(w.i for w in band)
        else:  # round-robin: no tenant gets two turns while another still waits
            total = Counter(w.fid for w in band)
            seen: Counter[str] = Counter()
            for w in band:
                seen[w.fid] += 1
                waiting = [f for f in total if seen[f] < total[f]]
                for f in waiting:
                    assert seen[w.fid] - seen[f] <= 1


ops = st.lists(st.one_of(
    st.tuples(st.just("arrive"), st.sampled_from(FIDS), st.sampled_from(PRIOS)),
    st.tuples(st.just("open"), st.integers(1, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
), min_size=1, max_size=40)


@PROPS
@given(ops, st.sampled_from(["global-strict", "round-robin"]), st.sampled_from(["fcfs", "edf"]))
def test_interleaved_arrivals_releases_and_cancels_lose_nothing(script, fairness, ordering) -> None:
    gauge = m.FC_QUEUE_SIZE

    def queued_total() -> float:
        return sum(s.value for metric in gauge.collect() for s in metric.samples
                   if s.labels.get("inference_pool") == "test-pool")

    async def run() -> None:
        start = queued_total()
        budget = Budget()
        fc = controller(settings(budget, fairness=fairness, ordering=ordering, bands=[(p, 5000, 10**9) for p in PRIOS]))
        waiters: list[Waiter] = []
        log: list[Waiter] = []
        snapshots: list[list[Waiter]] = []
        for op in script:
            if op[0] == "arrive":
                waiters.append(Waiter(fc, len(waiters), fid=op[1], priority=op[2]))
            elif op[0] == "open":
                budget.budget += op[1]
                fc.notify()
            elif waiters:
                w = waiters[op[1] % len(waiters)]
                if not w.task.done():
                    w.task.cancel()
            await _drain(waiters, log, snapshots)
            assert fc.registry.len == sum(1 for w in waiters if not w.task.done())
            assert queued_total() - start == fc.registry.len
        # a released request never had a higher-priority one still queued at that moment
        for w, queued in zip(log, snapshots):
            assert all(q.priority <= w.priority for q in queued)
        assert len(log) <= max(budget.budget, 0)
        fc.stop()
        await asyncio.sleep(0)
        outcomes = Counter()
        for w in waiters:
            if w.task.cancelled():
                outcomes["cancelled"] += 1
            elif isinstance(w.task.exception(), RequestError):
                outcomes["shutdown"] += 1
            else:
                outcomes["dispatched"] += 1
        assert sum(outcomes.values()) == len(waiters)
        assert outcomes["dispatched"] == len(log)
        assert sum(fc.outcomes.values()) == len(waiters)  # each request counted exactly once
        assert fc.outcomes["EvictedContextCancelled"] == outcomes["cancelled"]
        assert fc.registry.len == 0 and queued_total() == start

    asyncio.run(run())


@PROPS
@given(st.lists(st.integers(1, 400), min_size=1, max_size=40), st.integers(1, 12), st.integers(50, 3000),
       st.integers(0, 10), st.integers(0, 4000))
def test_capacity_limits_in_bytes_and_count(sizes, band_max_requests, band_max_bytes, max_requests, max_bytes) -> None:
    async def run() -> None:
        budget = Budget()  # never opens: everything that is accepted stays queued
        fc = controller(settings(budget, band_max_requests=band_max_requests, band_max_bytes=band_max_bytes,
                                 max_requests=max_requests, max_bytes=max_bytes))
        count = total = 0
        for i, size in enumerate(sizes):
            w = Waiter(fc, i, size=size)
            await asyncio.sleep(0)
            fits = (count + 1 <= band_max_requests and total + size <= band_max_bytes
                    and (not max_requests or count + 1 <= max_requests) and (not max_bytes or total + size <= max_bytes))
            if fits:
                assert not w.task.done()
                count, total = count + 1, total + size
            else:
                assert isinstance(w.task.exception(), RequestError) and w.task.exception().status == 429
            assert fc.registry.len == count and fc.registry.byte_size == total
        fc.stop()
        await asyncio.sleep(0)

    asyncio.run(run())


@PROPS
@given(st.lists(st.tuples(st.sampled_from(FIDS), st.one_of(st.none(), st.integers(1, 500))), min_size=1, max_size=20),
       st.sampled_from(["edf", "slo"]))
def test_deadline_orderings_serve_the_earliest_deadline_first(reqs, ordering) -> None:
    """edf: deadline = enqueue + TTL; slo: received + x-llm-d-slo-ttft-ms; none = last, FCFS among equals."""

    async def run() -> list[Waiter]:
        budget = Budget()
        fc = controller(settings(budget, ordering=ordering, ttl=0))
        waiters = []
        for i, (fid, value) in enumerate(reqs):
            if ordering == "edf":
                waiters.append(Waiter(fc, i, fid=fid, ttl=None if value is None else 1000.0 + value))
            else:
                headers = {} if value is None else {"x-llm-d-slo-ttft-ms": str(value * 100)}
                waiters.append(Waiter(fc, i, fid=fid, headers=headers))
        await asyncio.sleep(0)
        budget.budget = len(reqs)
        fc.notify()
        log: list[Waiter] = []
        while len(log) < len(reqs):
            await _drain(waiters, log, [])
        return log

    log = asyncio.run(run())
    # arrivals are microseconds apart and deadlines at least 100 ms apart: the deadline decides
    keys = [(reqs[w.i][1] is None, reqs[w.i][1] or 0, w.i) for w in log]
    assert keys == sorted(keys)
