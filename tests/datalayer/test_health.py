"""Endpoint health: when an endpoint leaves scheduling and comes back.

The collector against real HTTP servers and real sockets (refused, no handshake, unknown host,
HTTP errors, hanging and slow pages); the pool's tiers and request-path exclusions on a
controlled clock.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from dl_helpers import POLL_ERRORS, EngineState, close_all, counter, meta, plugin, pool_of, vllm_page, wait_until, wiring

from epp.datalayer import pool as pool_module
from epp.datalayer.collector import Collector
from epp.datalayer.endpoint import Endpoint, EndpointMetadata
from epp.datalayer.errors import EndpointUnreachable
from epp.datalayer.httpclient import ConnectError, ScrapeClient
from epp.datalayer.pool import HOLD_BASE, LINGER

INTERVAL = 0.02


class RecordingSink:
    """A CollectorSink that remembers each reachability verdict with the failure count behind it."""

    def __init__(self) -> None:
        self.verdicts: list[tuple[str, bool, int]] = []

    def poll_error(self, source_type: str, count: int = 1) -> None:
        pass

    def extract_error(self, source_type: str, extractor_type: str, count: int = 1) -> None:
        pass

    def reachability(self, endpoint: Endpoint, reachable: bool) -> None:
        self.verdicts.append((endpoint.key, reachable, endpoint.failures))

    def forget(self, endpoint: Endpoint) -> None:
        pass


def scrape_wiring():
    return [wiring(plugin("prometheus-data-source"), plugin("core-metrics-extractor"))]


async def test_http_errors_count_consecutive_failures_and_unreachable_endpoints_are_reprobed(servers, caplog):
    caplog.set_level(logging.INFO, logger="epp.datalayer.collector")
    flaky = await servers(vllm_page(EngineState(waiting=0)))  # idle-looking: the most attractive data
    busy = await servers(vllm_page(EngineState(waiting=9)))
    pool = pool_of(meta(flaky), meta(busy))
    sink = RecordingSink()
    col = Collector(pool, scrape_wiring(), interval=INTERVAL, timeout=0.5, unreachable_after=60,
                    failure_threshold=3, max_backoff=0.1, sink=sink)
    await col.start()
    try:
        ep, ep_busy = pool.get(meta(flaky).key), pool.get(meta(busy).key)
        await wait_until(lambda: ep.metrics.update_time > 0 and ep_busy.metrics.update_time > 0, what="scraped")
        assert set(pool.schedulable()) == {ep, ep_busy}
        flaky.mode = "status"
        # From the first failed scrape its stale "idle" numbers stop attracting requests ...
        await wait_until(lambda: ep.failures >= 1, what="a failed scrape")
        assert pool.schedulable() == (ep_busy,)
        # ... and after the third in a row it is declared unreachable (HTTP errors are not "nobody answers").
        await wait_until(lambda: not ep.reachable, what="unreachable")
        assert (ep.key, False, 3) in sink.verdicts
        assert "3 scrapes in a row failed" in caplog.text
        # Re-probed with a backoff capped at max_backoff: it keeps asking, far below the tick rate.
        hits = flaky.hits["/metrics"]
        await wait_until(lambda: flaky.hits["/metrics"] >= hits + 4, what="re-probes")
        flaky.mode = "ok"
        await wait_until(lambda: ep.reachable and ep.failures == 0, what="back on the first good scrape")
        assert set(pool.schedulable()) == {ep, ep_busy}
        assert "is reachable again" in caplog.text
    finally:
        flaky.mode = "ok"
        await close_all(col)


async def test_a_hanging_page_is_a_timeout_and_a_slow_one_is_fine(servers, caplog):
    caplog.set_level(logging.DEBUG, logger="epp.datalayer.collector")
    good, hang, slow = await servers(), await servers(), await servers(vllm_page(EngineState(waiting=3)))
    hang.mode = "hang"
    slow.mode, slow.delay = "slow", 0.1
    pool = pool_of(meta(good), meta(hang), meta(slow))
    col = Collector(pool, scrape_wiring(), interval=INTERVAL, timeout=0.25, unreachable_after=60, failure_threshold=2)
    await col.start()
    try:
        ep_good, ep_hang, ep_slow = (pool.get(meta(s).key) for s in (good, hang, slow))
        await wait_until(lambda: not ep_hang.reachable, what="hanging page: unreachable after two timeouts")
        await wait_until(lambda: ep_slow.metrics.waiting_queue_size == 3, what="slow page read")
        assert ep_slow.reachable and ep_good.reachable
        assert f"GET http://{hang.address}/metrics: timed out after 0.25s" in caplog.text
        assert ep_hang not in pool.schedulable()
        assert col.ticks[ep_good.key] > 2 * col.ticks[ep_hang.key]  # the neighbour kept its own pace
    finally:
        hang.mode = slow.mode = "ok"
        await close_all(col)


async def test_no_tcp_handshake_within_the_connect_timeout_is_unreachable():
    # A listener whose accept queue is full drops further SYNs: nobody answers, as with the
    # address of a container that was killed.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(c)
        await asyncio.sleep(0.05)
        client = ScrapeClient(timeout=5.0, max_bytes=1 << 20, connect_timeout=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectError, match=r"cannot connect: no answer within 0.2s") as info:
            await client.get(f"http://127.0.0.1:{port}/metrics")
        assert loop.time() - t0 < 4.0  # the connect timeout, not the whole GET's 5 s
        assert isinstance(info.value, EndpointUnreachable)
        client.close()
    finally:
        for c in fillers:
            c.close()
        srv.close()


async def test_an_unknown_host_is_unreachable_at_once(caplog):
    caplog.set_level(logging.WARNING, logger="epp.datalayer.collector")
    pool = pool_of(EndpointMetadata("no-such-model-server.invalid", 8000))
    col = Collector(pool, scrape_wiring(), interval=INTERVAL, timeout=2.0, unreachable_after=60)
    await col.start()
    try:
        ep = pool.endpoints()[0]
        await wait_until(lambda: not ep.reachable, what="unreachable", timeout=10)
        assert ep.failures == 1
        assert "nobody answers" in caplog.text and "no-such-model-server.invalid" in caplog.text
    finally:
        await close_all(col)


async def test_a_good_scrape_ends_a_request_path_exclusion_that_began_before_it(servers):
    srv = await servers()
    pool = pool_of(meta(srv))
    col = Collector(pool, scrape_wiring(), interval=INTERVAL)
    await col.start()
    try:
        ep = pool.endpoints()[0]
        await wait_until(lambda: ep.last_scrape_ok > 0, what="scraped")
        errors = counter(POLL_ERRORS, source_type="prometheus-data-source")
        assert pool.exclude(ep, "test")
        excluded_at = ep.excluded_at
        assert pool.schedulable() == (ep,)  # the only endpoint: excluded, yet never "nothing"
        await wait_until(lambda: ep.excluded_at == 0.0, what="readmitted by the next scrape")
        assert ep.last_scrape_ok >= excluded_at and ep.reachable
        assert counter(POLL_ERRORS, source_type="prometheus-data-source") == errors
    finally:
        await close_all(col)


# -- the pool, on a controlled clock -------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(pool_module, "now", c)
    return c


def three() -> tuple:
    pool = pool_of(*(EndpointMetadata("10.0.0.1", p) for p in (1, 2, 3)))
    return (pool, *pool.endpoints())


def test_tiers_prefer_current_data_then_reachable_then_everything(clock: Clock):
    pool, a, b, c = three()
    assert pool.schedulable() == (a, b, c)
    pool.set_failures(a, 1)
    assert pool.schedulable() == (b, c)
    pool.set_reachable(b, False)
    assert pool.schedulable() == (c,)
    pool.set_failures(c, 2)  # nobody has current data: reachable ones still beat unreachable ones
    assert pool.schedulable() == (a, c)
    pool.exclude(a, "test")
    assert pool.schedulable() == (c,)
    pool.set_reachable(c, False)
    assert pool.schedulable() == (a, b, c)  # never schedule into nothing


def test_a_request_path_exclusion_ends_with_a_scrape_started_after_it(clock: Clock):
    pool, a, b, c = three()
    assert pool.exclude(a, "refused") and not pool.exclude(a, "again")
    assert pool.schedulable() == (b, c)
    pool.scrape_succeeded(a, started=clock.t - 0.01)  # began before the failure: proves nothing
    assert pool.schedulable() == (b, c)
    clock.t += 0.05
    pool.scrape_succeeded(a, started=clock.t - 0.01)
    assert pool.schedulable() == (a, b, c) and a.excluded_at == 0.0


def test_repeated_exclusions_hold_longer_until_a_response_succeeds(clock: Clock):
    pool, a, b, c = three()
    holds = []
    for _ in range(4):
        pool.exclude(a, "refused")
        holds.append(round(a.excluded_until - a.excluded_at, 3))
        clock.t += 0.001
        pool.scrape_succeeded(a, started=clock.t)
        if a.excluded_at:  # still held: the scrape alone does not bring it back
            clock.t = a.excluded_until
            pool.scrape_succeeded(a, started=clock.t)
        assert not a.excluded_at
    assert holds == [0.0, HOLD_BASE, 2 * HOLD_BASE, 4 * HOLD_BASE]
    pool.response_succeeded(a)
    pool.exclude(a, "refused")
    assert a.excluded_until == a.excluded_at  # a served request starts the count over


def test_without_any_scrape_an_exclusion_lapses(clock: Clock):
    pool, a, b, c = three()
    pool.exclude(a, "refused")
    clock.t += LINGER - 0.1
    assert a not in pool.schedulable()
    clock.t += 0.2
    assert pool.schedulable() == (a, b, c)


def test_exclusion_of_an_endpoint_no_longer_in_the_pool_is_ignored(clock: Clock):
    pool, a, b, c = three()
    pool.remove(a.key)
    assert not pool.exclude(a, "refused")
    assert pool.schedulable() == (b, c)
