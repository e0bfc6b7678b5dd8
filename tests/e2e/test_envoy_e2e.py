"""Client -> real Envoy (both configs) -> real EPP process -> real HTTP backends.

One EPP (the upstream conformance config: header-based-testing-filter + max-score-picker),
three backends that report who served each request, and an Envoy per config, all started
once for the module.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time

import aiohttp
import pytest

from epp.bench.procs import free_port

pytestmark = pytest.mark.envoy

CONFORMANCE_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: max-score-picker
"""
SELECT = "test-epp-endpoint-selection"
CONFIGS = ("envoy.yaml", "envoy-buffered.yaml")


@pytest.fixture(scope="module")
def epp(epp_launcher, backends):
    return epp_launcher(backends.addresses, config_text=CONFORMANCE_CONFIG, extra=["--enable-debug-headers"])


@pytest.fixture(scope="module")
def envoys(envoy_launcher, epp, backends):
    return {name: envoy_launcher(name, epp_port=epp.grpc_port, fallback_endpoints=backends.addresses)
            for name in CONFIGS}


def body(**kw) -> bytes:
    return json.dumps({"model": "m1", "prompt": "hello", **kw}).encode()


async def post(session: aiohttp.ClientSession, url: str, data: bytes, headers: dict | None = None):
    async with session.post(url + "/v1/completions", data=data,
                            headers={"content-type": "application/json", **(headers or {})}) as r:
        return r.status, await r.read(), r.headers


@pytest.mark.parametrize("config", CONFIGS)
async def test_conformance_requests_land_on_the_named_backends(envoys, backends, config):
    url = envoys[config].url
    rng = random.Random(5)
    sem = asyncio.Semaphore(10)

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[set[str], str, int]:
        named = rng.sample(backends.addresses, 1 + i % 3)
        async with sem:
            status, raw, _ = await post(session, url, body(), {SELECT: ",".join(named)})
        return set(named), json.loads(raw)["served_by"] if status == 200 else "", status

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session, i) for i in range(100)))
    assert [s for _, _, s in results] == [200] * 100
    for named, served, _ in results:
        assert served in {backends.name_of(a) for a in named}


@pytest.mark.parametrize("config", CONFIGS)
async def test_backend_receives_the_picked_destination_and_the_client_value_is_ignored(envoys, backends, config):
    target, spoofed = backends.addresses[0], backends.addresses[2]
    async with aiohttp.ClientSession() as session:
        status, raw, headers = await post(session, envoys[config].url, body(),
                                          {SELECT: target, "x-gateway-destination-endpoint": spoofed})
    doc = json.loads(raw)
    assert status == 200 and doc["served_by"] == backends.name_of(target)
    assert doc["recv_destination"] == target


@pytest.mark.parametrize("config", CONFIGS)
async def test_control_headers_do_not_reach_the_model_server(envoys, backends, config):
    control = {"x-llm-d-inference-objective": "chat", "x-gateway-inference-objective": "chat",
               "x-llm-d-inference-fairness-id": "tenant", "x-gateway-inference-fairness-id": "tenant",
               "x-llm-d-slo-ttft-ms": "100", "x-slo-tpot-ms": "10"}
    async with aiohttp.ClientSession() as session:
        status, raw, _ = await post(session, envoys[config].url, body(),
                                    {SELECT: backends.addresses[0], "x-other": "kept", **control})
    received = json.loads(raw)["recv_headers"]
    assert status == 200 and received["x-other"] == "kept"
    assert not set(received) & set(control)


@pytest.mark.parametrize("config", CONFIGS)
async def test_sse_events_arrive_incrementally(envoys, backends, config):
    n, delay = 5, 0.25
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(envoys[config].url + "/v1/completions",
                                data=body(stream=True, max_tokens=n, delay=delay),
                                headers={"content-type": "application/json", SELECT: backends.addresses[1]}) as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = []
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
                    arrivals.append(time.monotonic())
    assert events[-1] == b"[DONE]"
    tokens = [json.loads(e) for e in events[:n]]
    assert [t["choices"][0]["text"] for t in tokens] == [f"tok{i} " for i in range(n)]
    assert all(t["served_by"] == "be2" for t in tokens)
    # Sent (n-1)*delay = 1 s apart end to end: buffering would deliver them together at the end.
    assert arrivals[n - 1] - arrivals[0] > (n - 1) * delay * 0.6


