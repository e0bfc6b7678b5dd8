"""The subscriber against the real mock fleet (epp/sim): a pod-like fleet on random loopback
addresses publishing vLLM KV events (one server in the map form, one in the positional form),
the index following what each server caches, and a server restart clearing its entries.
"""

from __future__ import annotations

import dataclasses

import aiohttp
import pytest
from kv_helpers import common_free_port, eventually

from epp.kvcache.hasher import BlockHasher, token_bytes
from epp.kvcache.index import BlockIndex
from epp.kvevents.config import KVEventsConfig, PodDiscoveryConfig
from epp.kvevents.ingest import Ingestor
from epp.kvevents.manager import Subscriptions
from epp.sim import SimConfig, SimFleet
from epp.sim.kvevents import KVEventsConfig as SimKVEvents

pytestmark = pytest.mark.asyncio
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SYSTEM = "You are the support assistant of a company that sells very long prefixes. " * 12


async def render_keys(session: aiohttp.ClientSession, url: str, hasher: BlockHasher, prompt: str) -> list[int]:
    async with session.post(url + "/v1/completions/render", json={"model": MODEL, "prompt": prompt}) as r:
        assert r.status == 200
        ids = (await r.json())[0]["token_ids"]
    return hasher.keys_of_bytes(token_bytes(ids), hasher.root())


async def test_index_follows_the_sim_fleet_and_its_restart(loopback):
    hosts = [loopback + "2", loopback + "3"]
    http_port, ev_port, replay_port = (common_free_port(hosts) for _ in range(3))
    events = SimKVEvents(enable_kv_cache_events=True, endpoint=f"tcp://*:{ev_port}",
                         replay_endpoint=f"tcp://*:{replay_port}", topic="kv@$(POD_IP):$(POD_PORT)@{model}")
    base = SimConfig(time_scale=0.02, kv_events=events, num_gpu_blocks=512, block_size=16, max_model_len=4096, seed=1)
    configs = [dataclasses.replace(base, name="sim-0"), dataclasses.replace(base, name="sim-1", kv_events_format="array")]
    hasher = BlockHasher(16)
    index = BlockIndex()
    subs = Subscriptions(KVEventsConfig(podDiscoveryConfig=PodDiscoveryConfig(ev_port, replay_port)),
                         Ingestor(hasher, index))
    keys = [f"{h}:{http_port}" for h in hosts]
    async with SimFleet([http_port], hosts=hosts, configs=configs) as fleet, aiohttp.ClientSession() as http:
        await subs.start()
        try:
            for k, h in zip(keys, hosts):
                subs.track(k, h)
            urls = fleet.urls
            prompts = [SYSTEM + f" Question {i}: how long is a prefix, and why would anyone ask? " * 3 for i in range(4)]
            for i, p in enumerate(prompts):  # each server gets its own half of the questions
                async with http.post(urls[i % 2] + "/v1/completions",
                                     json={"model": MODEL, "prompt": p, "max_tokens": 4}) as r:
                    assert r.status == 200
            wanted = [await render_keys(http, urls[i % 2], hasher, p) for i, p in enumerate(prompts)]

            def holds(i: int) -> bool:
                m = index.match(wanted[i], keys)
                return m.get(keys[i % 2], (0, 0))[0] == len(wanted[i])

            await eventually(lambda: all(holds(i) for i in range(4)), what="both servers' blocks indexed")
            # The shared system prompt is on both; a question's own tail only where it ran.
            m = index.match(wanted[0], keys)
            assert m[keys[0]][0] == len(wanted[0]) > m[keys[1]][0] > 0
            assert subs.ingestor.counters.skipped == {}
            st = {s["endpoint"]: s for s in subs.statuses()}
            assert all(st[k]["connected"] and st[k]["last_seq"] is not None for k in keys)

            # sim-0 restarts: empty cache, sequence from 0. Its entries go; sim-1's stay.
            held_by_1 = index.entries(keys[1])
            await fleet.servers[0].restart()
            await eventually(lambda: index.entries(keys[0]) == 0, what="sim-0's entries cleared after its restart")
            assert index.entries(keys[1]) == held_by_1
            async with http.post(fleet.urls[0] + "/v1/completions",
                                 json={"model": MODEL, "prompt": prompts[0], "max_tokens": 4}) as r:
                assert r.status == 200
            again = await render_keys(http, fleet.urls[0], hasher, prompts[0])
            await eventually(lambda: index.match(again, keys).get(keys[0], (0, 0))[0] == len(again),
                             what="sim-0 indexed again after its restart")
            assert {s["endpoint"]: s for s in subs.statuses()}[keys[0]]["restarts"] == 1
        finally:
            await subs.stop()
