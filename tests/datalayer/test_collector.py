"""The collector and the built-in plugins against real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
from dl_helpers import (
    EXTRACT_ERRORS,
    POLL_ERRORS,
    EngineState,
    close_all,
    counter,
    meta,
    plugin,
    pool_of,
    sglang_page,
    vllm_page,
    wait_until,
    wiring,
)

from epp.datalayer import schedulable_endpoints
from epp.datalayer.collector import Collector
from epp.datalayer.endpoint import now
from epp.datalayer.payloads import ModelInfo

INTERVAL = 0.02


def _core_and_custom():
    return (
        plugin("core-metrics-extractor"),
        plugin("prometheus-metric", {"metricName": "vllm:prefix_cache_hits_total", "key": "hits"}),
        plugin("prometheus-metric", {"metricName": "vllm:e2e_request_latency_seconds_count", "key": "e2e_count"}),
        plugin("prometheus-metric", {"metricName": "vllm:cache_config_info", "label": "num_gpu_blocks",
                                     "key": "gpu_blocks"}),
        plugin("prometheus-metric", {"metricName": 'vllm:request_success_total{finished_reason=~"stop|length"}',
                                     "aggregate": "sum", "key": "ok_requests"}),
    )


async def test_vllm_page_values_land_in_fields_and_custom(servers):
    state = EngineState(waiting=5, running=11, kv_usage=0.73, running_adapters=("sql-lora", "chat-lora"),
                        waiting_adapters=("math-lora",), max_lora=3, block_size=32, num_gpu_blocks=4096)
    srv = await servers(vllm_page(state))
    pool = pool_of(meta(srv))
    source = plugin("prometheus-data-source")
    col = Collector(pool, [wiring(source, *_core_and_custom())], interval=INTERVAL)
    await col.start()
    try:
        ep = pool.endpoints()[0]
        await wait_until(lambda: ep.metrics.update_time > 0 and "ok_requests" in ep.metrics.custom, what="metrics")
        m = ep.metrics
        assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (5, 11, 0.73)
        assert set(m.active_models) == {"sql-lora", "chat-lora"}  # the newest lora_requests_info series
        assert set(m.waiting_models) == {"math-lora"}
        assert m.max_active_models == 3
        assert (m.cache_block_size, m.cache_num_blocks) == (32, 4096)
        assert m.custom["gpu_blocks"] == 4096.0
        assert m.custom["e2e_count"] == float(state.observations)
        assert m.custom["hits"] > 0
        assert m.custom_time["hits"] > 0
        # only the families the extractors asked for were parsed
        assert source.wanted is not None and "vllm:e2e_request_latency_seconds_count" in source.wanted
        assert "vllm:time_to_first_token_seconds" not in source.wanted
    finally:
        await close_all(col)


async def test_sglang_endpoint_is_read_with_the_sglang_table(servers):
    srv = await servers(sglang_page(EngineState(waiting=2, running=9, kv_usage=0.31, block_size=1, num_gpu_blocks=900,
                                                model="qwen")))
    pool = pool_of(meta(srv, labels={"llm-d.ai/engine-type": "sglang"}))
    col = Collector(pool, [wiring(plugin("metrics-data-source"), plugin("core-metrics-extractor"))], interval=INTERVAL)
    await col.start()
    try:
        ep = pool.endpoints()[0]
        await wait_until(lambda: ep.metrics.update_time > 0, what="sglang metrics")
        m = ep.metrics
        assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (2, 9, 0.31)
        assert (m.cache_block_size, m.cache_num_blocks) == (1, 900)
        assert m.active_models == {} and m.max_active_models == 0  # no LoRA on SGLang: not an error
    finally:
        await close_all(col)


async def test_one_fetch_per_tick_whatever_the_number_of_extractors(servers):
    srv = await servers()
    pool = pool_of(meta(srv))
    col = Collector(pool, [wiring(plugin("prometheus-data-source"), *_core_and_custom())], interval=INTERVAL)
    await col.start()
    key = pool.endpoints()[0].key
    await wait_until(lambda: col.ticks[key] >= 15, what="15 ticks")
    await col.stop()
    ticks = col.ticks[key]
    await close_all(col)
    await asyncio.sleep(0.1)  # a tick stopped mid-flight has its request on the wire already
    assert srv.hits["/metrics"] == ticks  # 5 extractors, one GET per tick


async def test_staleness_after_server_stops_then_recovery(servers, caplog):
    caplog.set_level(logging.INFO, logger="epp.datalayer.collector")
    srv = await servers(vllm_page(EngineState(waiting=4)))
    pool = pool_of(meta(srv))
    # a time rule far beyond the test: "connection refused" alone must take it out
    col = Collector(pool, [wiring(plugin("prometheus-data-source"), plugin("core-metrics-extractor"))],
                    interval=INTERVAL, timeout=0.5, unreachable_after=60)
    await col.start()
    try:
        ep = pool.endpoints()[0]
        await wait_until(lambda: ep.metrics.update_time > 0, what="first scrape")
        errors_before = counter(POLL_ERRORS, source_type="prometheus-data-source")
        port = srv.port
        await srv.stop()
        await wait_until(lambda: not ep.reachable, what="unreachable")
        assert ep.failures == 1  # out on the first refused connection
        frozen = ep.metrics.update_time
        await asyncio.sleep(5 * INTERVAL)
        assert ep.metrics.update_time == frozen  # stale, not refreshed, not deleted
        assert ep.metrics.waiting_queue_size == 4
        assert ep.metrics.age() >= 5 * INTERVAL
        assert counter(POLL_ERRORS, source_type="prometheus-data-source") > errors_before
        assert counter("epp_endpoint_reachable", name="test-pool", endpoint=ep.metadata.name) == 0
        assert any("marked unreachable: nobody answers" in r.getMessage() and "ConnectionRefusedError" in r.getMessage()
                   for r in caplog.records)

        srv.page = vllm_page(EngineState(waiting=8))
        await srv.start(port)
        await wait_until(lambda: ep.reachable and ep.metrics.waiting_queue_size == 8, what="recovery")
        assert ep.metrics.update_time > frozen
        assert counter("epp_endpoint_reachable", name="test-pool", endpoint=ep.metadata.name) == 1
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        await close_all(col)


async def test_unreachable_endpoints_leave_the_schedulable_set_but_never_all(servers):
    a, b = await servers(), await servers()
    pool = pool_of(meta(a), meta(b))
    col = Collector(pool, [wiring(plugin("prometheus-data-source"), plugin("core-metrics-extractor"))],
                    interval=INTERVAL, timeout=0.3, unreachable_after=0.2)
    await col.start()
    try:
        ep_a, ep_b = pool.get(meta(a).key), pool.get(meta(b).key)
        await wait_until(lambda: ep_a.metrics.update_time > 0 and ep_b.metrics.update_time > 0, what="both scraped")
        assert set(schedulable_endpoints(pool)) == {ep_a, ep_b}
        a.mode = "status"
        await wait_until(lambda: not ep_a.reachable, what="a unreachable")
        assert schedulable_endpoints(pool) == (ep_b,)
        b.mode = "hang"
        await wait_until(lambda: not ep_b.reachable, what="b unreachable")
        assert set(schedulable_endpoints(pool)) == {ep_a, ep_b}  # all down: keep all rather than none
        a.mode = "ok"
        await wait_until(lambda: ep_a.reachable, what="a back")
        assert schedulable_endpoints(pool) == (ep_a,)
    finally:
        b.mode = "ok"
        await close_all(col)


async def test_bad_pages_are_errors_for_that_endpoint_only(servers, caplog):
    caplog.set_level(logging.DEBUG, logger="epp.datalayer.collector")
    good = await servers(vllm_page(EngineState(waiting=1)))
    html = await servers(b"<html><body>502 Bad Gateway</body></html>")
    nan = await servers(vllm_page(EngineState(waiting=2, kv_usage=math.nan)))
    wrong_type = await servers(b"# TYPE vllm:num_requests_waiting histogram\n"
                               b'vllm:num_requests_waiting_bucket{le="+Inf"} 3\n'
                               b"vllm:num_requests_waiting_sum 3\nvllm:num_requests_waiting_count 3\n"
                               b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 6\n"
                               b"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.5\n")
    huge = await servers(vllm_page() * 3)
    hang = await servers()
    hang.mode = "hang"
    cut = await servers()
    cut.mode = "cut"
    source = plugin("prometheus-data-source", {"maxBytes": 100_000})
    pool = pool_of(*(meta(s) for s in (good, html, nan, wrong_type, huge, hang, cut)))
    col = Collector(pool, [wiring(source, plugin("core-metrics-extractor"))], interval=INTERVAL, timeout=0.2)
    poll0 = counter(POLL_ERRORS, source_type="prometheus-data-source")
    extract0 = counter(EXTRACT_ERRORS, source_type="prometheus-data-source", extractor_type="core-metrics-extractor")
    await col.start()
    try:
        ep = {s: pool.get(meta(s).key) for s in (good, html, nan, wrong_type, huge, hang, cut)}
        await wait_until(lambda: col.ticks[meta(hang).key] >= 2 and col.ticks[meta(good).key] >= 20, what="ticks")
        # the healthy endpoint is unaffected: it kept its full tick rate despite a hanging neighbour
        assert ep[good].metrics.waiting_queue_size == 1
        for bad in (html, huge, hang, cut):
            assert ep[bad].metrics.update_time == 0.0, bad.page[:40]
        # a NaN KV usage loses that field only; the rest is read and fresh
        assert ep[nan].metrics.waiting_queue_size == 2 and ep[nan].metrics.kv_cache_usage == 0.0
        assert ep[nan].metrics.update_time > 0
        # a histogram where a gauge is expected is an error for that field only
        assert ep[wrong_type].metrics.running_requests == 6 and ep[wrong_type].metrics.waiting_queue_size == 0
        assert counter(POLL_ERRORS, source_type="prometheus-data-source") - poll0 >= 8
        assert counter(EXTRACT_ERRORS, source_type="prometheus-data-source",
                       extractor_type="core-metrics-extractor") - extract0 >= 4
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "not Prometheus text format" in text
        assert "exceeds the 100000-byte limit" in text
        assert "timed out after 0.2s" in text
        assert "kv_cache_usage: vllm:kv_cache_usage_perc is nan" in text
        assert "vllm:num_requests_waiting is a histogram" in text
        assert f"GET http://{cut.address}/metrics: connection closed after" in text  # cut mid-body
    finally:
        hang.mode = "ok"
        await close_all(col)


async def test_endpoint_removed_mid_scrape_stops_its_loop(servers):
    slow = await servers()
    slow.mode = "hang"
    fine = await servers()
    pool = pool_of(meta(slow), meta(fine))
    col = Collector(pool, [wiring(plugin("prometheus-data-source"), plugin("core-metrics-extractor"))],
                    interval=INTERVAL, timeout=5.0)
    await col.start()
    try:
        await wait_until(lambda: slow.hits["/metrics"] >= 1, what="scrape in flight")
        pool.remove(meta(slow).key)  # vanishes while its scrape hangs
        assert col.endpoints == [meta(fine).key]
        ep = pool.get(meta(fine).key)
        await wait_until(lambda: ep.metrics.update_time > 0, what="other endpoint scraped")
        hits = slow.hits["/metrics"]
        await asyncio.sleep(5 * INTERVAL)
        assert slow.hits["/metrics"] == hits
        pool.upsert(meta(slow))  # and comes back: a fresh loop
        assert set(col.endpoints) == {meta(fine).key, meta(slow).key}
    finally:
        slow.mode = "ok"
        await close_all(col)


async def test_models_source_and_extractor(servers):
    srv = await servers(models=[{"id": "meta-llama/Llama-3.1-8B-Instruct", "parent": None},
                                {"id": "sql-lora", "parent": "meta-llama/Llama-3.1-8B-Instruct"}])
    pool = pool_of(meta(srv))
    col = Collector(pool, [
        wiring(plugin("prometheus-data-source"), plugin("core-metrics-extractor")),
        wiring(plugin("models-data-source"), plugin("models-data-extractor")),
    ], interval=INTERVAL)
    await col.start()
    try:
        ep = pool.endpoints()[0]
        await wait_until(lambda: ep.get_attribute("/v1/models") is not None, what="models")
        assert ep.get_attribute("/v1/models") == (ModelInfo("meta-llama/Llama-3.1-8B-Instruct", None),
                                                  ModelInfo("sql-lora", "meta-llama/Llama-3.1-8B-Instruct"))
        attrs = ep.attributes
        await asyncio.sleep(4 * INTERVAL)
        assert ep.attributes is attrs  # unchanged list: no swap
        srv.models = [{"id": "other"}]
        await wait_until(lambda: ep.get_attribute("/v1/models") == (ModelInfo("other"),), what="new list")
        # a failing second source does not make the endpoint unreachable while /metrics works
        assert ep.reachable
    finally:
        await close_all(col)


async def test_file_source_is_a_non_http_source(tmp_path):
    (tmp_path / "ep-a.prom").write_bytes(vllm_page(EngineState(waiting=7, running=3, kv_usage=0.25)))
    pool = pool_of(meta(type("S", (), {"port": 9001})(), name="ep-a"))
    source = plugin("file-data-source", {"path": str(tmp_path / "{name}.prom")})
    col = Collector(pool, [wiring(source, plugin("core-metrics-extractor"))], interval=INTERVAL)
    await col.start()
    try:
        ep = pool.endpoints()[0]
        await wait_until(lambda: ep.metrics.update_time > 0, what="file read")
        assert (ep.metrics.waiting_queue_size, ep.metrics.running_requests, ep.metrics.kv_cache_usage) == (7, 3, 0.25)
        (tmp_path / "ep-a.prom").unlink()
        before = counter(POLL_ERRORS, source_type="file-data-source")
        await wait_until(lambda: counter(POLL_ERRORS, source_type="file-data-source") > before, what="missing file")
    finally:
        await close_all(col)


def test_file_source_output_type_follows_format():
    from epp.datalayer.payloads import JSONDocument, PrometheusFamilies, RawBytes

    assert plugin("file-data-source", {"path": "/x/{address}", "format": "raw"}).output_type is RawBytes
    assert plugin("file-data-source", {"path": "/x", "format": "json"}).output_type is JSONDocument
    assert plugin("file-data-source", {"path": "/x"}).output_type is PrometheusFamilies
    with pytest.raises(ValueError, match="unknown field"):
        plugin("file-data-source", {"path": "/x/{pod}"})


async def test_update_time_is_monotonic_and_recent(servers):
    srv = await servers()
    pool = pool_of(meta(srv))
    col = Collector(pool, [wiring(plugin("prometheus-data-source"), plugin("core-metrics-extractor"))],
                    interval=INTERVAL)
    await col.start()
    try:
        ep = pool.endpoints()[0]
        await wait_until(lambda: ep.metrics.update_time > 0, what="first scrape")
        seen = []
        for _ in range(10):
            seen.append(ep.metrics.update_time)
            await asyncio.sleep(INTERVAL)
        assert seen == sorted(seen) and seen[-1] > seen[0]
        assert seen[-1] <= now()
    finally:
        await close_all(col)


async def test_error_series_exist_at_zero_from_the_start():
    # So that rate() on them gives 0 rather than no data (the Grafana dashboard's error panels).
    class RecordingSink:
        def __init__(self):
            self.calls = []

        def poll_error(self, source_type, count=1):
            self.calls.append(("poll", source_type, count))

        def extract_error(self, source_type, extractor_type, count=1):
            self.calls.append(("extract", source_type, extractor_type, count))

        def reachability(self, endpoint, reachable):
            pass

        def forget(self, endpoint):
            pass

    sink = RecordingSink()
    source = plugin("prometheus-data-source")
    col = Collector(pool_of(), [wiring(source, *_core_and_custom()[:2])], interval=INTERVAL, sink=sink)
    await col.start()
    try:
        assert sink.calls == [("poll", "prometheus-data-source", 0),
                              ("extract", "prometheus-data-source", "core-metrics-extractor", 0),
                              ("extract", "prometheus-data-source", "prometheus-metric", 0)]
    finally:
        await close_all(col)
