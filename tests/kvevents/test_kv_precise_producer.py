"""precise-prefix-cache-producer on its own: the subscriber in-process and in its own process,
following the pool, producing match info that prefix-cache-scorer (named producer) scores, and
the /debug + /metrics views of its subscriptions.
"""

from __future__ import annotations

import random

import pytest
from kv_helpers import common_free_port, eventually, published
from kv_publisher import EngineModel

from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.pool import EndpointPool
from epp.framework import decode_params, registry
from epp.framework.handle import PluginHandle
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest
from epp.kvcache.hasher import token_bytes
from epp.observability.metrics import REGISTRY
from plugins.requestcontrol.data import TOKENIZED_PROMPT_KEY, TokenizedPrompt, prefix_match_key

pytestmark = pytest.mark.asyncio
_rng = random.Random(11)
SYSTEM = [_rng.randrange(100_000) for _ in range(64)]


def build(type_name: str, raw: dict, name: str | None = None):
    spec = registry.get(type_name)
    return spec.cls.create(name or type_name, decode_params(spec.params, raw), PluginHandle())


@pytest.mark.parametrize("mode", ["inprocess", "process"])
async def test_producer_follows_the_pool_and_feeds_the_scorer(loopback, mode):
    from kv_publisher import Publisher

    hosts = [loopback + "2", loopback + "3", loopback + "4"]
    port, replay = common_free_port(hosts), common_free_port(hosts)
    producer = build("precise-prefix-cache-producer", {
        "tokenProcessorConfig": {"blockSizeTokens": 16},
        "kvEventsConfig": {"discoverPods": True, "subscriberMode": mode,
                           "podDiscoveryConfig": {"socketPort": port, "replaySocketPort": replay}},
    })
    scorer = build("prefix-cache-scorer", {"prefixMatchInfoProducerName": "precise-prefix-cache-producer"})
    assert scorer.consumes == {prefix_match_key("precise-prefix-cache-producer")}
    assert producer.produces >= scorer.consumes
    pool = EndpointPool("p")
    pool.sync([EndpointMetadata(address=h, port=8000) for h in hosts])
    keys = [f"{h}:8000" for h in hosts]
    pubs = [Publisher(f"tcp://{h}:{port}", f"tcp://{h}:{replay}", topic=f"kv@{h}:8000@m") for h in hosts[:2]]
    engines = [EngineModel(16, 64), EngineModel(16, 64)]
    await producer.start(PluginHandle([producer], pool=pool))
    try:
        def connected() -> set[str]:
            return {s["endpoint"] for s in producer.debug_state()["subscriptions"] if s["connected"]}

        await eventually(lambda: connected() >= set(keys[:2]), what="subscriptions connected")
        prompt = SYSTEM + [_rng.randrange(100_000) for _ in range(48)]
        pubs[0].publish(engines[0].store(prompt))  # all 7 blocks on endpoint 0
        pubs[1].publish(engines[1].store(SYSTEM))  # the 4 system blocks on endpoint 1; endpoint 2 sends nothing
        await published(pubs, lambda: producer.index.entries(keys[0]) == 7 and producer.index.entries(keys[1]) == 4,
                        what="both publishers indexed")

        def route(tokens: list[int]) -> tuple[dict[str, int], list[float]]:
            cycle = CycleState({TOKENIZED_PROMPT_KEY: TokenizedPrompt(token_bytes(tokens), "test")})
            req = InferenceRequest("r", {}, target_model="m")
            cands = [Candidate(ep) for ep in pool.endpoints()]
            producer.produce(cycle, req, cands)
            infos = {c.key: c.data[prefix_match_key("precise-prefix-cache-producer")] for c in cands}
            return {k: i.match_blocks for k, i in infos.items()}, list(scorer.score(cycle, req, cands))

        matched, scores = route(prompt + [1] * 20)  # 8 full blocks: 7 held by endpoint 0
        assert matched == {keys[0]: 7, keys[1]: 4, keys[2]: 0}
        assert scores == pytest.approx([7 / 8, 4 / 8, 0.0])
        matched, scores = route([5] * 40)  # nobody holds it
        assert matched == dict.fromkeys(keys, 0) and scores == [0.0, 0.0, 0.0]
        matched, _ = route([])  # no token IDs: no blocks, nothing matched, score 0
        assert matched == dict.fromkeys(keys, 0)

        # Observability: the subscriptions and the index in /debug, upstream's metric names.
        state = producer.debug_state()
        subs = {s["endpoint"]: s for s in state["subscriptions"]}
        await eventually(lambda: {s["endpoint"]: s for s in producer.debug_state()["subscriptions"]}[keys[0]]["last_seq"]
                         is not None, what="status of the last seq")
        assert set(subs) == set(keys) and not subs[keys[2]]["connected"]
        assert state["index"]["entries"] == 11
        sample = REGISTRY.get_sample_value("llm_d_epp_kv_cache_events_messages_received_total",
                                           {"pod_identifier": keys[0]})
        assert sample >= 1.0
        assert REGISTRY.get_sample_value("llm_d_epp_kv_cache_index_lookup_requests_total") >= 3

        # Endpoint 1's publisher goes away: its blocks are kept but not matched; they are matched
        # again once its stream is back (the replay check shows it is the same publisher).
        old = pubs[1]
        old.close()
        await eventually(lambda: route(prompt)[0][keys[1]] == 0, what="endpoint 1's blocks set aside")
        assert producer.index.entries(keys[1]) == 4
        pubs[1] = Publisher(f"tcp://{hosts[1]}:{port}", f"tcp://{hosts[1]}:{replay}", topic=f"kv@{hosts[1]}:8000@m")
        pubs[1].seq, pubs[1].buffer = old.seq, old.buffer
        await published(pubs[1:], lambda: route(prompt)[0][keys[1]] == 4, what="endpoint 1 matched again")
        assert {s["endpoint"]: s for s in producer.debug_state()["subscriptions"]}[keys[1]]["restarts"] == 0

        # The endpoint leaves the pool: its subscription and its blocks go.
        pool.sync([EndpointMetadata(address=h, port=8000) for h in hosts[1:]])
        assert producer.index.entries(keys[0]) == 0
        await eventually(lambda: keys[0] not in {s["endpoint"] for s in producer.debug_state()["subscriptions"]},
                         what="subscription dropped")
        pubs[0].publish(engines[0].store(SYSTEM + [3] * 32))
        pubs[1].publish(engines[1].store(SYSTEM + [4] * 16))
        await published(pubs[1:], lambda: producer.index.entries(keys[1]) == 5, what="endpoint 1 still followed")
        assert producer.index.entries(keys[0]) == 0
    finally:
        await producer.close()
        for p in pubs:
            p.close()
