"""The ZMQ subscriber against a publisher that encodes exactly like vLLM (tests/kvevents/kv_publisher.py):
both event forms and both hash forms, replay round trips, restarts, garbage, central mode.

Pod-like endpoints: publishers on distinct random loopback addresses sharing one port.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import zmq
from kv_helpers import common_free_port, eventually, published
from kv_publisher import EngineModel, Publisher, encode_batch

from epp.kvcache.hasher import BlockHasher
from epp.kvcache.index import BlockIndex
from epp.kvevents.config import KVEventsConfig, PodDiscoveryConfig
from epp.kvevents.ingest import Ingestor
from epp.kvevents.manager import Subscriptions

pytestmark = pytest.mark.asyncio
_rng = random.Random(3)
SYSTEM = [_rng.randrange(100_000) for _ in range(48)]


def expected(engine: EngineModel, hasher: BlockHasher) -> set[int]:
    per = engine.block_size // hasher.block_size
    out: set[int] = set()
    for prefix in engine.held_prefixes():
        out.update(hasher.keys(list(prefix), hasher.root())[-per:])
    return out


class Rig:
    """Subscriptions + index for some loopback endpoints sharing (event, replay) ports."""

    def __init__(self, hosts: list[str], replay: bool = True, **cfg) -> None:  # cfg: KVEventsConfig fields
        self.hosts = hosts
        self.port, self.replay_port = common_free_port(hosts), common_free_port(hosts)
        pd = PodDiscoveryConfig(socketPort=self.port, replaySocketPort=self.replay_port if replay else None)
        self.config = KVEventsConfig(podDiscoveryConfig=pd, **cfg)
        self.hasher = BlockHasher(16)
        self.index = BlockIndex()
        self.ingestor = Ingestor(self.hasher, self.index)
        self.subs = Subscriptions(self.config, self.ingestor)

    def key(self, host: str) -> str:
        return f"{host}:8000"

    def publisher(self, host: str, **kw) -> Publisher:
        return Publisher(f"tcp://{host}:{self.port}", f"tcp://{host}:{self.replay_port}",
                         topic=f"kv@{self.key(host)}@m", **kw)

    def status(self, host: str) -> dict:
        return next(s for s in self.subs.statuses() if s["endpoint"] == self.key(host))


async def test_decodes_both_event_forms_and_both_hash_forms(loopback):
    hosts = [loopback + "2", loopback + "3"]
    rig = Rig(hosts)
    await rig.subs.start()
    pubs = [rig.publisher(hosts[0], form="map"), rig.publisher(hosts[1], form="array")]
    engines = [EngineModel(16, 64, int_hashes=True), EngineModel(32, 64, int_hashes=False)]  # 32: engine != index size
    try:
        for h in hosts:
            rig.subs.track(rig.key(h), h)
        await eventually(lambda: all(rig.status(h)["connected"] for h in hosts), what="connections")
        for i in range(12):
            for pub, engine in zip(pubs, engines):
                tokens = SYSTEM + [_rng.randrange(100_000) for _ in range(_rng.randrange(0, 80))]
                events = engine.store(tokens)
                if i % 4 == 3:
                    events += engine.evict(2)
                if events:
                    pub.publish(events)
        for h, engine in zip(hosts, engines):
            try:
                await eventually(lambda h=h, e=engine: set(rig.index.holdings(rig.key(h))) == expected(e, rig.hasher),
                                 what=f"index of {h} to equal the engine's blocks")
            except AssertionError as e:
                raise AssertionError(f"{e}: {rig.status(h)} {rig.ingestor.counters}") from None
        # A request sharing the system prompt matches 3 blocks on both; unknown endpoints none.
        keys = rig.hasher.keys(SYSTEM + [1] * 20, rig.hasher.root())
        m = rig.index.match(keys, [rig.key(h) for h in hosts] + ["127.0.0.9:1"])
        assert m == {rig.key(h): (3, 3.0) for h in hosts}
        assert rig.ingestor.counters.skipped == {}
    finally:
        await rig.subs.stop()
        for p in pubs:
            p.close()


async def test_replay_fills_what_was_missed_and_a_restart_clears(loopback):
    host = loopback + "4"
    rig = Rig([host])
    pub = rig.publisher(host)
    engine = EngineModel(16, 64)
    await rig.subs.start()
    try:
        # History before we subscribe: the first live message triggers a replay from 0.
        for _ in range(5):
            pub.publish(engine.store(SYSTEM + [_rng.randrange(100_000) for _ in range(40)]))
        rig.subs.track(rig.key(host), host)
        await eventually(lambda: rig.status(host)["connected"], what="connection")
        pub.publish(engine.store(SYSTEM + [_rng.randrange(100_000) for _ in range(40)]))
        await published([pub], lambda: set(rig.index.holdings(rig.key(host))) == expected(engine, rig.hasher),
                        what="replayed history")
        st = rig.status(host)
        assert st["replays"] >= 1 and st["last_seq"] == pub.seq - 1
        # A lost message (a gap) is repaired from the replay buffer by the next one.
        pub.publish(engine.store(SYSTEM + [_rng.randrange(100_000) for _ in range(40)]), send=False)
        last = pub.publish(engine.evict(3))
        await eventually(lambda: rig.status(host)["last_seq"] == last, what="gap repair")
        assert set(rig.index.holdings(rig.key(host))) == expected(engine, rig.hasher)
        assert rig.status(host)["gaps"] >= 1
        # The publisher process restarts: new socket, empty cache, sequence from 0.
        pub.close()
        await eventually(lambda: not rig.status(host)["connected"], what="disconnect")
        engine = EngineModel(16, 64)
        pub = rig.publisher(host)
        await eventually(lambda: rig.status(host)["connected"], what="reconnect")
        for _ in range(3):
            pub.publish(engine.store(SYSTEM[:16] + [_rng.randrange(100_000) for _ in range(32)]))
        await published([pub], lambda: set(rig.index.holdings(rig.key(host))) == expected(engine, rig.hasher),
                        what="the restarted engine's blocks only")
        assert rig.status(host)["restarts"] == 1
        # The endpoint leaves the pool: its blocks go too.
        await rig.subs.untrack(rig.key(host))
        assert rig.index.entries(rig.key(host)) == 0
    finally:
        await rig.subs.stop()
        pub.close()


async def test_a_lost_publisher_is_not_matched_until_its_stream_resumes(loopback):
    # The config has no replay socket. A restarted engine must not keep attracting its old
    # prefixes on stale blocks until its first new batch; a network blip must not lose them.
    host = loopback + "5"
    rig = Rig([host], replay=False)
    key = rig.key(host)
    pub = rig.publisher(host)
    engine = EngineModel(16, 64)
    probe = rig.hasher.keys(SYSTEM, rig.hasher.root())
    await rig.subs.start()
    try:
        rig.subs.track(key, host)
        await eventually(lambda: rig.status(host)["connected"], what="connection")
        await published([pub], lambda: rig.status(host)["last_seq"] is not None, what="a first batch")
        pub.publish(engine.store(SYSTEM + [_rng.randrange(100_000) for _ in range(40)]))
        await published([pub], lambda: rig.index.match(probe, [key]) == {key: (3, 3.0)}, what="the prefix")
        # The connection drops: the blocks are kept but not matched.
        pub.close()
        await eventually(lambda: rig.status(host)["suspended"], what="suspension")
        assert rig.index.match(probe, [key]) == {} and rig.index.entries(key) > 0
        # A blip: the same engine's stream goes on where it was: matched again, nothing cleared.
        pub = rig.publisher(host)
        pub.seq = engine_seq = rig.status(host)["last_seq"] + 1
        await published([pub], lambda: not rig.status(host)["suspended"], what="the stream to resume")
        assert rig.index.match(probe, [key]) == {key: (3, 3.0)}
        assert rig.status(host)["restarts"] == 0 and rig.status(host)["last_seq"] >= engine_seq
        # A restart: suspended at the disconnect, then cleared by the new sequence.
        pub.close()
        await eventually(lambda: rig.status(host)["suspended"], what="suspension")
        assert rig.index.match(probe, [key]) == {}
        engine = EngineModel(16, 64)
        pub = rig.publisher(host)
        await published([pub], lambda: rig.status(host)["restarts"] == 1, what="the restart to be seen")
        assert not rig.status(host)["suspended"] and rig.index.entries(key) == 0
        pub.publish(engine.store(SYSTEM[:16] + [_rng.randrange(100_000) for _ in range(32)]))
        await published([pub], lambda: set(rig.index.holdings(key)) == expected(engine, rig.hasher),
                        what="the restarted engine's blocks only")
        assert rig.index.match(probe, [key]) == {key: (1, 1.0)}
    finally:
        await rig.subs.stop()
        pub.close()


async def test_garbage_is_counted_and_never_stops_the_stream(loopback, caplog):
    host = loopback + "5"
    rig = Rig([host], replay=False)
    pub = rig.publisher(host)
    engine = EngineModel(16, 64)
    await rig.subs.start()
    try:
        rig.subs.track(rig.key(host), host)
        # Until the subscription is through, PUB drops messages: probe with empty batches.
        while rig.status(host)["messages"] == 0:
            pub.publish([])
            await asyncio.sleep(0.05)
        seq = pub.seq
        topic = pub.topic
        pub.send_raw([topic, b"\x00\x01"])  # 2 frames
        pub.send_raw([topic, b"\x01\x02\x03", b"\x90"])  # bad sequence frame
        for _ in range(3):
            pub.send_raw([topic, seq.to_bytes(8, "big"), b"\xc1 not msgpack"])
            seq += 1
        pub.send_raw([topic, seq.to_bytes(8, "big"),
                      encode_batch([{"type": "NewFancyEvent", "x": 1}, ["BlockStored", "not-a-list"],
                                    {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": 999,
                                     "token_ids": list(range(16)), "block_size": 16, "lora_id": None,
                                     "medium": "GPU", "lora_name": None}])])
        seq += 1
        pub.seq = seq
        events = engine.store(SYSTEM)
        pub.publish(events)
        await eventually(lambda: set(rig.index.holdings(rig.key(host))) == expected(engine, rig.hasher),
                         what="a valid batch after the garbage")
        st = rig.status(host)
        assert st["errors"] == {"bad-sequence": 1, "decode": 3}
        assert rig.subs.errors == {"frames": 1}
        assert rig.ingestor.counters.skipped == {"unknown-type": 1, "malformed": 1, "unknown-parent": 1}
        warnings = [r.getMessage() for r in caplog.records if "kv-events" in r.getMessage()]
        assert sum("decode" in w for w in warnings) == 1  # logged once, counted always
    finally:
        await rig.subs.stop()
        pub.close()


async def test_central_mode_binds_and_attributes_by_topic(loopback):
    port = common_free_port([loopback + "1"])
    hasher = BlockHasher(16)
    index = BlockIndex()
    ingestor = Ingestor(hasher, index)
    subs = Subscriptions(KVEventsConfig(zmqEndpoint=f"tcp://{loopback}1:{port}", discoverPods=False), ingestor)
    await subs.start()
    ctx = zmq.Context()
    socks: list[tuple[str, zmq.Socket]] = []
    engines = {}
    seqs: dict[str, int] = {}

    def send(key: str, sock: zmq.Socket, events: list[dict]) -> None:
        sock.send_multipart([f"kv@{key}@m".encode(), seqs[key].to_bytes(8, "big"), encode_batch(events)])
        seqs[key] += 1

    try:
        for n in (2, 3):
            key = f"{loopback}{n}:8000"
            s = ctx.socket(zmq.PUB)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://{loopback}1:{port}")  # vLLM connects when its endpoint has no '*'
            socks.append((key, s))
            engines[key] = EngineModel(16, 64)
            seqs[key] = 0
        bad = ctx.socket(zmq.PUB)
        bad.setsockopt(zmq.LINGER, 0)
        bad.connect(f"tcp://{loopback}1:{port}")
        # PUB drops until its connection is up: step with empty batches until both are heard.
        heard = lambda: {s["endpoint"] for s in subs.statuses() if s["messages"]} >= set(engines)  # noqa: E731
        while not heard() or not subs.errors.get("unidentified-topic"):
            for key, sock in socks:
                send(key, sock, [])
            bad.send_multipart([b"kv@bad-topic", b"\x00" * 8, encode_batch([])])
            await asyncio.sleep(0.05)
        for _ in range(5):
            for key, sock in socks:
                send(key, sock, engines[key].store([_rng.randrange(100_000) for _ in range(32)]))
        for k, e in engines.items():
            await eventually(lambda k=k, e=e: set(index.holdings(k)) == expected(e, hasher), what=f"index of {k}")
        bad.close(0)
    finally:
        await subs.stop()
        for _, sock in socks:
            sock.close(0)
        ctx.term()


async def test_a_flooding_publisher_neither_starves_others_nor_grows_memory(loopback):
    import threading

    hosts = [loopback + "6", loopback + "7"]
    rig = Rig(hosts, replay=False, hwm=1000)
    rig.index = BlockIndex(capacity=500)  # a tight bound, to see it hold
    rig.ingestor = Ingestor(rig.hasher, rig.index, max_blocks_per_source=500)
    rig.subs = Subscriptions(rig.config, rig.ingestor)
    flood, quiet = rig.publisher(hosts[0]), rig.publisher(hosts[1])
    await rig.subs.start()
    stop = threading.Event()
    thread: threading.Thread | None = None
    try:
        for h in hosts:
            rig.subs.track(rig.key(h), h)
        await eventually(lambda: all(rig.status(h)["connected"] for h in hosts), what="connections")
        rnd = random.Random(9)

        def spray() -> None:  # as fast as ZMQ takes it: far more than we can apply
            while not stop.is_set():
                flood.publish([{"type": "BlockStored", "block_hashes": [rnd.getrandbits(64)], "parent_block_hash": None,
                                "token_ids": [rnd.randrange(1000) for _ in range(16)], "block_size": 16,
                                "lora_id": None, "medium": "GPU", "lora_name": None}])

        thread = threading.Thread(target=spray, daemon=True)
        thread.start()
        await eventually(lambda: rig.status(hosts[0])["messages"] > 2000, what="the flood arriving")
        engine = EngineModel(16, 64)
        quiet.publish(engine.store(SYSTEM))
        await published([quiet], lambda: set(rig.index.holdings(rig.key(hosts[1]))) == expected(engine, rig.hasher),
                         what="the quiet publisher's blocks, during the flood")
        await eventually(lambda: rig.status(hosts[0])["messages"] > 6000, what="more flood")
        assert len(rig.index) <= 500 and rig.index.evictions > 0  # bounded, and the bound did the work
        assert rig.ingestor.blocks(rig.key(hosts[0])) <= 500
    finally:
        stop.set()
        if thread is not None:
            thread.join(5)
        await rig.subs.stop()
        flood.close()
        quiet.close()
