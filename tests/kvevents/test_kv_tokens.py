"""token-producer: token IDs from the engines' render endpoints (the mock fleet's, exactly what its
KV events carry), falling back to nothing (never a failed request), cached per identical prompt,
or from a local tokenizer.json + chat template.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from kv_helpers import common_free_port

from epp.datalayer.endpoint import Endpoint, EndpointMetadata
from epp.framework import decode_params, registry
from epp.framework.handle import PluginHandle
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate
from epp.kvcache.hasher import token_bytes
from epp.observability.metrics import REGISTRY
from epp.sim import SimConfig, SimFleet
from plugins.requestcontrol.data import TOKENIZED_PROMPT_KEY

pytestmark = pytest.mark.asyncio
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def plugin(type_name: str, raw: dict | None = None, name: str | None = None):
    spec = registry.get(type_name)
    return spec.cls.create(name or type_name, decode_params(spec.params, raw or {}), PluginHandle())


PARSER = plugin("openai-parser")


def request(path: str, body: dict):
    raw = json.dumps(body).encode()
    req = PARSER.parse_request(raw, {":path": path, ":method": "POST", "content-type": "application/json"})
    req.incoming_model = req.target_model = body["model"]
    return req


def candidates(addresses: list[tuple[str, int]]) -> list[Candidate]:
    return [Candidate(Endpoint(EndpointMetadata(address=a, port=p))) for a, p in addresses]


def outcomes(name: str, backend: str = "render") -> dict[str, float]:
    return {o: REGISTRY.get_sample_value("epp_token_producer_requests_total",
                                         {"plugin_name": name, "backend": backend, "outcome": o}) or 0.0
            for o in ("ok", "cached", "failed", "unsupported")}


async def test_render_from_the_pool_matches_the_engine_and_failures_fall_back(loopback):
    hosts = [loopback + "2", loopback + "3"]
    port = common_free_port(hosts)
    async with SimFleet([port], hosts=hosts, config=SimConfig(time_scale=0.02)) as fleet:
        engine = fleet.servers[0].engine
        producer = plugin("token-producer", name="tp-render")
        try:
            chat = request("/v1/chat/completions", {"model": MODEL, "messages": [
                {"role": "system", "content": "You are a prefix. " * 20}, {"role": "user", "content": "hi"}]})
            comp = request("/v1/completions", {"model": MODEL, "prompt": "Once upon a prefix, " * 30})
            cands = candidates([(h, port) for h in hosts])
            for req, api in ((chat, "chat"), (comp, "completions")):
                cycle = CycleState()
                await producer.produce(cycle, req, cands)
                tp = cycle[TOKENIZED_PROMPT_KEY]
                # Exactly the IDs the engine tokenizes to (and publishes in its KV events).
                want = engine_ids(engine, req.payload, api)
                assert tp.data == token_bytes(want) and len(tp) == len(want) > 100
            cycle = CycleState()
            await producer.produce(cycle, comp, cands)  # the same prompt again: from the cache
            assert outcomes("tp-render")["cached"] == 1 and outcomes("tp-render")["ok"] == 2

            # The first candidate is down: the next one renders.
            dead = candidates([(loopback + "9", common_free_port([loopback + "9"]))]) + cands
            producer2 = plugin("token-producer", {"cacheSize": 0}, name="tp-fallback")
            cycle = CycleState()
            await producer2.produce(cycle, comp, dead)
            assert TOKENIZED_PROMPT_KEY in cycle
            await producer2.close()

            # A render URL that does not answer: no token IDs, no exception, counted.
            bad = plugin("token-producer", {"vllm": {"url": f"http://{loopback}9:{common_free_port([loopback + '9'])}",
                                                     "timeout": "500ms"}, "cacheSize": 0}, name="tp-bad")
            cycle = CycleState()
            await bad.produce(cycle, comp, cands)
            assert TOKENIZED_PROMPT_KEY not in cycle and outcomes("tp-bad")["failed"] == 1
            # An endpoint without render endpoints (404): the same.
            nf = plugin("token-producer", {"vllm": {"url": fleet.urls[0] + "/nope"}, "cacheSize": 0}, name="tp-404")
            cycle = CycleState()
            await nf.produce(cycle, comp, cands)
            assert TOKENIZED_PROMPT_KEY not in cycle and outcomes("tp-404")["failed"] == 1
            await bad.close()
            await nf.close()
        finally:
            await producer.close()


def engine_ids(engine, payload: dict, api: str) -> list[int]:
    from epp.sim.protocol import chat_prompt_ids
    from epp.sim.tokenizer import tokenize

    return chat_prompt_ids(payload["messages"]) if api == "chat" else tokenize(payload["prompt"])


async def test_a_cancelled_render_leaves_nothing_running(loopback):
    """The client went away while the render was in flight: the wait ends at once."""
    from aiohttp import web

    started, release = asyncio.Event(), asyncio.Event()

    async def slow(_req: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.json_response([{"token_ids": [1, 2, 3]}])

    app = web.Application()
    app.router.add_post("/v1/completions/render", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    port = common_free_port([loopback + "2"])
    await web.TCPSite(runner, loopback + "2", port).start()
    producer = plugin("token-producer", {"cacheSize": 0}, name="tp-cancel")
    try:
        req = request("/v1/completions", {"model": MODEL, "prompt": "x" * 100})
        task = asyncio.get_running_loop().create_task(
            producer.produce(CycleState(), req, candidates([(loopback + "2", port)])))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "TokenProducer._render"]
    finally:
        release.set()
        await producer.close()
        await runner.cleanup()


async def test_local_tokenizer_and_chat_template(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cache of the prefix is warm", "route the request to the block"] * 50,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]", "<s>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    producer = plugin("token-producer", {"local": {"tokenizerPath": str(path), "chatTemplate": template,
                                                   "bosToken": "<s>"}}, name="tp-local")
    req = request("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "the cache"}]})
    cycle = CycleState()
    await producer.produce(cycle, req, [])
    want = tok.encode("<s><user>the cache<assistant>", add_special_tokens=False).ids
    assert cycle[TOKENIZED_PROMPT_KEY].data == token_bytes(want)
    comp = request("/v1/completions", {"model": MODEL, "prompt": "route the block"})
    cycle = CycleState()
    await producer.produce(cycle, comp, [])
    assert cycle[TOKENIZED_PROMPT_KEY].data == token_bytes(tok.encode("route the block").ids)
    with pytest.raises(Exception, match="cannot load tokenizer"):
        plugin("token-producer", {"local": {"tokenizerPath": str(tmp_path / "missing.json")}})
