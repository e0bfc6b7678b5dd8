"""A small vLLM KV-events client for tests: subscribe, decode with plain msgpack, replay.

Decoding uses ``msgpack`` (not msgspec, which the sim encodes with), following
vLLM's spec independently of the encoder:

    frames  = [topic, seq (8-byte big-endian), payload]
    payload = [ts, events, data_parallel_rank]                 (msgpack array)
    event   = {"type": "BlockStored", "block_hashes": [...], ...}   (map form, vLLM >= PR #42892)
            | ["BlockStored", block_hashes, parent, ...]            (older positional form)

Events come out as dicts in the map form whatever the wire form was (missing
positional fields read as None, like an omitted map field).

    async with KVEventsSubscriber(server.kv_events_endpoint) as sub:
        await sub.sync(lambda: reset_prefix_cache(server.url))   # subscription is live
        batch = await sub.next()
    batches = await replay(server.kv_replay_endpoint, start_seq=0)

Usable from any test (tests/ is on sys.path): ``from kvevents_support import ...``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import zmq
import zmq.asyncio

# vLLM's field order, for the positional (array_like) form.
FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                    "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}
END_SEQ = -1


@dataclass
class Batch:
    topic: bytes
    seq: int
    ts: float
    events: list[dict[str, Any]]
    data_parallel_rank: int | None
    payload: bytes  # the raw msgpack, for byte-level checks

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


def normalize_event(raw: Any) -> dict[str, Any]:
    """A decoded event in either vLLM form -> the map form."""
    if isinstance(raw, dict):
        if not isinstance(raw.get("type"), str):
            raise ValueError(f"event map without a string 'type': {raw!r}")
        return dict(raw)
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        names = FIELDS.get(raw[0], ())
        values = raw[1:]
        if len(values) > len(names):
            raise ValueError(f"{raw[0]} has {len(values)} fields, vLLM defines {len(names)}")
        event: dict[str, Any] = {"type": raw[0]}
        event.update(zip(names, values))
        for name in names[len(values):]:
            event[name] = None
        return event
    raise ValueError(f"not a vLLM KV event: {raw!r}")


def decode_payload(payload: bytes) -> tuple[float, list[dict[str, Any]], int | None]:
    """(ts, events, data_parallel_rank) of one batch payload."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if isinstance(batch, dict):  # tolerated: a batch struct without array_like
        ts, events, rank = batch["ts"], batch["events"], batch.get("data_parallel_rank")
    else:
        ts, events = batch[0], batch[1]
        rank = batch[2] if len(batch) > 2 else None
    return ts, [normalize_event(e) for e in events], rank


def decode_frames(frames: list[bytes]) -> Batch:
    topic, seq, payload = frames
    if len(seq) != 8:
        raise ValueError(f"sequence frame of {len(seq)} bytes, want 8")
    ts, events, rank = decode_payload(payload)
    return Batch(topic, int.from_bytes(seq, "big"), ts, events, rank, payload)


class KVEventsSubscriber:
    """An asyncio SUB socket on one or more publishers (safe beside an in-process sim fleet)."""

    def __init__(self, endpoints: str | Iterable[str], topic: bytes = b"") -> None:
        self._ctx = zmq.asyncio.Context()
        self.sock = self._ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        for endpoint in [endpoints] if isinstance(endpoints, str) else endpoints:
            self.sock.connect(endpoint)

    async def __aenter__(self) -> KVEventsSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close(linger=0)
        self._ctx.term()

    async def next(self, timeout: float = 10.0) -> Batch:
        frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        return decode_frames(frames)

    async def drain(self, quiet: float = 0.2) -> list[Batch]:
        """Every batch that arrives until none has come for ``quiet`` seconds."""
        out = []
        while True:
            try:
                out.append(await self.next(timeout=quiet))
            except TimeoutError:
                return out

    async def until(self, predicate: Callable[[list[Batch]], bool], timeout: float = 10.0) -> list[Batch]:
        """Collect batches until ``predicate(all collected so far)`` holds."""
        out: list[Batch] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(out):
            out.append(await self.next(timeout=max(0.0, deadline - loop.time())))
        return out

    async def sync(self, probe: Callable[[], Awaitable[object]], timeout: float = 10.0) -> list[Batch]:
        """Make sure the subscription is live: run ``probe`` (something that publishes) until a batch arrives.

        A SUB socket misses what is published before its subscription reaches
        the publisher; after one batch arrived, nothing later is missed. Returns
        the batches received while probing.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await probe()
            try:
                first = await self.next(timeout=0.1)
            except TimeoutError:
                if loop.time() > deadline:
                    raise
                continue
            return [first, *await self.drain(quiet=0.1)]


async def replay(endpoint: str, start_seq: int = 0, timeout: float = 10.0) -> list[Batch]:
    """Ask a replay ROUTER for every buffered batch from ``start_seq``; stops at the end marker.

    The reply frames (after the empty delimiter) are ``[topic, seq, payload]``;
    the end marker has seq -1 and an empty payload.
    """
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    try:
        sock.connect(endpoint)
        await sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
        out = []
        while True:
            frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
            empty, topic, seq, payload = frames
            assert empty == b"", frames
            if int.from_bytes(seq, "big", signed=True) == END_SEQ:
                assert payload == b"", frames
                return out
            out.append(decode_frames([topic, seq, payload]))
    finally:
        sock.close(linger=0)
        ctx.term()


async def reset_prefix_cache(url: str, reset_running_requests: bool = False) -> int:
    """POST /reset_prefix_cache on a sim (or vLLM) server; returns the HTTP status."""
    query = "?reset_running_requests=true" if reset_running_requests else ""
    async with aiohttp.ClientSession() as session, session.post(f"{url}/reset_prefix_cache{query}") as resp:
        return resp.status


def stored_blocks(batches: Iterable[Batch]) -> dict[int, tuple[int | None, list[int]]]:
    """Apply batches in order: engine hash -> (parent hash, that block's token ids), as a subscriber's index would."""
    blocks: dict[int, tuple[int | None, list[int]]] = {}
    for batch in batches:
        for event in batch.events:
            kind = event["type"]
            if kind == "BlockStored":
                bs = event["block_size"]
                parent = event["parent_block_hash"]
                for i, h in enumerate(event["block_hashes"]):
                    blocks[h] = (parent, event["token_ids"][i * bs : (i + 1) * bs])
                    parent = h
            elif kind == "BlockRemoved":
                for h in event["block_hashes"]:
                    blocks.pop(h, None)
            elif kind == "AllBlocksCleared":
                blocks.clear()
    return blocks
