"""Benchmark workloads: seeded, exact prompt sizes under the sim tokenizer, the properties they promise."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.bench import workloads as w
from epp.bench.capacity import saturation_capacity
from epp.sim.config import SimConfig
from epp.sim.tokenizer import render_chat, tokenize


@pytest.mark.parametrize("name", list(w.WORKLOADS))
def test_same_seed_same_requests_other_seed_other_requests(name: str) -> None:
    a = w.build(name, seed=7, rate=5.0, duration=10.0)
    b = w.build(name, seed=7, rate=5.0, duration=10.0)
    c = w.build(name, seed=8, rate=5.0, duration=10.0)
    assert a.requests == b.requests
    assert a.requests != c.requests
    assert all(x.at < y.at for x, y in zip(a.requests, a.requests[1:]))
    assert all(0 <= r.at < 10.0 for r in a.requests)


def test_unknown_workload_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown workload 'nope'; known: shared-prefix, mixed-lengths, lora"):
        w.build("nope")


def test_poisson_rate() -> None:
    arrivals = w.poisson_arrivals(random.Random(1), rate=50.0, duration=200.0)
    assert len(arrivals) == pytest.approx(10_000, rel=0.03)
    with pytest.raises(ValueError, match="must be > 0"):
        w.poisson_arrivals(random.Random(1), rate=0.0, duration=1.0)


@given(st.integers(min_value=1, max_value=3000), st.integers(min_value=0, max_value=2**32))
@settings(max_examples=60, deadline=None)
def test_text_of_tokens_is_exact(tokens: int, seed: int) -> None:
    text = w.text_of_tokens(random.Random(seed), tokens, lead="[x] ")
    assert len(text.encode()) == 4 * tokens
    assert len(tokenize(text)) == tokens


def test_completion_prompt_sizes_match_the_sim_tokenizer() -> None:
    for name in ("mixed-lengths", "lora"):
        for r in w.build(name, rate=5.0, duration=5.0).requests:
            assert len(tokenize(r.prompt)) == r.prompt_tokens


def test_shared_prefix_working_set_exceeds_one_server_but_fits_the_fleet() -> None:
    wl = w.shared_prefix(rate=5.0, duration=30.0)
    cfg = SimConfig()
    server_kv = cfg.num_gpu_blocks * cfg.block_size
    working_set = wl.params["prefix_working_set_tokens"]
    assert server_kv < working_set < 8 * server_kv / 2  # half the fleet's KV left for running requests
    # Requests of one tenant share the whole system prompt as a token prefix.
    by_tenant: dict[str, list[list[int]]] = {}
    for r in wl.requests:
        by_tenant.setdefault(r.group, []).append(tokenize(render_chat(r.messages)))
    shared = next(v for v in by_tenant.values() if len(v) >= 2)
    a, b = shared[0], shared[1]
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common >= 2000  # system prompts are 2000-4000 tokens
    assert len(by_tenant) > 10


def test_lora_has_more_adapters_than_the_fleet_has_slots() -> None:
    wl = w.lora(rate=20.0, duration=20.0)
    assert len(wl.lora_adapters) > 8 * SimConfig().max_loras
    used = {r.model for r in wl.requests}
    assert used <= set(wl.lora_adapters) and len(used) > SimConfig().max_loras


def test_mixed_lengths_are_heavy_tailed() -> None:
    wl = w.mixed_lengths(rate=20.0, duration=60.0)
    prompts = sorted(r.prompt_tokens for r in wl.requests)
    outputs = sorted(r.max_tokens for r in wl.requests)
    median_p, p99_p = prompts[len(prompts) // 2], prompts[int(len(prompts) * 0.99)]
    median_o, p99_o = outputs[len(outputs) // 2], outputs[int(len(outputs) * 0.99)]
    assert p99_p > 5 * median_p and p99_o > 5 * median_o


def test_request_body_fixes_the_output_length() -> None:
    r = w.shared_prefix(rate=5.0, duration=5.0).requests[0]
    body = r.body()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == r.max_tokens
    assert body["messages"][0]["role"] == "system" and r.path == "/v1/chat/completions"
    c = w.mixed_lengths(rate=5.0, duration=5.0).requests[0]
    assert c.body(stream=False)["prompt"] == c.prompt and "stream_options" not in c.body(stream=False)
    assert c.path == "/v1/completions"


def test_capacity_matches_the_step_cost_model() -> None:
    # 640 tiny requests with 100 output tokens: the server decodes 32 at a time, and each
    # step costs c_step + 32 * c_dec, so it finishes 32 requests every 100 steps.
    reqs = tuple(w.BenchRequest(index=i, at=0.0, api="completions", model=w.DEFAULT_MODEL, max_tokens=100,
                                prompt_tokens=8, prompt=f"{i:08d}" * 4) for i in range(640))
    cfg = SimConfig(jitter=0.0)
    cap = saturation_capacity(reqs, cfg)
    step = cfg.c_step + cfg.max_num_seqs * cfg.c_dec
    assert cap.requests_per_s == pytest.approx(cfg.max_num_seqs / (100 * step), rel=0.05)
    assert cap.output_tokens_per_s == pytest.approx(cfg.max_num_seqs / step, rel=0.05)
    assert cap.preemptions == 0


def test_capacity_sees_prefix_reuse_and_lora_costs() -> None:
    shared = w.shared_prefix(rate=5.0, duration=40.0)
    assert saturation_capacity(shared.requests).prefix_hit_rate > 0.2
    lora = w.lora(rate=10.0, duration=20.0, adapters=4)
    many = w.lora(rate=10.0, duration=20.0, adapters=64)
    assert (saturation_capacity(lora.requests, lora_adapters=lora.lora_adapters).requests_per_s
            > saturation_capacity(many.requests, lora_adapters=many.lora_adapters).requests_per_s)
    with pytest.raises(ValueError, match="no requests"):
        saturation_capacity(())


def test_round_robin_replay_follows_the_step_cost_model() -> None:
    from epp.bench.capacity import simulate_round_robin

    cfg = SimConfig(jitter=0.0)
    prompt = w.text_of_tokens(random.Random(0), 512)

    def req(i: int, at: float) -> w.BenchRequest:
        return w.BenchRequest(index=i, at=at, api="completions", model=w.DEFAULT_MODEL, max_tokens=4,
                              prompt_tokens=512, prompt=f"{i:04d}" + prompt[4:])

    alone = cfg.c_step + cfg.c_pf * 512  # one prefill step, then the first token
    # Far apart: each request finds an idle server.
    spaced = simulate_round_robin([req(i, 10.0 * i) for i in range(4)], 2, cfg)
    assert spaced == pytest.approx([alone] * 4)
    # Two at once on two servers: round-robin gives each its own server, so no one waits.
    assert simulate_round_robin([req(0, 0.0), req(1, 0.0)], 2, cfg) == pytest.approx([alone] * 2)
    # Two at once on one server: they share the prefill step (1024 tokens fit the 2048 budget).
    both = cfg.c_step + cfg.c_pf * 1024
    assert simulate_round_robin([req(0, 0.0), req(1, 0.0)], 1, cfg) == pytest.approx([both] * 2)
