"""The flow controller driven as the Director drives it: queue, release, expire, cancel, reload."""

from __future__ import annotations

import asyncio

import pytest

from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.outcomes import DROPPED_REASON_HEADER
from epp.observability import metrics as m
from epp.requestcontrol.errors import RequestError
from fckit import Dial, Waiter, controller, pool_of, settings, settle
from plugins.flowcontrol.usage_limits import HoldbackParams


async def release_all(fc: FlowController, waiters: list[Waiter], rounds: int = 400) -> list[int]:
    """Schedule each request as soon as it is released; return the release order."""
    order: list[int] = []
    pending = list(waiters)
    for _ in range(rounds):
        await asyncio.sleep(0)
        for w in [w for w in pending if w.task.done()]:
            pending.remove(w)
            if w.dispatched:
                order.append(w.i)
                w.schedule()
        if not pending:
            break
    return order


async def test_an_idle_pool_dispatches_without_suspending() -> None:
    fc = controller(settings())
    coro = fc.wait_for_dispatch(_req(), fairness_id="a", priority=0, byte_size=1)
    with pytest.raises(StopIteration) as done:
        coro.send(None)  # runs to completion in one step: no event-loop hop
    ticket = done.value.value
    assert ticket.outcome == "Dispatched" and ticket.queue_time == 0.0
    ticket.scheduled(("10.0.0.1:8000",))
    assert fc.ledger.in_flight("10.0.0.1:8000") == 1
    ticket.finish()
    assert fc.ledger.total == 0


async def test_saturation_queues_then_releases_in_arrival_order() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial))
    waiters = [Waiter(fc, i) for i in range(5)]
    await settle()
    assert not any(w.task.done() for w in waiters) and fc.registry.len == 5
    dial.value = 0.0
    fc.notify()
    assert await release_all(fc, waiters) == [0, 1, 2, 3, 4]
    assert fc.registry.len == 0 and fc.outcomes["Dispatched"] == 5


async def test_one_release_at_a_time_until_the_previous_is_scheduled() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial))
    waiters = [Waiter(fc, i) for i in range(3)]
    await settle()
    dial.value = 0.0
    fc.notify()
    await settle(10)
    assert [w.i for w in waiters if w.task.done()] == [0]  # the next waits for this one's booking
    waiters[0].schedule()
    await settle(10)
    assert [w.i for w in waiters if w.task.done()] == [0, 1]


async def test_releases_do_not_overshoot_between_scrapes() -> None:
    """With room for 2 more requests (as a scrape says), 2 go; the rest wait for fresh data."""
    dial = Dial()
    dial.value, dial.room = 1.0, 4  # each request sent since the scrape adds 1/4
    fc = controller(settings(dial))
    waiters = [Waiter(fc, i) for i in range(6)]
    await settle()
    dial.value = 0.5  # the scrape: half full -> 2 more fit below 1.0
    fc.notify()
    assert len(await release_all(fc, waiters, rounds=50)) == 2
    # the next scrape (taken after the sends reached the servers) shows them; none finished
    await asyncio.sleep(0.02)
    for ep in fc._locate():
        ep.update_metrics()
    dial.value = 0.75
    fc.notify()
    assert len(await release_all(fc, [w for w in waiters if not w.task.done()], rounds=50)) == 1


async def test_higher_priority_never_waits_behind_lower_bands() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial, bands=[(10, 5000, 10**9)]))
    low = [Waiter(fc, i, priority=0) for i in range(3)]
    await settle()
    high = [Waiter(fc, 10 + i, priority=10) for i in range(2)]
    await settle()
    dial.value = 0.0
    fc.notify()
    assert await release_all(fc, low + high) == [10, 11, 0, 1, 2]


async def test_holdback_gates_lower_bands_first() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial, bands=[(10, 5000, 10**9)], holdback=HoldbackParams(minCeiling=0.5)))
    low, high = Waiter(fc, 0, priority=0), Waiter(fc, 1, priority=10)
    await settle()
    dial.value = 0.7  # below the top band's ceiling (1.0), above the bottom one's (0.5)
    fc.notify()
    assert await release_all(fc, [high], rounds=20) == [1]
    await settle(10)
    assert not low.task.done()
    dial.value = 0.2
    fc.notify()
    assert await release_all(fc, [low], rounds=20) == [0]


async def test_round_robin_shares_turns_between_tenants() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial, fairness="round-robin"))
    flood = [Waiter(fc, i, fid="b") for i in range(6)]
    await settle()
    light = [Waiter(fc, 100 + i, fid="a") for i in range(2)]
    await settle()
    dial.value = 0.0
    fc.notify()
    assert await release_all(fc, flood + light) == [100, 0, 101, 1, 2, 3, 4, 5]


