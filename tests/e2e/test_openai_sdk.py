"""The openai SDK, unchanged, through Envoy + EPP (default config) to simulated vLLM servers."""

from __future__ import annotations

import sys

import pytest

from epp.bench.procs import free_port

pytestmark = pytest.mark.envoy

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def stack(procs, epp_launcher, envoy_launcher):
    ports = [free_port(), free_port()]
    sim = procs.start("sim", [sys.executable, "-m", "epp.sim", "--ports", ",".join(map(str, ports)),
                              "--time-scale", "0.05"])
    procs.wait_for_log(sim, r"sim ready name=\S+ url=\S+", count=2, timeout=30)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    epp = epp_launcher(addresses)  # the built-in default configuration
    return {name: envoy_launcher(name, epp_port=epp.grpc_port, fallback_endpoints=addresses)
            for name in ("envoy.yaml", "envoy-buffered.yaml")}, epp


@pytest.mark.parametrize("config", ["envoy.yaml", "envoy-buffered.yaml"])
def test_openai_sdk_chat_and_completions(stack, config):
    import openai

    envoys, epp = stack
    client = openai.OpenAI(base_url=envoys[config].url + "/v1", api_key="unused", max_retries=0, timeout=30)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8)
    assert chat.choices[0].message.content and chat.model == MODEL
    assert chat.usage is not None and chat.usage.completion_tokens > 0

    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert comp.choices[0].text and comp.usage.prompt_tokens > 0

    pieces = []
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}],
                                                max_tokens=8, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert pieces

    texts = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="abc", max_tokens=8, stream=True)
             if c.choices]
    assert "".join(texts)

    # The EPP saw the token usage of these answers (openai-parser usage reading).
    if config == "envoy.yaml":
        metrics = epp.metrics_text()
        assert f'inference_objective_output_tokens_count{{model_name="{MODEL}",target_model_name="{MODEL}"}}' in metrics
