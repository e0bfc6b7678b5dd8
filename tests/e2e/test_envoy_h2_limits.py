"""Envoy and the EPP's HTTP/2 stream limit: with SETTINGS_MAX_CONCURRENT_STREAMS 2, 12
concurrent requests (each holding its ext_proc stream for the whole streamed answer) all
succeed: Envoy keeps a connection that knows the limit within it and opens another one, whose
first burst (sent before Envoy has our SETTINGS, as the RFC allows) the EPP accepts up to
1000 streams instead of refusing it; Envoy does not retry a refused ext_proc stream."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import aiohttp
import pytest

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def stack(epp_launcher, envoy_launcher, backends):
    epp = epp_launcher(backends.addresses, extra=["--extproc-max-concurrent-streams", "2"])
    return envoy_launcher("envoy.yaml", epp_port=epp.grpc_port, fallback_endpoints=backends.addresses)


async def test_envoy_opens_connections_instead_of_exceeding_the_stream_limit(stack):
    body = json.dumps({"model": "m1", "prompt": "hi", "stream": True, "max_tokens": 8, "delay": 0.05}).encode()

    async def one(session: aiohttp.ClientSession) -> tuple[int, bytes]:
        async with session.post(stack.url + "/v1/completions", data=body,
                                headers={"content-type": "application/json"}) as r:
            return r.status, await r.read()

    async with aiohttp.ClientSession() as session:
        assert (await one(session))[0] == 200  # the connection is up and Envoy has our SETTINGS
        results = await asyncio.gather(*(one(session) for _ in range(12)))
    assert [status for status, _ in results] == [200] * 12
    assert all(raw.count(b"data: ") >= 8 for _, raw in results)
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/stats?filter=ext_proc_epp.upstream_cx_total",
                                timeout=5) as r:
        connections = int(re.search(rb"upstream_cx_total: (\d+)", r.read()).group(1))
    assert connections >= 2  # one connection would have done without the limit