@pytest.mark.parametrize("config", CONFIGS)
async def test_5mb_body_arrives_byte_identical(envoys, backends, config):
    data = body(prompt=os.urandom(1_900_000).hex()[: 5 * 1024 * 1024])
    assert len(data) > 3_800_000
    async with aiohttp.ClientSession() as session:
        status, raw, _ = await post(session, envoys[config].url, data, {SELECT: backends.addresses[0]})
    doc = json.loads(raw)
    assert status == 200
    assert doc["recv_bytes"] == len(data) and doc["recv_sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("config", CONFIGS)
async def test_bad_json_gets_400_with_upstream_body(envoys, config):
    async with aiohttp.ClientSession() as session:
        status, raw, _ = await post(session, envoys[config].url, b"{this is not json")
        assert status == 400
        assert raw.startswith(b"inference error: BadRequest - ")
        status, raw, _ = await post(session, envoys[config].url, b'{"prompt": "hi"}')
        assert (status, raw) == (400, b"inference error: BadRequest - model not found in request body")


@pytest.mark.parametrize("config", CONFIGS)
async def test_scheduling_failure_gets_429(envoys, config):
    async with aiohttp.ClientSession() as session:
        status, raw, _ = await post(session, envoys[config].url, body(), {SELECT: "127.0.0.9:1"})
    assert status == 429 and raw.startswith(b"inference error: ResourceExhausted - failed to find target endpoint")


@pytest.mark.parametrize("config", CONFIGS)
async def test_debug_header_explains_the_pick(envoys, backends, config):
    async with aiohttp.ClientSession() as session:
        status, raw, headers = await post(session, envoys[config].url, body(),
                                          {SELECT: backends.addresses[2], "x-epp-debug": "1"})
    assert status == 200
    assert headers["x-epp-decision"].startswith(f"pick={backends.addresses[2]}; candidates=3")


@pytest.mark.parametrize("config", CONFIGS)
async def test_get_request_without_body_is_routed(envoys, backends, config):
    async with aiohttp.ClientSession() as session:
        async with session.get(envoys[config].url + "/v1/models") as r:
            assert r.status == 200
            assert (await r.json())["served_by"] in backends.names


def test_decisions_metrics_and_in_flight_settle(epp, envoys):
    decisions = epp.get_json("/debug/decisions?n=5")["decisions"]
    assert len(decisions) == 5 and all(d["pick"] for d in decisions)
    assert decisions[0]["profiles"]["default"]["targets"] == [decisions[0]["pick"]]
    text = epp.metrics_text()
    assert 'inference_objective_request_total{model_name="m1",priority="0",target_model_name="m1"}' in text
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        running = [line for line in epp.metrics_text().splitlines()
                   if line.startswith('inference_objective_running_requests{model_name="m1"}')]
        if running and float(running[0].split()[-1]) == 0.0:
            break
        time.sleep(0.1)
    assert running and float(running[0].split()[-1]) == 0.0


def test_no_endpoints_gets_503(epp_launcher, envoy_launcher, tmp_path):
    empty = tmp_path / "endpoints.yaml"
    empty.write_text("endpoints: []\n")
    lonely = epp_launcher([], config_text=CONFORMANCE_CONFIG, extra=["--endpoints-file", str(empty)])
    envoy = envoy_launcher("envoy.yaml", epp_port=lonely.grpc_port)

    async def go():
        async with aiohttp.ClientSession() as session:
            return await post(session, envoy.url, body())

    status, raw, _ = asyncio.run(go())
    assert status == 503
    assert raw == b"inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request"


def test_envoy_templates_validate(backends):
    from epp.envoyconfig import render_envoy_config, validate

    for name in CONFIGS + ("envoy-direct.yaml",):
        for tls in (False, True) if name != "envoy-direct.yaml" else (False,):
            text = render_envoy_config(name, listen_port=free_port(), admin_port=free_port(), epp_port=9002,
                                       fallback_endpoints=backends.addresses, epp_tls=tls)
            ok, out = validate(text)
            assert ok, f"{name} (tls={tls}): {out}"


def _running(epp, model: str = "m-disconnect") -> float:
    for line in epp.metrics_text().splitlines():
        if line.startswith(f'inference_objective_running_requests{{model_name="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("config", CONFIGS)
async def test_client_disconnect_mid_stream_returns_in_flight_to_zero(envoys, epp, backends, config):
    payload = json.dumps({"model": "m-disconnect", "prompt": "hi", "stream": True, "max_tokens": 40,
                          "delay": 0.1}).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(envoys[config].url + "/v1/completions", data=payload,
                                headers={"content-type": "application/json", SELECT: backends.addresses[0]}) as r:
            assert r.status == 200
            await r.content.readline()  # the first event arrived: the request is in flight
            assert _running(epp) == 1.0
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(epp) != 0.0:
        await asyncio.sleep(0.1)
    assert _running(epp) == 0.0
