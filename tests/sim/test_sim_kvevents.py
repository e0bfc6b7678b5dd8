"""KV events from the sim, checked on the wire the way a vLLM subscriber reads them."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio
from kvevents_support import Batch, KVEventsSubscriber, decode_frames, replay, reset_prefix_cache, stored_blocks

from epp.bench.procs import free_port
from epp.sim import SimConfig, SimFleet
from epp.sim.cli import add_arguments, build_fleet
from epp.sim.kvevents import KVEventsConfig, binds, expand_topic, offset_endpoint, server_endpoint
from epp.sim.tokenizer import block_hashes

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TOPIC = "kv@$(POD_IP):$(POD_PORT)@{model}"


def events_config(**overrides: Any) -> KVEventsConfig:
    """Events on, on OS-assigned ports (``*`` as port), so parallel test runs never collide."""
    base = dict(enable_kv_cache_events=True, endpoint="tcp://*:*", replay_endpoint="tcp://*:*", topic=TOPIC)
    return KVEventsConfig(**{**base, **overrides})


def sim_config(**overrides: Any) -> SimConfig:
    base = SimConfig(time_scale=0.01, jitter=0.0, hash_seed="7", lora_adapters=("adapter-a",), kv_events=events_config())
    return dataclasses.replace(base, **overrides)


@pytest.fixture
async def make_fleet() -> AsyncIterator[Callable[..., Awaitable[SimFleet]]]:
    fleets: list[SimFleet] = []

    async def make(ports: list[int] | None = None, **kwargs: Any) -> SimFleet:
        config = kwargs.pop("config", None) or sim_config()
        fleet = await SimFleet(ports or [0], config, **kwargs).start()
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        await fleet.stop()


async def post(url: str, path: str, body: dict[str, Any]) -> Any:
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def complete(url: str, prompt: Any, model: str = MODEL, max_tokens: int = 1) -> Any:
    return await post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                               "ignore_eos": True})


def ids(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# --- the wire format ----------------------------------------------------------------------------------

# The structs as vLLM declares them (vllm/distributed/kv_events.py): decoding with them proves a
# vLLM-typed consumer accepts what the sim sends, in both event encodings.
def vllm_types(array_like: bool) -> type:
    opts = dict(array_like=array_like, omit_defaults=True, tag=True)
    stored = msgspec.defstruct("BlockStored", [
        ("block_hashes", list[int]), ("parent_block_hash", int | None), ("token_ids", list[int]),
        ("block_size", int), ("lora_id", int | None), ("medium", str | None), ("lora_name", str | None),
        ("extra_keys", list[Any] | None, None), ("group_idx", int | None, None),
        ("kv_cache_spec_kind", str | None, None), ("kv_cache_spec_sliding_window", int | None, None)], **opts)
    removed = msgspec.defstruct("BlockRemoved", [("block_hashes", list[int]), ("medium", str | None),
                                                 ("group_idx", int | None, None)], **opts)
    cleared = msgspec.defstruct("AllBlocksCleared", [], **opts)
    return msgspec.defstruct("KVEventBatch", [("ts", float), ("events", list[stored | removed | cleared]),
                                              ("data_parallel_rank", int | None, None)],
                             array_like=True, omit_defaults=True)


@pytest.mark.parametrize("event_format", ["map", "array"])
async def test_events_decode_as_vllm_encodes_them(make_fleet, event_format: str) -> None:
    fleet = await make_fleet(config=sim_config(kv_events_format=event_format))
    server = fleet.servers[0]
    async with KVEventsSubscriber(server.kv_events_endpoint) as sub:
        synced = await sub.sync(lambda: reset_prefix_cache(server.url))
        sock = sub.sock
        prompt = ids(1, 100)  # 6 full blocks of 16, a partial one
        await complete(server.url, prompt)
        await complete(server.url, ids(500, 40), model="adapter-a")
        raw = [await sock.recv_multipart() for _ in range(2)]

    topic = f"kv@127.0.0.1:{server.port}@{MODEL}".encode()
    assert {b.topic for b in synced} == {topic}
    last_seq = synced[-1].seq
    for i, (t, seq, payload) in enumerate(raw):
        assert t == topic
        assert len(seq) == 8 and int.from_bytes(seq, "big") == last_seq + 1 + i  # 8-byte big-endian, no gaps
        assert payload[0] == 0x93  # a 3-element msgpack array: [ts, events, data_parallel_rank]
        assert payload[1] == 0xCB  # ts is a float64

    base, lora = (decode_frames(frames) for frames in raw)
    assert base.data_parallel_rank == 0 and base.types() == ["BlockStored"]
    stored = base.events[0]
    hashes = stored["block_hashes"]
    assert len(hashes) == 6 and stored["parent_block_hash"] is None
    assert stored["token_ids"] == prompt[:96] and stored["block_size"] == 16
    assert (stored["lora_id"], stored["medium"], stored["lora_name"]) == (None, "GPU", None)
    assert stored["extra_keys"] == [None] * 6 and stored["group_idx"] == 0
    assert stored["kv_cache_spec_kind"] == "full_attention"
    # Hashes are msgpack *unsigned* 64-bit ints (0xcf), several beyond int64's range (seeded: deterministic).
    assert all(b"\xcf" + h.to_bytes(8, "big") in raw[0][2] for h in hashes)
    assert any(h >= 2**63 for h in hashes)
    adapter = lora.events[0]
    assert (adapter["lora_name"], adapter["lora_id"], adapter["extra_keys"]) == ("adapter-a", 1, [["adapter-a"]] * 2)
    assert adapter["token_ids"] == ids(500, 32)
    assert not set(adapter["block_hashes"]) & set(hashes)

    event_bytes = raw[0][2]
    if event_format == "map":  # msgpack map keyed by field names, the tag under "type"
        assert b"\xa4type\xabBlockStored" in event_bytes and b"\xacblock_hashes" in event_bytes
        assert b"\xbakv_cache_spec_sliding_window" not in event_bytes  # defaulted fields are omitted
    else:  # positional: [tag, all 11 fields] (msgspec ignores omit_defaults for array_like structs)
        assert b"\x9c\xabBlockStored" in event_bytes and b"block_hashes" not in event_bytes
    batch = msgspec.msgpack.decode(event_bytes, type=vllm_types(array_like=event_format == "array"))
    assert batch.events[0].block_hashes == hashes and batch.data_parallel_rank == 0
    with pytest.raises(msgspec.ValidationError):  # and the other form does not pass for this one
        msgspec.msgpack.decode(event_bytes, type=vllm_types(array_like=event_format != "array"))


async def test_store_evict_reset_events_in_order(make_fleet) -> None:
    # 16 blocks of 16 tokens: two 8-block prompts fill the cache, anything new evicts LRU.
    fleet = await make_fleet(config=sim_config(num_gpu_blocks=16, max_model_len=256))
    server = fleet.servers[0]
    kv = server.engine.scheduler.kv
    a, b, c = ids(1000, 128), ids(2000, 128), ids(3000, 64)
    async with KVEventsSubscriber(server.kv_events_endpoint) as sub:
        await sub.sync(lambda: reset_prefix_cache(server.url))
        batches: list[Batch] = []
        for prompt in (a, b, c, a):
            await complete(server.url, prompt)
            batches.append(await sub.next())
        assert set(stored_blocks(batches)) == set(kv.cached)  # a subscriber knows exactly what is cached
        assert await reset_prefix_cache(server.url) == 200
        cleared = await sub.next()

    ha, hb, hc = (block_hashes(p, 16, server.engine.hash_root) for p in (a, b, c))
    summary = [[(e["type"], e["block_hashes"], e.get("parent_block_hash")) for e in x.events] for x in batches]
    assert summary[0] == [("BlockStored", ha, None)]
    assert summary[1] == [("BlockStored", hb, None)]
    # c needs 4 blocks: the least recently used go first, a's tail before its head (freed tail first).
    assert summary[2] == [*[("BlockRemoved", [h], None) for h in reversed(ha[4:])], ("BlockStored", hc, None)]
    # a again: its head is a cache hit; its tail is recomputed, evicting b's tail; parent = a's block 3.
    assert summary[3] == [*[("BlockRemoved", [h], None) for h in reversed(hb[4:])], ("BlockStored", ha[4:], ha[3])]
    assert [x.seq for x in batches] == list(range(batches[0].seq, batches[0].seq + 4))
    assert cleared.types() == ["AllBlocksCleared"] and cleared.seq == batches[-1].seq + 1
    assert not kv.cached and stored_blocks([*batches, cleared]) == {}
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as resp:
        page = await resp.text()
    assert f'sim:kv_events_batches_total{{model_name="{MODEL}",engine="0"}} {float(cleared.seq + 1)}' in page


async def test_reset_refused_while_running_unless_asked(make_fleet) -> None:
    fleet = await make_fleet(config=sim_config(time_scale=0.2))
    server = fleet.servers[0]
    async with KVEventsSubscriber(server.kv_events_endpoint) as sub:
        await sub.sync(lambda: reset_prefix_cache(server.url))
        running = asyncio.create_task(complete(server.url, ids(1, 64), max_tokens=200))
        stored = await sub.next()
        assert stored.types() == ["BlockStored"]
        assert await reset_prefix_cache(server.url) == 409  # blocks in use, as vLLM
        assert await reset_prefix_cache(server.url, reset_running_requests=True) == 200
        assert (await sub.next()).types() == ["AllBlocksCleared"]
        # The preempted request recomputes (storing its blocks again) and still finishes.
        assert (await sub.next()).events[0]["block_hashes"] == stored.events[0]["block_hashes"]
        body = await running
        assert body["usage"]["completion_tokens"] == 200


# --- replay and restarts ------------------------------------------------------------------------------


async def test_replay_round_trip(make_fleet) -> None:
    fleet = await make_fleet(config=sim_config(kv_events=events_config(buffer_steps=4)))
    server = fleet.servers[0]
    async with KVEventsSubscriber(server.kv_events_endpoint) as sub:
        live = await sub.sync(lambda: reset_prefix_cache(server.url))
        for i in range(5):
            await complete(server.url, ids(100 * i, 20))
            live.append(await sub.next())
    last = live[-1].seq
    assert last >= 5
    # The buffer keeps the last buffer_steps batches, byte for byte as published.
    full = await replay(server.kv_replay_endpoint, 0)
    assert [(b.seq, b.topic, b.payload) for b in full] == [(b.seq, b.topic, b.payload) for b in live[-4:]]
    mid = await replay(server.kv_replay_endpoint, last - 1)
    assert [b.seq for b in mid] == [last - 1, last]
    assert await replay(server.kv_replay_endpoint, last + 1) == []  # only the end marker

    # Malformed requests are ignored; the socket keeps serving.
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        dealer.connect(server.kv_replay_endpoint)
        await dealer.send_multipart([b"", b"\x00\x01"])  # a 2-byte sequence
        await dealer.send_multipart([b"", last.to_bytes(8, "big")])
        frames = await asyncio.wait_for(dealer.recv_multipart(), 10)
        assert frames[0] == b"" and frames[1] == live[-1].topic and int.from_bytes(frames[2], "big") == last
        end = await asyncio.wait_for(dealer.recv_multipart(), 10)
        assert end == [b"", live[-1].topic, b"\xff" * 8, b""]  # the end marker: seq -1, empty payload
    finally:
        dealer.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("seed", [None, "7"])
async def test_restart_starts_the_sequence_at_zero(make_fleet, seed: str | None) -> None:
    fleet = await make_fleet(config=sim_config(hash_seed=seed))
    server = fleet.servers[0]
    endpoint, replay_endpoint = server.kv_events_endpoint, server.kv_replay_endpoint
    prompt = ids(7, 48)
    async with KVEventsSubscriber(endpoint) as sub:
        await sub.sync(lambda: reset_prefix_cache(server.url))
        await complete(server.url, prompt)
        before = await sub.next()
        assert before.seq > 0
        await server.restart()  # a new process: empty cache, new publisher on the same endpoints
        assert (server.kv_events_endpoint, server.kv_replay_endpoint) == (endpoint, replay_endpoint)
        assert not server.engine.scheduler.kv.cached
        await sub.sync(lambda: reset_prefix_cache(server.url))  # the SUB socket reconnects by itself
        await complete(server.url, prompt)
        after = await sub.next()
    replayed = await replay(replay_endpoint, 0)
    assert replayed[0].seq == 0 and replayed[-1].seq == after.seq < before.seq + 5
    same = after.events[0]["block_hashes"] == before.events[0]["block_hashes"]
    assert same == (seed is not None)  # unseeded hashes change with every start, as in vLLM


# --- render -------------------------------------------------------------------------------------------


async def test_render_returns_the_token_ids_the_events_carry(make_fleet) -> None:
    fleet = await make_fleet()
    server = fleet.servers[0]
    chat = {"model": "adapter-a", "messages": [{"role": "system", "content": "You are terse. " * 10},
                                               {"role": "user", "content": "Summarize the plot of Hamlet."}],
            "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5}
    completion = {"model": MODEL, "prompt": ["The quick brown fox jumps over the lazy dog. " * 4, "x" * 80],
                  "max_tokens": 1}
    chat_render = await post(server.url, "/v1/chat/completions/render", chat)
    completion_render = await post(server.url, "/v1/completions/render", completion)
    # vLLM's shapes: chat -> one GenerateRequest, completions -> one per prompt.
    assert isinstance(chat_render, dict) and isinstance(completion_render, list) and len(completion_render) == 2
    for reply in (chat_render, *completion_render):
        assert {"request_id", "token_ids", "features", "sampling_params", "model", "stream", "cache_salt",
                "priority"} <= set(reply)
    assert chat_render["model"] == "adapter-a" and chat_render["stream"] is True
    assert chat_render["stream_options"] == {"include_usage": True}
    assert chat_render["sampling_params"]["temperature"] == 0.5
    assert chat_render["sampling_params"]["max_tokens"] == 1
    async with KVEventsSubscriber(server.kv_events_endpoint) as sub:
        await sub.sync(lambda: reset_prefix_cache(server.url))
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/chat/completions", json=chat) as resp:
                assert resp.status == 200
                await resp.read()
        await post(server.url, "/v1/completions", completion)
        batches = await sub.until(lambda got: sum(len(b.events) for b in got) >= 3)
    stored = [e for b in batches for e in b.events]
    assert [e["type"] for e in stored] == ["BlockStored"] * 3
    for event, rendered in zip(stored, [chat_render, *completion_render]):
        ids_ = rendered["token_ids"]
        assert event["token_ids"] == ids_[: len(ids_) // 16 * 16]
    assert stored[0]["lora_name"] == "adapter-a" and stored[1]["lora_name"] is None
    # Malformed input gets vLLM's 400, not a crash.
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/chat/completions/render", json={"messages": "nope"}) as resp:
            assert resp.status == 400 and "messages" in (await resp.json())["error"]["message"]


# --- addresses, ports and the command line ----------------------------------------------------------


def random_loopback_block() -> str:
    """127.a.b. for random a, b: other test runs on this machine pick other blocks."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}."