async def test_ttl_expiry_is_upstreams_429() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial, ttl=0.05))
    w = Waiter(fc, 0)
    with pytest.raises(RequestError) as e:
        await asyncio.wait_for(w.task, 5)
    assert e.value.status == 429
    assert e.value.body == b"inference error: ResourceExhausted - request timed out in queue: request evicted from queue: request TTL expired"
    assert e.value.headers[DROPPED_REASON_HEADER] == "rejected-ttl-expired"
    assert fc.registry.len == 0 and fc.outcomes["EvictedTTL"] == 1


async def test_per_request_ttl_overrides_the_default() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial, ttl=60))
    w = Waiter(fc, 0, ttl=0.02)
    with pytest.raises(RequestError):
        await asyncio.wait_for(w.task, 5)


async def test_empty_pool_waits_then_503_no_endpoints() -> None:
    pool = pool_of(1)
    fc = controller(settings(ttl=60, no_endpoint_ttl=0.05), pool)
    pool.sync([])
    w = Waiter(fc, 0)
    with pytest.raises(RequestError) as e:
        await asyncio.wait_for(w.task, 5)
    assert e.value.status == 503 and e.value.headers[DROPPED_REASON_HEADER] == "rejected-no-endpoints"
    assert e.value.message.startswith("request timed out in queue and no endpoints are available: ")
    assert fc.outcomes["EvictedNoEndpoints"] == 1


async def test_an_endpoint_appearing_releases_the_waiting_requests() -> None:
    pool = pool_of(1)
    fc = controller(settings(no_endpoint_ttl=10), pool)
    meta = pool.endpoints()[0].metadata
    pool.sync([])
    w = Waiter(fc, 0)
    await settle()
    assert not w.task.done()
    pool.sync([meta])
    fc.notify()  # what the pool listener does
    assert await release_all(fc, [w], rounds=20) == [0]


async def test_a_cancelled_waiter_leaves_the_queue_at_once() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial))
    a, b = Waiter(fc, 0), Waiter(fc, 1)
    await settle()
    gauge = m.FC_QUEUE_SIZE.labels("default-flow", "0", "test-pool", "m", "m")
    before = gauge._value.get()
    a.task.cancel()
    await settle()
    assert fc.registry.len == 1 and fc.outcomes["EvictedContextCancelled"] == 1
    assert gauge._value.get() == before - 1
    dial.value = 0.0
    fc.notify()
    assert await release_all(fc, [b]) == [1]


async def test_band_capacity_rejects_with_429_rejected_saturated() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial, band_max_requests=2))
    ok = [Waiter(fc, i) for i in range(2)]
    over = Waiter(fc, 2)
    with pytest.raises(RequestError) as e:
        await over.task
    assert e.value.status == 429 and e.value.headers[DROPPED_REASON_HEADER] == "rejected-saturated"
    assert e.value.body == b"inference error: ResourceExhausted - request rejected pre-queue: queue at capacity"
    assert fc.registry.len == 2 and not any(w.task.done() for w in ok)


async def test_stop_answers_every_queued_request_503_shutting_down() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial))
    waiters = [Waiter(fc, i) for i in range(3)]
    await settle()
    fc.stop()
    for w in waiters:
        with pytest.raises(RequestError) as e:
            await w.task
        assert e.value.status == 503 and e.value.headers[DROPPED_REASON_HEADER] == "rejected-shutting-down"
    with pytest.raises(RequestError):
        await Waiter(fc, 9).task
    assert fc.registry.len == 0


async def test_a_reloaded_controller_adopts_the_queue() -> None:
    dial = Dial()
    dial.value = 1.0
    pool = pool_of()
    old = controller(settings(dial), pool)
    waiters = [Waiter(old, i, fid="b" if i % 2 else "a") for i in range(4)]
    await settle()
    new = FlowController(settings(dial, fairness="round-robin"), pool.schedulable, ledger=old.ledger,
                         pool_name="test-pool")
    new.adopt(old)
    assert old.registry.len == 0 and new.registry.len == 4
    dial.value = 0.0
    old.notify()  # events reaching the old controller are forwarded
    assert await release_all(new, waiters) == [0, 1, 2, 3]
    assert new.outcomes["Dispatched"] == 4


async def test_release_all_lets_everything_through() -> None:
    dial = Dial()
    dial.value = 1.0
    fc = controller(settings(dial))
    waiters = [Waiter(fc, i) for i in range(3)]
    await settle()
    fc.release_all()
    await settle()
    assert all(w.dispatched for w in waiters) and fc.registry.len == 0


def _req():
    from fckit import request

    return request(0)
