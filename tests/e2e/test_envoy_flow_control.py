"""Flow control end to end: client -> real Envoy (full duplex) -> real EPP process -> a real
``epp sim`` server.

The EPP lets one request at a time reach the server (concurrency-detector, maxConcurrency 1),
so every other request waits in flow control, holding its ext_proc stream. Checked: queued
requests are released in policy order (FCFS, a higher band first); a TTL expiry is upstream's
429; a client that goes away leaves the queue at once; an empty pool ends in upstream's 503;
afterwards the queue and in-flight gauges are back at zero.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from epp.bench.stacks import start_sim_fleet

pytestmark = pytest.mark.envoy

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- {name: one-at-a-time, type: concurrency-detector, parameters: {maxConcurrency: 1}}
- type: max-score-picker
flowControl:
  saturationDetector: {pluginRef: one-at-a-time}
  noEndpointRequestTTL: 500ms
  priorityBands: [{priority: 10}]
inferenceObjectives: [{name: critical, priority: 10}]
"""
DROPPED = "x-llm-d-request-dropped-reason"


@pytest.fixture(scope="module")
def sim(procs):
    return start_sim_fleet(procs, 1, time_scale=1.0, name="flow-sim")


@pytest.fixture(scope="module")
def endpoints_file(tmp_path_factory, sim):
    path = tmp_path_factory.mktemp("flow") / "endpoints.yaml"
    host, port = sim.addresses[0].rsplit(":", 1)
    path.write_text(f"endpoints: [{{address: {host}, port: {port}}}]\n")
    return path


@pytest.fixture(scope="module")
def epp(epp_launcher, endpoints_file):
    return epp_launcher([], config_text=CONFIG, extra=["--endpoints-file", str(endpoints_file)])


@pytest.fixture(scope="module")
def envoy(envoy_launcher, epp):
    return envoy_launcher("envoy.yaml", epp_port=epp.grpc_port)


def completion(tag: str, tokens: int = 12) -> bytes:
    return json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": f"{tag}: say something",
                       "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}).encode()


async def post(session: aiohttp.ClientSession, url: str, data: bytes, headers: dict | None = None):
    async with session.post(url + "/v1/completions", data=data,
                            headers={"content-type": "application/json", **(headers or {})}) as r:
        return r.status, await r.read(), r.headers


def flow_state(epp) -> dict:
    return epp.get_json("/debug/flowcontrol")["state"]


async def until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()


def test_saturation_queues_then_releases_in_order(envoy, epp):
    async def go():
        done: list[str] = []
        async with aiohttp.ClientSession() as session:
            async def one(tag: str, headers: dict | None = None, tokens: int = 12):
                status, raw, hdrs = await post(session, envoy.url, completion(tag, tokens), headers)
                assert status == 200, raw
                done.append(tag)
                return hdrs

            # Holds the only slot for ~3 s: time enough to queue the others even on a busy machine.
            first = asyncio.create_task(one("first", tokens=200))
            assert await until(lambda: sum(flow_state(epp)["in_flight"].values()) == 1)
            low = []
            for i in range(3):
                low.append(asyncio.create_task(one(f"low{i}")))
                assert await until(lambda n=i + 1: flow_state(epp)["queued"] == n)
            high = asyncio.create_task(one("high", {"x-llm-d-inference-objective": "critical"}))
            assert await until(lambda: flow_state(epp)["queued"] == 4)
            state = flow_state(epp)
            assert [b["queued"] for b in state["bands"]] == [1, 3]  # priority 10, then 0
            headers = await asyncio.gather(first, *low, high)
        return done, headers

    done, headers = asyncio.run(go())
    assert done == ["first", "high", "low0", "low1", "low2"]
    queued_ms = [int(h["x-llm-d-flow-queue-duration-ms"]) for h in headers]
    assert queued_ms[0] < 100 and all(ms > 100 for ms in queued_ms[1:])


def test_ttl_expiry_is_upstreams_429(envoy, epp):
    async def go():
        async with aiohttp.ClientSession() as session:
            busy = asyncio.create_task(post(session, envoy.url, completion("busy", 100)))
            assert await until(lambda: sum(flow_state(epp)["in_flight"].values()) == 1)
            expired = await post(session, envoy.url, completion("impatient"), {"x-llm-d-inference-ttl": "200ms"})
            assert (await busy)[0] == 200
            return expired

    status, raw, headers = asyncio.run(go())
    assert status == 429 and headers[DROPPED] == "rejected-ttl-expired"
    assert raw == (b"inference error: ResourceExhausted - request timed out in queue: "
                   b"request evicted from queue: request TTL expired")


def test_a_client_that_goes_away_leaves_the_queue(envoy, epp):
    before = flow_state(epp)["outcomes"].get("EvictedContextCancelled", 0)

    async def go():
        async with aiohttp.ClientSession() as session:
            busy = asyncio.create_task(post(session, envoy.url, completion("busy", 100)))
            assert await until(lambda: sum(flow_state(epp)["in_flight"].values()) == 1)
            gone = asyncio.create_task(post(session, envoy.url, completion("gone")))
            assert await until(lambda: flow_state(epp)["queued"] == 1)
            gone.cancel()  # the client hangs up while queued
            left = await until(lambda: flow_state(epp)["queued"] == 0, timeout=5)
            assert flow_state(epp)["in_flight"] == {busy_target(epp): 1}  # still serving the other one
            assert (await busy)[0] == 200
            return left

    assert asyncio.run(go())
    assert flow_state(epp)["outcomes"]["EvictedContextCancelled"] == before + 1


def busy_target(epp) -> str:
    (key,) = flow_state(epp)["in_flight"]
    return key


def test_an_empty_pool_ends_in_503_no_endpoints(envoy, epp, endpoints_file):
    saved = endpoints_file.read_text()
    endpoints_file.write_text("endpoints: []\n")
    try:
        async def go():
            assert await until(lambda: not epp.get_json("/debug/endpoints")["endpoints"])
            async with aiohttp.ClientSession() as session:
                return await post(session, envoy.url, completion("nobody"))

        status, raw, headers = asyncio.run(go())
    finally:
        endpoints_file.write_text(saved)
    assert status == 503 and headers[DROPPED] == "rejected-no-endpoints"
    assert raw.startswith(b"inference error: ServiceUnavailable - request timed out in queue and no endpoints "
                          b"are available: ")
    asyncio.run(until(lambda: len(epp.get_json("/debug/endpoints")["endpoints"]) == 1))


def test_nothing_is_left_behind(epp):
    """Runs last: every request above ended; the queue and in-flight gauges are back at zero and
    every request that reached flow control has exactly one outcome."""
    state = flow_state(epp)
    assert state["queued"] == 0 and state["in_flight"] == {}
    text = epp.metrics_text()
    values = {}
    for line in text.splitlines():
        if line.startswith(("llm_d_epp_flow_control_queue_size", "inference_objective_running_requests")):
            name = line.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    assert values.get("llm_d_epp_flow_control_queue_size", 0.0) == 0.0
    assert values.get("inference_objective_running_requests", 0.0) == 0.0
    outcomes = state["outcomes"]
    assert outcomes["Dispatched"] >= 7 and outcomes["EvictedTTL"] == 1 and outcomes["EvictedNoEndpoints"] == 1
