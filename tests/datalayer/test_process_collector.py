"""The collector in its own process: same results in the serving process's pool."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

import pytest
from dl_helpers import POLL_ERRORS, EngineState, counter, meta, plugin, pool_of, vllm_page, wait_until, wiring

from epp.datalayer import schedulable_endpoints
from epp.datalayer.collector import Collector
from epp.datalayer.payloads import ModelInfo
from epp.datalayer.process import CollectorProcessError, ProcessCollector, make_collector


async def test_process_collector_feeds_the_parent_pool(servers, caplog):
    caplog.set_level(logging.INFO)
    state = EngineState(waiting=6, running=2, kv_usage=0.5, running_adapters=("a1",), max_lora=2)
    good = await servers(vllm_page(state), models=[{"id": "base"}, {"id": "a1", "parent": "base"}])
    flaky = await servers()
    pool = pool_of(meta(good), meta(flaky))
    col = make_collector(
        "process", pool,
        [wiring(plugin("prometheus-data-source"), plugin("core-metrics-extractor"),
                plugin("prometheus-metric", {"metricName": "vllm:num_preemptions_total", "key": "preempt"})),
         wiring(plugin("models-data-source"), plugin("models-data-extractor"))],
        interval=0.02, timeout=0.3, unreachable_after=0.2,
    )
    assert isinstance(col, ProcessCollector)
    await col.start()
    try:
        assert col.child_pid not in (None, os.getpid())
        with open(f"/proc/{col.child_pid}/stat") as f:
            child_nice = int(f.read().rsplit(")", 1)[1].split()[16])
        assert child_nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)  # the request path wins CPU
        ep, ep_flaky = pool.get(meta(good).key), pool.get(meta(flaky).key)
        await wait_until(lambda: ep.metrics.update_time > 0 and ep.get_attribute("/v1/models") is not None,
                         timeout=20, what="data from the child")
        m = ep.metrics
        assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (6, 2, 0.5)
        assert set(m.active_models) == {"a1"} and m.max_active_models == 2
        assert "preempt" in m.custom and m.custom_time["preempt"] > 0
        assert ep.get_attribute("/v1/models") == (ModelInfo("base"), ModelInfo("a1", "base"))

        # an exclusion made here (the request path) ends with the child's next good scrape
        assert pool.exclude(ep, "test")
        excluded_at = ep.excluded_at
        await wait_until(lambda: ep.excluded_at == 0.0, what="readmitted by a scrape in the child")
        assert ep.last_scrape_ok >= excluded_at

        # health, counters and logs cross the process boundary
        errors = counter(POLL_ERRORS, source_type="prometheus-data-source")
        flaky.mode = "status"
        await wait_until(lambda: not ep_flaky.reachable, what="unreachable via the child")
        assert schedulable_endpoints(pool) == (ep,)
        assert counter(POLL_ERRORS, source_type="prometheus-data-source") > errors
        assert counter("epp_endpoint_reachable", name="test-pool", endpoint=ep_flaky.metadata.name) == 0
        assert any("marked unreachable" in r.getMessage() and r.name == "epp.datalayer.collector"
                   for r in caplog.records)
        flaky.mode = "ok"
        await wait_until(lambda: ep_flaky.reachable, what="reachable again")

        # removal stops scraping in the child
        pool.remove(ep_flaky.key)
        await asyncio.sleep(0.1)
        hits = flaky.hits["/metrics"]
        await asyncio.sleep(0.15)
        assert flaky.hits["/metrics"] == hits
    finally:
        await col.stop()
    # one GET per tick, counted by the child and reported to the parent
    assert good.hits["/metrics"] - col.ticks[ep.key] in (0, 1)


async def test_child_crash_is_restarted_and_resumes_health(servers, caplog):
    srv, down = await servers(), await servers()
    pool = pool_of(meta(srv), meta(down))
    col = ProcessCollector(pool, [wiring(plugin("prometheus-data-source"), plugin("core-metrics-extractor"))],
                           interval=0.02, timeout=0.2, unreachable_after=0.3, restart_delay=0.1)
    await col.start()
    try:
        ep, ep_down = pool.get(meta(srv).key), pool.get(meta(down).key)
        await wait_until(lambda: ep.metrics.update_time > 0, timeout=20, what="first data")
        down.mode = "status"
        await wait_until(lambda: not ep_down.reachable, what="unreachable")
        first = col.child_pid
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: col.restarts == 1 and col.child_pid != first, timeout=20, what="restart")
        t = ep.metrics.update_time
        await wait_until(lambda: ep.metrics.update_time > t, timeout=20, what="fresh data after restart")
        ticks = col.ticks.get(ep_down.key, 0)
        await wait_until(lambda: col.ticks.get(ep_down.key, 0) >= ticks + 3, what="ticks of the new child")
        assert not ep_down.reachable  # the new child did not start over with "reachable"
        assert any("exited unexpectedly" in r.getMessage() for r in caplog.records)
    finally:
        down.mode = "ok"
        await col.stop()


async def test_unpicklable_plugins_are_refused_with_a_clear_error(servers):
    srv = await servers()
    ex = plugin("core-metrics-extractor")
    ex.lock = threading.Lock()  # e.g. a third-party extractor holding a lock
    col = ProcessCollector(pool_of(meta(srv)), [wiring(plugin("prometheus-data-source"), ex)])
    with pytest.raises(CollectorProcessError, match="use the in-process collector mode"):
        await col.start()


def test_make_collector_modes():
    pool = pool_of()
    assert isinstance(make_collector("inprocess", pool, [], interval=0.1, flush_interval=0.01), Collector)
    with pytest.raises(ValueError, match="unknown collector mode 'thread'"):
        make_collector("thread", pool, [])
