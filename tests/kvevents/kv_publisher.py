"""A vLLM-style KV-event publisher and a tiny prefix-caching engine, for the subscriber tests.

``EngineModel`` stands for one vLLM engine: a paged prefix cache (block hash chain computed
the way vLLM does it: SHA-256 over (parent digest, block tokens, extra keys), low 64 bits as
the int form, or the raw 32-byte digest), LRU eviction of idle blocks, ``reset`` and
``restart``. Every change produces the events vLLM emits (``BlockStored`` for newly cached
full blocks with their token_ids and parent, ``BlockRemoved`` on eviction,
``AllBlocksCleared`` on reset), grouped one batch per "engine step".

``Publisher`` encodes batches exactly like ``vllm.distributed.kv_events.ZmqEventPublisher``:
3 frames ``[topic, seq (8 bytes BE), msgpack([ts, events, dp_rank])]``, events in the map form
(tag under "type", defaulted fields omitted) or the legacy positional form, and serves replay
on a ROUTER in the topic form ``[identity, empty, topic, seq, payload]`` ending with seq -1.
It can run without sockets (``encode`` + an in-memory buffer) for the property tests.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
import time
from collections import OrderedDict
from typing import Any

import msgspec
import zmq

_enc = msgspec.msgpack.Encoder()


# --- the engine -------------------------------------------------------------------------------
class EngineModel:
    def __init__(self, block_size: int = 16, capacity: int = 64, int_hashes: bool = True, seed: bytes = b"x") -> None:
        self.block_size = block_size
        self.capacity = capacity
        self.int_hashes = int_hashes
        self.none_hash = hashlib.sha256(seed).digest()
        self.blocks: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()  # digest -> all tokens up to it (LRU)

    def wire(self, digest: bytes) -> Any:
        return int.from_bytes(digest[-8:], "big") if self.int_hashes else digest

    def store(self, tokens: list[int], medium: str = "GPU", lora_name: str | None = None) -> list[dict]:
        """Run a prompt: touch its cached prefix, cache its new full blocks (evicting LRU)."""
        bs = self.block_size
        if len(tokens) // bs > self.capacity // 2:
            raise ValueError("prompt too long for this model cache (keep it under half the capacity)")
        events: list[dict] = []
        parent = self.none_hash
        run: list[bytes] = []
        run_parent: bytes | None = None
        for i in range(len(tokens) // bs):
            block = tuple(tokens[i * bs:(i + 1) * bs])
            extra = (lora_name,) if lora_name else None
            digest = hashlib.sha256(pickle.dumps((parent, block, extra), protocol=5)).digest()
            if digest in self.blocks:
                self.blocks.move_to_end(digest)
                if run:
                    events.append(self._stored(run, run_parent, medium, lora_name))
                    run = []
            else:
                if len(self.blocks) >= self.capacity:
                    events.extend(self._evict(1))
                self.blocks[digest] = tuple(tokens[:(i + 1) * bs])
                if not run:
                    run_parent = None if i == 0 else parent
                run.append(digest)
            parent = digest
        if run:
            events.append(self._stored(run, run_parent, medium, lora_name))
        return events

    def _stored(self, run: list[bytes], parent: bytes | None, medium: str, lora_name: str | None) -> dict:
        bs = self.block_size
        tokens: list[int] = []
        for d in run:
            tokens.extend(self.blocks[d][-bs:])
        return {"type": "BlockStored", "block_hashes": [self.wire(d) for d in run],
                "parent_block_hash": None if parent is None else self.wire(parent),
                "token_ids": tokens, "block_size": bs, "lora_id": None, "medium": medium, "lora_name": lora_name}

    def _evict(self, n: int) -> list[dict]:
        """Evict the n least recently used blocks, children before parents (like vLLM's free queue)."""
        gone = []
        for _ in range(min(n, len(self.blocks))):
            # The LRU block might be a parent of a more recent one: evict leaves of its chain first.
            digest = next(iter(self.blocks))
            prefix = self.blocks[digest]
            leaf = max((d for d, p in self.blocks.items() if p[:len(prefix)] == prefix), key=lambda d: len(self.blocks[d]))
            del self.blocks[leaf]
            gone.append(leaf)
        return [{"type": "BlockRemoved", "block_hashes": [self.wire(d) for d in gone], "medium": "GPU"}] if gone else []

    def evict(self, n: int) -> list[dict]:
        return self._evict(n)

    def reset(self) -> list[dict]:
        self.blocks.clear()
        return [{"type": "AllBlocksCleared"}]

    def held_prefixes(self) -> list[tuple[int, ...]]:
        """The token prefix ending with each cached block."""
        return list(self.blocks.values())


# --- encoding ---------------------------------------------------------------------------------
_STORED_ORDER = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name")
_REMOVED_ORDER = ("block_hashes", "medium")


def positional(event: dict) -> list:
    """vLLM's legacy array_like form: tag, then fields in declaration order."""
    tag = event["type"]
    order = {"BlockStored": _STORED_ORDER, "BlockRemoved": _REMOVED_ORDER}.get(tag, ())
    return [tag, *(event[k] for k in order if k in event)]


def encode_batch(events: list[dict], form: str = "map", ts: float | None = None, rank: int = 0) -> bytes:
    evs = events if form == "map" else [positional(e) for e in events]
    return _enc.encode([time.time() if ts is None else ts, evs, rank])


class Publisher:
    """vLLM's ZmqEventPublisher, the parts a subscriber sees."""

    def __init__(self, endpoint: str | None = None, replay_endpoint: str | None = None, topic: str = "",
                 form: str = "map", buffer_steps: int = 10000) -> None:
        self.topic = topic.encode()
        self.form = form
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.buffer_steps = buffer_steps
        self._lock = threading.Lock()
        self.ctx = zmq.Context() if endpoint or replay_endpoint else None
        self.pub = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if endpoint:
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.bind(endpoint)
        if replay_endpoint:
            router = self.ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(replay_endpoint)
            self._thread = threading.Thread(target=self._serve_replay, args=(router,), daemon=True)
            self._thread.start()

    def publish(self, events: list[dict], *, send: bool = True) -> int:
        """Encode one batch with the next seq; ``send=False`` buffers it without sending (a lost message)."""
        payload = encode_batch(events, self.form)
        with self._lock:
            seq = self.seq
            self.seq += 1
            self.buffer.append((seq, payload))
            if len(self.buffer) > self.buffer_steps:
                del self.buffer[0]
        if send and self.pub is not None:
            self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def send_raw(self, frames: list[bytes]) -> None:
        assert self.pub is not None
        self.pub.send_multipart(frames)

    def restart(self) -> None:
        """A new publisher process: sequence from 0, empty replay buffer."""
        with self._lock:
            self.seq = 0
            self.buffer.clear()

    def replay_from(self, start: int) -> list[tuple[int, bytes]]:
        with self._lock:
            return [(s, p) for s, p in self.buffer if s >= start]

    def _serve_replay(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3:
                    continue  # vLLM ignores anything but [identity, empty, start_seq]
                ident, start = frames[0], int.from_bytes(frames[2], "big")
                for seq, payload in self.replay_from(start):
                    router.send_multipart([ident, b"", self.topic, seq.to_bytes(8, "big"), payload])
                router.send_multipart([ident, b"", self.topic, (-1).to_bytes(8, "big", signed=True), b""])
        finally:
            router.close(0)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self.pub is not None:
            self.pub.close(0)
        if self.ctx is not None:
            self.ctx.term()
