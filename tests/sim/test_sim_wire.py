"""Wire compatibility: real clients (the openai SDK, aiohttp) against real sim servers."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.sim import FORCE_ERROR_HEADER, SERVER_HEADER, SimFleet

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def client(url: str, timeout: float = 30) -> openai.AsyncOpenAI:
    # max_retries=0: the SDK would otherwise retry the injected 5xx errors.
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


async def test_completion_non_streaming(fleet: SimFleet) -> None:
    async with client(fleet.urls[0]) as c:
        resp = await c.completions.create(model=MODEL, prompt="Hello there " * 20, max_tokens=7)
    assert resp.object == "text_completion"
    assert resp.model == MODEL
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.choices[0].text
    assert 1 <= resp.usage.completion_tokens <= 7
    assert resp.usage.prompt_tokens == 60
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens_details.cached_tokens == 0


async def test_chat_non_streaming_with_unknown_fields(fleet: SimFleet) -> None:
    async with client(fleet.urls[0]) as c:
        resp = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is a KV cache?"}],
            max_completion_tokens=5,
            # Fields routers inject; the server must ignore them.
            extra_body={"ignore_eos": True, "no_stop_trim": True, "separate_reasoning": False, "x_custom": [1]},
        )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5


async def test_chat_streaming_with_usage(fleet: SimFleet) -> None:
    async with client(fleet.urls[0]) as c:
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Stream please"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(content) == 6
    assert content[-1].choices[0].finish_reason == "length"
    usage = chunks[-1]
    assert usage.choices == []
    assert usage.usage.completion_tokens == 6
    assert usage.usage.prompt_tokens_details.cached_tokens == 0


async def test_completion_streaming_without_usage_ends_with_done(fleet: SimFleet) -> None:
    body = {"model": MODEL, "prompt": "abc " * 10, "max_tokens": 4, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as s, s.post(fleet.urls[0] + "/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        frames = [line.decode().strip() async for line in r.content if line.strip()]
    assert frames[-1] == "data: [DONE]"
    payloads = [json.loads(f[len("data: "):]) for f in frames[:-1]]
    assert len(payloads) == 4
    assert all(p["object"] == "text_completion" and "usage" not in p for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


async def test_multiple_prompts_and_n(fleet: SimFleet) -> None:
    async with client(fleet.urls[0]) as c:
        resp = await c.completions.create(model=MODEL, prompt=["one two", "three four five six"], n=2,
                                          max_tokens=3, extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in resp.choices) == [0, 1, 2, 3]
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens == 2 + 5  # each prompt counted once despite n=2


async def test_token_id_prompt_is_accepted(fleet: SimFleet) -> None:
    async with client(fleet.urls[0]) as c:
        resp = await c.completions.create(model=MODEL, prompt=[1, 2, 3, 4, 5], max_tokens=2)
    assert resp.usage.prompt_tokens == 5


async def test_models_lists_base_and_adapters(fleet: SimFleet) -> None:
    async with client(fleet.urls[0]) as c:
        models = {m.id: m for m in (await c.models.list()).data}
    assert set(models) == {MODEL, "adapter-a", "adapter-b"}
    assert models["adapter-a"].model_extra["parent"] == MODEL
    assert models[MODEL].model_extra["max_model_len"] == 8192


async def test_errors_use_the_openai_shape(fleet: SimFleet) -> None:
    async with client(fleet.urls[0]) as c:
        with pytest.raises(openai.NotFoundError) as not_found:
            await c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError) as too_long:
            await c.completions.create(model=MODEL, prompt="x" * 4000, max_tokens=8000)
    assert not_found.value.body["type"] == "NotFoundError"
    assert "no-such-model" in not_found.value.body["message"]
    assert too_long.value.status_code == 400
    assert "maximum context length is 8192" in too_long.value.body["message"]


async def test_bad_json_and_missing_fields_are_400(fleet: SimFleet) -> None:
    url = fleet.urls[0]
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", data=b"{not json") as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == 400
        async with s.post(url + "/v1/chat/completions", json={"model": MODEL}) as r:
            assert r.status == 400
        async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0}) as r:
            assert r.status == 400
        async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": ""}) as r:
            assert r.status == 400


async def test_served_by_header_names_the_server(fleet: SimFleet) -> None:
    seen = set()
    async with aiohttp.ClientSession() as s:
        for server in fleet.servers:
            for path in ("/health", "/v1/models", "/metrics"):
                async with s.get(server.url + path) as r:
                    assert r.headers[SERVER_HEADER] == server.name
                    assert r.headers["x-sim-address"] == f"127.0.0.1:{server.port}"
                    seen.add(r.headers[SERVER_HEADER])
    assert seen == {"sim-0", "sim-1"}
    async with client(fleet.urls[1]) as c:
        raw = await c.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=1)
    assert raw.headers[SERVER_HEADER] == "sim-1"


async def test_forced_error_header(fleet: SimFleet) -> None:
    async with client(fleet.urls[0]) as c:
        with pytest.raises(openai.InternalServerError) as err:
            await c.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                       extra_headers={FORCE_ERROR_HEADER: "503"})
        with pytest.raises(openai.RateLimitError):
            await c.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                       extra_headers={FORCE_ERROR_HEADER: "429"})
    assert err.value.status_code == 503


async def test_fail_rate_and_hang_rate(make_fleet) -> None:
    failing = await make_fleet(1, fail_rate=1.0)
    hanging = await make_fleet(1, hang_rate=1.0)
    async with client(failing.urls[0]) as c:
        with pytest.raises(openai.InternalServerError):
            await c.completions.create(model=MODEL, prompt="x", max_tokens=1)
    async with client(hanging.urls[0], timeout=0.5) as c:
        with pytest.raises(openai.APITimeoutError):
            await c.completions.create(model=MODEL, prompt="x", max_tokens=1)
    # Health stays up: failure injection only hits generation.
    async with aiohttp.ClientSession() as s, s.get(hanging.urls[0] + "/health") as r:
        assert r.status == 200


async def test_tokenize_and_render(fleet: SimFleet) -> None:
    url = fleet.urls[0]
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/tokenize", json={"model": MODEL, "prompt": "abcdefgh"}) as r:
            body = await r.json()
        assert body["count"] == 2 and len(body["tokens"]) == 2 and body["max_model_len"] == 8192
        async with s.post(url + "/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}) as r:
            assert (await r.json())["count"] > 5
        async with s.post(url + "/v1/completions/render", json={"model": MODEL, "prompt": "abcdefgh"}) as r:
            assert [reply["token_ids"] for reply in await r.json()] == [body["tokens"]]


async def test_lora_load_and_unload(fleet: SimFleet) -> None:
    url = fleet.urls[0]
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/p/new"}) as r:
            assert r.status == 200
            assert "added successfully" in await r.text()
        async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/p/new"}) as r:
            assert r.status == 400
        async with client(url) as c:
            resp = await c.completions.create(model="new", prompt="hi", max_tokens=1)
            assert resp.model == "new"
            ids = [m.id for m in (await c.models.list()).data]
            assert "new" in ids
        async with s.post(url + "/v1/unload_lora_adapter", json={"lora_name": "new"}) as r:
            assert r.status == 200
        async with s.post(url + "/v1/unload_lora_adapter", json={"lora_name": "new"}) as r:
            assert r.status == 404
        async with client(url) as c:
            with pytest.raises(openai.NotFoundError):
                await c.completions.create(model="new", prompt="hi", max_tokens=1)


async def test_health_version_and_metrics_page(fleet: SimFleet) -> None:
    url = fleet.urls[0]
    async with client(url) as c:
        await c.completions.create(model=MODEL, prompt="warm up " * 50, max_tokens=5)
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/health") as r:
            assert r.status == 200
        async with s.get(url + "/version") as r:
            assert "version" in await r.json()
        async with s.get(url + "/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    assert 30_000 <= len(text) <= 100_000
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:cache_config_info", "vllm:lora_requests_info",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
                 "vllm:request_success", "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds"):
        assert name in families, name
    running = families["vllm:num_requests_running"].samples[0]
    assert running.labels == {"model_name": MODEL, "engine": "0"}
    success = {s.labels["finished_reason"]: s.value for s in families["vllm:request_success"].samples
               if s.name.endswith("_total")}
    assert success["length"] + success["stop"] == 1
    ttft_count = [s for s in families["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft_count[0].value == 1


async def test_sglang_flavor_metric_names(make_fleet) -> None:
    sim = await make_fleet(1, engine_flavor="sglang")
    async with aiohttp.ClientSession() as s, s.get(sim.urls[0] + "/metrics") as r:
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage",
                 "sglang:cache_config_info", "sglang:time_to_first_token_seconds"):
        assert name in families, name
    info = families["sglang:cache_config_info"].samples[0].labels
    assert info == {"page_size": "16", "num_pages": "2048"}
    assert not any(name.startswith("vllm:") for name in families)