def free_port_pair(host: str) -> int:
    """A port P such that P and P+1 are free on ``host``."""
    for _ in range(100):
        port = free_port(host)
        with socket.socket() as probe:
            try:
                probe.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports")


def test_config_parsing_and_endpoint_rules() -> None:
    assert KVEventsConfig().publisher == "null" and not KVEventsConfig().active
    on = KVEventsConfig.from_json('{"enable_kv_cache_events": true}')
    assert (on.publisher, on.endpoint, on.replay_endpoint, on.buffer_steps, on.hwm, on.max_queue_size, on.topic) == (
        "zmq", "tcp://*:5557", None, 10_000, 100_000, 100_000, "")
    assert not KVEventsConfig(enable_kv_cache_events=True, publisher="null").active
    for bad, needle in [('{"enable_kv_cache_events": true, "endpiont": "x"}', "endpiont"),
                        ('{"hwm": "10"}', "hwm"), ('{"publisher": "kafka"}', "publisher"), ("[1]", "object"),
                        ("{", "JSON"), ('{"enable_kv_cache_events": true, "endpoint": "tcp://nohost"}', "endpoint")]:
        with pytest.raises(ValueError, match=needle):
            KVEventsConfig.from_json(bad)
    # vLLM's bind-vs-connect rule, port offsets per rank, and * = the server's own address.
    assert binds("tcp://*:5557") and binds("tcp://[::]:5557") and binds("ipc:///tmp/x") and binds("inproc://x")
    assert not binds("tcp://epp.example:5557")
    assert offset_endpoint("tcp://*:5557", 2) == "tcp://*:5559" and offset_endpoint("inproc://x", 1) == "inproc://x_dp1"
    assert server_endpoint("tcp://*:5557", "127.0.0.3", 0) == "tcp://127.0.0.3:5557"
    assert server_endpoint("tcp://*:5557", "::1", 1) == "tcp://[::1]:5558"
    assert server_endpoint("tcp://10.0.0.9:5557", "127.0.0.3", 1) == "tcp://10.0.0.9:5558"  # connect: host kept
    assert expand_topic(TOPIC, "10.1.2.3", 8000, "m") == "kv@10.1.2.3:8000@m"


