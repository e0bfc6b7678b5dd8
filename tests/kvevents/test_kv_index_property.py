"""Property: after any sequence of stores, evictions, cache resets, publisher restarts and lost
messages (repaired by replay), the index holds exactly the blocks the engines hold.

Runs the real Session (sequence/replay logic), Ingestor and BlockIndex on vLLM-encoded
payloads; the transport is replaced by direct calls and an in-memory replay buffer (the ZMQ
round trip has its own tests in test_kv_subscriber.py).
"""

from __future__ import annotations

import asyncio
import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kv_publisher import EngineModel, Publisher

from epp.kvcache.hasher import BlockHasher
from epp.kvcache.index import BlockIndex
from epp.kvevents.ingest import Ingestor
from epp.kvevents.session import Session

INDEX_BLOCK = 16
_rng = random.Random(7)
PREFIXES = [[_rng.randrange(50_000) for _ in range(n)] for n in (32, 64, 16)]
ENDPOINTS = ("10.0.0.1:8000", "10.0.0.2:8000")

op = st.tuples(
    st.sampled_from(["store", "store", "store", "evict", "reset", "restart"]),
    st.integers(0, len(ENDPOINTS) - 1),
    st.integers(0, len(PREFIXES) - 1),
    st.integers(0, 40),  # suffix tokens (or blocks to evict)
    st.sampled_from([True, True, True, False]),  # delivered? a lost message is a gap
)


def replayer_of(pub: Publisher):
    async def replay(start: int):
        for item in pub.replay_from(start):
            yield item
    return replay


def expected_keys(engine: EngineModel, hasher: BlockHasher) -> set[int]:
    per = engine.block_size // INDEX_BLOCK
    out: set[int] = set()
    for prefix in engine.held_prefixes():
        out.update(hasher.keys(list(prefix), hasher.root())[-per:])
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Restarts the sequence alone cannot reveal (the new stream reaches or passes our last seq
# before we hear from it): only the replay's digest check tells the two publishers apart.
@example(ops=[("store", 0, 0, 20, True), ("store", 0, 1, 20, True), ("restart", 0, 0, 0, True),
              ("store", 0, 2, 20, False), ("store", 0, 0, 20, False)],
         engine_block=16, int_hashes=True, form="map", seed=1)
@example(ops=[("store", 0, 0, 20, True), ("restart", 0, 0, 0, True), ("store", 0, 1, 20, False),
              ("store", 0, 2, 20, False), ("store", 0, 0, 20, False)],
         engine_block=32, int_hashes=False, form="array", seed=2)
# A second restart right after a replay: the replay's duplicate window must not swallow the
# restarted stream's messages.
@example(ops=[("store", 0, 0, 0, True), ("store", 0, 0, 0, True), ("restart", 0, 0, 0, True),
              ("store", 0, 0, 0, False), ("store", 0, 1, 0, True), ("restart", 0, 0, 0, True),
              ("store", 0, 0, 0, False)],
         engine_block=16, int_hashes=False, form="map", seed=0)
@given(ops=st.lists(op, max_size=40), engine_block=st.sampled_from([16, 32]), int_hashes=st.booleans(),
       form=st.sampled_from(["map", "array"]), seed=st.integers(0, 1000))
def test_index_equals_engine_holdings(ops, engine_block, int_hashes, form, seed):
    rng = random.Random(seed)
    hasher = BlockHasher(INDEX_BLOCK)
    index = BlockIndex()
    ingestor = Ingestor(hasher, index)
    engines = {ep: EngineModel(engine_block, capacity=16, int_hashes=int_hashes) for ep in ENDPOINTS}
    pubs = {ep: Publisher(form=form) for ep in ENDPOINTS}
    sessions = {ep: Session(ep, ingestor, replayer_of(pubs[ep])) for ep in ENDPOINTS}

    async def send(ep: str, events: list[dict], deliver: bool) -> None:
        seq = pubs[ep].publish(events, send=False)
        if deliver:
            await sessions[ep].on_message(seq.to_bytes(8, "big"), pubs[ep].buffer[-1][1])

    async def run() -> None:
        for kind, i, p, n, deliver in ops:
            ep = ENDPOINTS[i]
            engine = engines[ep]
            if kind == "store":
                tokens = PREFIXES[p] + [rng.randrange(50_000) for _ in range(n)]
                events = engine.store(tokens[: engine.capacity // 2 * engine.block_size])
            elif kind == "evict":
                events = engine.evict(n % 5 + 1)
            elif kind == "reset":
                events = engine.reset()
            else:  # a new engine process: empty cache, sequence from 0; the socket reconnects
                engine.blocks.clear()
                pubs[ep].restart()
                sessions[ep].reconnected()
                continue
            if events:
                await send(ep, events, deliver)
        for ep in ENDPOINTS:  # one more delivered step lets every endpoint notice what it missed
            await send(ep, engines[ep].store([rng.randrange(50_000) for _ in range(engine_block)]), True)

    asyncio.run(run())
    for ep in ENDPOINTS:
        assert set(index.holdings(ep)) == expected_keys(engines[ep], hasher), ep
        assert ingestor.counters.skipped.get("unknown-parent", 0) == 0
