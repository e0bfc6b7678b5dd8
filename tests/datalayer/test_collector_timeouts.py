"""Who enforces the collector's per-poll timeout: the source itself, or the collector's timer.

HTTP sources take the collector's deadline (``limit_timeout``) and time out inside their
client; any other source is bounded by the collector's own ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import logging

from dl_helpers import POLL_ERRORS, close_all, counter, meta, plugin, pool_of, wait_until, wiring

from epp.datalayer.collector import Collector
from epp.datalayer.endpoint import EndpointMetadata
from epp.framework.datalayer import DataSource


class HangingSource(DataSource):
    """A non-HTTP source that never answers and has no timeout of its own."""

    plugin_type = "hanging-test-source"

    async def collect(self, endpoint: EndpointMetadata) -> object:
        await asyncio.sleep(3600)


async def test_a_source_without_its_own_deadline_gets_the_collector_timer(caplog):
    caplog.set_level(logging.DEBUG, logger="epp.datalayer.collector")
    pool = pool_of(EndpointMetadata("127.0.0.1", 9))
    col = Collector(pool, [wiring(HangingSource("hang"), plugin("core-metrics-extractor"))],
                    interval=0.02, timeout=0.1)
    errors = counter(POLL_ERRORS, source_type="hanging-test-source")
    await col.start()
    try:
        await wait_until(lambda: counter(POLL_ERRORS, source_type="hanging-test-source") >= errors + 2,
                         what="two timed-out polls")
        assert "data source hang failed for endpoint 127.0.0.1:9: timed out after 0.1s" in caplog.text
    finally:
        await close_all(col)


async def test_an_http_source_takes_the_tighter_collector_deadline(servers, caplog):
    caplog.set_level(logging.DEBUG, logger="epp.datalayer.collector")
    srv = await servers()
    srv.mode = "hang"
    source = plugin("prometheus-data-source", {"timeout": "30s"})
    col = Collector(pool_of(meta(srv)), [wiring(source, plugin("core-metrics-extractor"))],
                    interval=0.02, timeout=0.15)
    await col.start()
    try:
        await wait_until(lambda: "timed out" in caplog.text, what="a timeout")  # long before the source's 30 s
        assert f"GET http://{srv.address}/metrics: timed out after 0.15s" in caplog.text
    finally:
        srv.mode = "ok"
        await close_all(col)


def test_http_sources_that_override_collect_keep_the_collector_timer():
    assert plugin("prometheus-data-source").limit_timeout(0.5) is True
    assert plugin("models-data-source").limit_timeout(0.5) is False  # its collect() is its own