def test_host_and_hosts_flags_place_servers() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def where(*argv: str) -> list[tuple[str, int, int]]:
        return [(s.host, s.port, s.rank) for s in build_fleet(parser.parse_args(list(argv))).servers]

    assert where("--host", "127.0.0.5", "--ports", "9001,9002") == [("127.0.0.5", 9001, 0), ("127.0.0.5", 9002, 1)]
    assert where("--port", "9001", "--count", "2") == [("127.0.0.1", 9001, 0), ("127.0.0.1", 9002, 1)]
    assert where("--hosts", "127.0.0.2,127.0.0.3", "--port", "8000") == [("127.0.0.2", 8000, 0),
                                                                          ("127.0.0.3", 8000, 0)]
    assert where("--hosts", "127.0.0.2,127.0.0.3", "--ports", "8000,8001") == [("127.0.0.2", 8000, 0),
                                                                                ("127.0.0.3", 8001, 0)]
    with pytest.raises(ValueError, match="2 ports for 3 hosts"):
        where("--hosts", "a,b,c", "--ports", "1,2")
    with pytest.raises(SystemExit):  # argparse reports the bad JSON field by name
        parser.parse_args(["--kv-events-config", '{"enable_kv_cache_events": true, "port": 1}'])
    fleet = build_fleet(parser.parse_args(["--kv-events-config", '{"enable_kv_cache_events": true}',
                                           "--kv-events-format", "array", "--hash-seed", "3"]))
    cfg = fleet.servers[0].config
    assert cfg.kv_events is not None and cfg.kv_events.active and cfg.kv_events_format == "array"
    assert cfg.hash_seed == "3"


