"""Engine physics on a fake clock: exact, fast and immune to machine load.

Each test states an effect a router should be able to exploit and checks it
from the outside (latencies, counters), not how the scheduler achieves it.
"""

from __future__ import annotations

import statistics

import pytest


def ttft(req) -> float:
    return req.first_token_time - req.arrival


def mean_itl(req) -> float:
    return (req.last_token_time - req.first_token_time) / (req.num_output - 1)


def test_batch1_latencies_match_the_step_formula(virtual) -> None:
    eng = virtual()
    req = eng.submit(256, max_tokens=11)
    eng.run()
    cfg = eng.config
    assert ttft(req) == pytest.approx(cfg.c_step + 256 * cfg.c_pf)
    assert mean_itl(req) == pytest.approx(cfg.c_step + cfg.c_dec)
    assert req.finish_reason == "length"


def test_ttft_grows_with_queue_length(virtual) -> None:
    def probe_ttft(n_ahead: int) -> float:
        eng = virtual(max_num_seqs=8)
        for _ in range(n_ahead):
            eng.submit(list(range(1000, 1300)), max_tokens=50)
        probe = eng.submit(list(range(5000, 5300)), max_tokens=5)
        eng.run()
        return ttft(probe)

    alone, q4, q16, q48 = (probe_ttft(n) for n in (0, 4, 16, 48))
    assert alone < q4 < q16 < q48
    # Past max_num_seqs the probe waits for whole requests to finish, not just steps.
    assert q16 > 5 * alone
    assert q48 > 2 * q16


def test_repeated_prompt_hits_prefix_cache_and_is_faster(virtual) -> None:
    eng = virtual()
    prompt = list(range(3000, 5000))  # 2000 tokens = 125 blocks
    first = eng.submit(prompt, max_tokens=4)
    eng.run()
    second = eng.submit(prompt, max_tokens=4)
    eng.run()
    assert first.cached_tokens == 0
    assert second.cached_tokens >= len(prompt) - eng.config.block_size
    assert ttft(second) < ttft(first) / 5
    stats = eng.sched.stats
    assert stats.prefix_hits == second.cached_tokens
    assert stats.prefix_queries == 2 * len(prompt)


def test_shared_prefix_hits_only_the_shared_part(virtual) -> None:
    eng = virtual()
    system = list(range(1, 1025))  # 64 blocks of shared "system prompt"
    eng.submit(system + list(range(20000, 20500)), max_tokens=2)
    eng.run()
    other = eng.submit(system + list(range(30000, 30500)), max_tokens=2)
    eng.run()
    assert other.cached_tokens == len(system)


def test_prefix_cache_is_per_adapter(virtual) -> None:
    eng = virtual(lora_adapters=("a",))
    prompt = list(range(1, 1000))
    eng.submit(prompt, max_tokens=2)
    eng.run()
    on_adapter = eng.submit(prompt, max_tokens=2, lora="a")
    eng.run()
    assert on_adapter.cached_tokens == 0


def test_lru_eviction_keeps_the_recent_prefix(virtual) -> None:
    # 64 blocks = 1024 tokens of KV; each prompt takes 32 blocks.
    eng = virtual(num_gpu_blocks=64, max_model_len=1024)
    a, b, c = (list(range(k * 10_000, k * 10_000 + 512)) for k in (1, 2, 3))
    for prompt in (a, b, c):  # c evicts a (least recently used), keeps b
        eng.submit(prompt, max_tokens=1)
        eng.run()
    again_b = eng.submit(b, max_tokens=1)
    eng.run()
    again_a = eng.submit(a, max_tokens=1)
    eng.run()
    assert again_b.cached_tokens > 0
    assert again_a.cached_tokens == 0


