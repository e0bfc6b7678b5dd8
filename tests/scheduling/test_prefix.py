"""approx-prefix-cache-producer and its index: block matching, LRU eviction, isolation, purge."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_helpers import cands, cycle, make, request

from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.pool import EndpointPool
from epp.framework import ParameterError
from epp.framework.scheduling import ProfileResult, SchedulingResult
from epp.observability import deferred
from epp.observability.metrics import REGISTRY
from epp.framework.handle import PluginHandle
from plugins.requestcontrol.data import PREFIX_CACHE_MATCH_INFO_KEY
from plugins.requestcontrol.prefix_index import PrefixIndex

BLOCK_TOKENS = 4
BLOCK = BLOCK_TOKENS * 4  # characters per block


def text(blocks: int, seed: int, extra: int = 0) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.randrange(97, 123) for _ in range(blocks * BLOCK + extra))


def producer(**params):
    return make("approx-prefix-cache-producer", {"blockSizeTokens": BLOCK_TOKENS, **params})


def produce(p, req, candidates):
    p.produce(cycle(), req, candidates)
    return {c.key: c.data[PREFIX_CACHE_MATCH_INFO_KEY] for c in candidates}


def serve(p, req, candidates, target_index: int):
    infos = produce(p, req, candidates)
    p.pre_request(req, SchedulingResult({"default": ProfileResult([candidates[target_index]])}, "default"))
    return infos


def test_shared_leading_blocks_match_exactly() -> None:
    p = producer()
    cs = cands(3)
    first = text(10, seed=1)
    serve(p, request(prefix=first, rid="a"), cs, 1)
    for n in (0, 1, 4, 9, 10):
        second = first[: n * BLOCK] + text(10 - n, seed=100 + n)
        infos = produce(p, request(prefix=second, rid=f"b{n}"), cands(3))
        assert infos["10.0.0.2:8000"].match_blocks == n, n
        assert infos["10.0.0.2:8000"].total_blocks == 10
        assert infos["10.0.0.1:8000"].match_blocks == 0
        assert infos["10.0.0.2:8000"].ratio == pytest.approx(n / 10)


def test_divergence_inside_a_block_breaks_the_match_there() -> None:
    p = producer()
    cs = cands(1)
    first = text(6, seed=2)
    serve(p, request(prefix=first, rid="a"), cs, 0)
    changed = bytearray(first)
    changed[3 * BLOCK + 5] ^= 1  # inside block 3
    assert produce(p, request(prefix=bytes(changed)), cands(1))["10.0.0.1:8000"].match_blocks == 3


def test_trailing_partial_block_and_short_inputs() -> None:
    p = producer()
    cs = cands(1)
    serve(p, request(prefix=text(2, seed=3, extra=5), rid="a"), cs, 0)
    again = produce(p, request(prefix=text(2, seed=3, extra=5)), cands(1))["10.0.0.1:8000"]
    assert (again.match_blocks, again.total_blocks) == (3, 3)
    short = produce(p, request(prefix=b"tiny"), cands(1))["10.0.0.1:8000"]
    assert (short.match_blocks, short.total_blocks, short.ratio) == (0, 0, 0.0)


def test_model_and_cache_salt_isolate_entries() -> None:
    p = producer()
    cs = cands(1)
    prompt = text(5, seed=4)
    serve(p, request(model="m1", prefix=prompt, cache_salt="alice", rid="a"), cs, 0)
    key = "10.0.0.1:8000"
    assert produce(p, request(model="m1", prefix=prompt, cache_salt="alice"), cands(1))[key].match_blocks == 5
    assert produce(p, request(model="m1", prefix=prompt, cache_salt="bob"), cands(1))[key].match_blocks == 0
    assert produce(p, request(model="m1", prefix=prompt), cands(1))[key].match_blocks == 0
    assert produce(p, request(model="m2", prefix=prompt, cache_salt="alice"), cands(1))[key].match_blocks == 0


def test_lru_eviction_drops_the_oldest_chains_tail_first() -> None:
    p = producer(autoTune=False, lruCapacityPerServer=8)
    cs = cands(1)
    key = "10.0.0.1:8000"
    a, b = text(5, seed=10), text(5, seed=11)
    serve(p, request(prefix=a, rid="a"), cs, 0)
    serve(p, request(prefix=b, rid="b"), cs, 0)  # 10 entries > 8: the two oldest (a's last blocks) go
    assert p.index.entries(key) == 8
    assert produce(p, request(prefix=a), cands(1))[key].match_blocks == 3
    assert produce(p, request(prefix=b), cands(1))[key].match_blocks == 5
    serve(p, request(prefix=text(8, seed=12), rid="c"), cs, 0)  # fills the whole LRU
    assert produce(p, request(prefix=a), cands(1))[key].match_blocks == 0
    assert produce(p, request(prefix=b), cands(1))[key].match_blocks == 0


def test_capacity_from_the_endpoints_cache_when_auto_tuned() -> None:
    p = producer(lruCapacityPerServer=1000)
    small = cands(1, cache_num_blocks=4, cache_block_size=BLOCK_TOKENS)
    serve(p, request(prefix=text(10, seed=13), rid="a"), small, 0)
    assert p.index.entries("10.0.0.1:8000") == 4
    # the block size also comes from the engine: 8 tokens -> 32-character blocks
    infos = produce(p, request(prefix=text(10, seed=13)), cands(1, cache_block_size=8))
    assert infos["10.0.0.1:8000"].total_blocks == 5 and infos["10.0.0.1:8000"].block_size_tokens == 8


def test_max_prefix_blocks_caps_the_work() -> None:
    p = producer(maxPrefixBlocksToMatch=3)
    assert produce(p, request(prefix=text(10, seed=14)), cands(1))["10.0.0.1:8000"].total_blocks == 3
    p = producer(maxPrefixTokensToMatch=8)  # 8 tokens / 4 per block
    assert produce(p, request(prefix=text(10, seed=14)), cands(1))["10.0.0.1:8000"].total_blocks == 2


def test_prefill_profile_target_is_indexed_too() -> None:
    p = producer()
    cs = cands(3)
    prompt = text(4, seed=15)
    req = request(prefix=prompt, rid="pd")
    p.produce(cycle(), req, cs)
    p.pre_request(req, SchedulingResult({"decode": ProfileResult([cs[0]]), "prefill": ProfileResult([cs[2]])}, "decode"))
    infos = produce(p, request(prefix=prompt), cands(3))
    assert [infos[k].match_blocks for k in sorted(infos)] == [4, 0, 4]


async def test_removed_endpoints_are_purged() -> None:
    pool = EndpointPool()
    pool.sync([EndpointMetadata("10.0.0.1", 8000), EndpointMetadata("10.0.0.2", 8000)])
    h = PluginHandle(pool=pool)
    p = h.create("approx-prefix-cache-producer", params={"blockSizeTokens": BLOCK_TOKENS})
    await p.start(h)
    from epp.framework.types import Candidate
    cs = [Candidate(ep) for ep in pool.endpoints()]
    serve(p, request(prefix=text(4, seed=16), rid="a"), cs, 0)
    serve(p, request(prefix=text(4, seed=17), rid="b"), cs, 1)
    assert len(p.index) == 8
    pool.remove("10.0.0.1:8000")
    assert p.index.endpoints() == ["10.0.0.2:8000"] and len(p.index) == 4
    assert REGISTRY.get_sample_value("inference_extension_prefix_indexer_size") == 4
    await p.close()
    pool.remove("10.0.0.2:8000")
    assert len(p.index) == 4  # unsubscribed


def test_hit_metrics_are_observed() -> None:
    deferred.flush()
    before = REGISTRY.get_sample_value("inference_extension_prefix_indexer_hit_ratio_count") or 0
    p = producer()
    produce(p, request(prefix=text(3, seed=18)), cands(2))
    deferred.flush()
    assert REGISTRY.get_sample_value("inference_extension_prefix_indexer_hit_ratio_count") == before + 1


@pytest.mark.parametrize("params,message", [
    ({"blockSize": 64}, "blockSizeTokens"),
    ({"autoTune": False}, "required when 'autoTune' is false"),
    ({"blockSizeTokens": 0}, "> 0"),
    ({"lruCapacityPerServer": 0}, "> 0"),
    ({"maxPrefixBlocksToMatch": "many"}, "integer"),
])
def test_bad_parameters(params, message) -> None:
    with pytest.raises(ParameterError, match=message):
        make("approx-prefix-cache-producer", params)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 8)), min_size=1, max_size=40),
       capacity=st.integers(1, 30))
def test_index_matches_are_leading_runs(ops, capacity) -> None:
    """Whatever was added and evicted, an endpoint's match equals the length of the leading run of the
    chain it still holds, and never exceeds the chain."""
    idx = PrefixIndex()
    chains = {s: tuple(range(s * 1000, s * 1000 + 8)) for s in range(6)}
    for ep, seed, length in ops:
        idx.add(f"e{ep}", chains[seed][:length], capacity)
        assert idx.entries(f"e{ep}") <= capacity
    for seed, chain in chains.items():
        for ep, n in idx.match(chain).items():
            lru = idx._lrus[ep]
            run = 0
            while run < len(chain) and chain[run] in lru:
                run += 1
            assert n == run and n > 0
    assert len(idx) == sum(idx.entries(e) for e in idx.endpoints())