async def test_servers_sharing_an_address_offset_their_ports(make_fleet) -> None:
    base = free_port_pair("127.0.0.1")
    fleet = await make_fleet([0, 0], config=sim_config(kv_events=events_config(endpoint=f"tcp://*:{base}",
                                                                                replay_endpoint="tcp://*:*")))
    assert fleet.kv_events_endpoints == [f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}"]
    for rank, server in enumerate(fleet.servers):
        async with KVEventsSubscriber(server.kv_events_endpoint) as sub:
            batch = (await sub.sync(lambda: reset_prefix_cache(server.url)))[0]
        assert batch.data_parallel_rank == rank
        assert batch.topic == f"kv@127.0.0.1:{server.port}@{MODEL}".encode()


async def test_cli_pod_like_fleet_one_port_per_address() -> None:
    """``epp sim --hosts A,B --port P``: each server on its own address, events on one port number."""
    block = random_loopback_block()
    hosts = [block + "2", block + "3"]
    port, events_port, replay_port = free_port(hosts[0]), free_port(hosts[0]), free_port(hosts[0])
    config = ('{"enable_kv_cache_events": true, "endpoint": "tcp://*:%d", "replay_endpoint": "tcp://*:%d", '
              '"topic": "kv@$(POD_IP):$(POD_PORT)@{model}"}' % (events_port, replay_port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp.sim", "--hosts", ",".join(hosts), "--port", str(port), "--time-scale", "0.01",
        "--kv-events-config", config, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        ready = []
        while len(ready) < 2:
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
            assert line, (await proc.stderr.read()).decode()
            match = re.match(r"sim ready name=\S+ url=(\S+) .* kv_events=(\S+) kv_replay=(\S+)", line)
            if match:
                ready.append(match.groups())
        assert ready == [(f"http://{h}:{port}", f"tcp://{h}:{events_port}", f"tcp://{h}:{replay_port}")
                         for h in hosts]
        for host, (url, events, replay_endpoint) in zip(hosts, ready):
            async with KVEventsSubscriber(events) as sub:
                await sub.sync(lambda url=url: reset_prefix_cache(url))
                await complete(url, ids(1, 32))
                batch = await sub.next()
            assert batch.topic == f"kv@{host}:{port}@{MODEL}".encode() and batch.types() == ["BlockStored"]
            assert (await replay(replay_endpoint, batch.seq))[0].payload == batch.payload
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