def test_filling_the_kv_cache_causes_preemptions_but_all_finish(virtual) -> None:
    # 128 blocks = 2048 tokens; 8 requests growing to 100 + 300 tokens need 200 blocks.
    eng = virtual(num_gpu_blocks=128, max_model_len=2048)
    reqs = [eng.submit(list(range(k * 1000, k * 1000 + 100)), max_tokens=300) for k in range(8)]
    eng.run()
    assert eng.sched.stats.preemptions > 0
    assert all(r.finish_reason == "length" and r.num_output == 300 for r in reqs)
    # The oldest request is never the victim: the newest ones are.
    assert reqs[0].preemptions == 0
    assert max(r.preemptions for r in reqs[4:]) > 0
    assert eng.sched.kv.num_used == 0


def test_no_preemption_when_kv_is_ample(virtual) -> None:
    eng = virtual()
    for k in range(8):
        eng.submit(list(range(k * 1000, k * 1000 + 100)), max_tokens=300)
    eng.run()
    assert eng.sched.stats.preemptions == 0


def test_inter_token_latency_grows_with_batch_size(virtual) -> None:
    def itl_at(batch: int) -> float:
        eng = virtual()
        reqs = [eng.submit(list(range(k * 100, k * 100 + 32)), max_tokens=64) for k in range(batch)]
        eng.run()
        return statistics.mean(mean_itl(r) for r in reqs)

    cfg = virtual().config
    itl1, itl8, itl32 = itl_at(1), itl_at(8), itl_at(32)
    assert itl1 < itl8 < itl32
    assert itl1 == pytest.approx(cfg.c_step + cfg.c_dec, rel=0.05)
    assert itl32 == pytest.approx(cfg.c_step + 32 * cfg.c_dec, rel=0.1)


def test_long_prefill_is_chunked_and_slows_running_decodes(virtual) -> None:
    eng = virtual()
    decoder = eng.submit(32, max_tokens=400)
    eng.run_until(0.5)
    before = eng.now
    tokens_before = decoder.num_output
    eng.submit(list(range(10_000, 16_000)), max_tokens=1)  # 6000 tokens: 3 chunks of <= 2048
    steps = 0
    while decoder.num_output < tokens_before + 3:
        eng.step()
        steps += 1
    slowed = (eng.now - before) / 3
    assert steps == 3  # the decoder still gets a token every step (chunked, not stalled)
    assert slowed > 3 * (eng.config.c_step + eng.config.c_dec)


def test_non_resident_adapter_costs_a_load(virtual) -> None:
    eng = virtual(lora_adapters=("a", "b"))
    cold = eng.submit(64, max_tokens=2, lora="a")
    eng.run()
    warm = eng.submit(list(range(500, 564)), max_tokens=2, lora="a")
    eng.run()
    assert ttft(cold) - ttft(warm) == pytest.approx(eng.config.lora_load_s)
    assert eng.sched.lora.loads == 1


def test_lora_slots_are_lru_and_contended(virtual) -> None:
    eng = virtual(lora_adapters=("a", "b", "c"), max_loras=2)
    for name in ("a", "b", "c", "a"):  # c evicts a; a must load again
        eng.submit(16, max_tokens=1, lora=name)
        eng.run()
    assert eng.sched.lora.loads == 4


def test_lora_admission_skips_but_does_not_block_the_queue(virtual) -> None:
    eng = virtual(lora_adapters=("a", "b"), max_loras=1)
    long_a = eng.submit(16, max_tokens=100, lora="a")
    eng.step()
    waiting_b = eng.submit(16, max_tokens=1, lora="b")
    base = eng.submit(16, max_tokens=1)
    eng.run()
    assert base.first_token_time < long_a.finish_time  # the base request was not stuck behind b
    assert waiting_b.first_token_time > long_a.finish_time  # b needed a's slot


def test_abort_frees_kv_and_slot(virtual) -> None:
    eng = virtual(max_num_seqs=1)
    first = eng.submit(500, max_tokens=1000)
    eng.step()
    second = eng.submit(16, max_tokens=1)
    eng.sched.abort(first, eng.now)
    eng.run()
    assert first.finish_reason == "abort"
    assert second.finish_reason == "length"
    assert eng.sched.kv.num_used == 0
    assert eng.sched.stats.success["abort"] == 1
