"""KV-cache events published like vLLM (``--kv-events-config``), over ZMQ.

Wire format (vLLM ``vllm/distributed/kv_events.py``):

- PUB socket, 3 frames per batch: ``[topic, seq as 8-byte big-endian, msgpack payload]``;
  ``seq`` starts at 0 with each publisher, so it restarts at 0 when a server restarts.
- payload = ``[ts, events, data_parallel_rank]`` (a msgpack array);
- events are msgspec tagged unions (we encode with vLLM's own struct layout): a map
  with the tag under ``"type"`` (vLLM since PR #42892) where fields still at their
  default are omitted, or with ``event_format="array"`` the older positional arrays
  ``[tag, field1, field2, ...]`` that carry every field (msgspec ignores
  ``omit_defaults`` for ``array_like`` structs, so vLLM's arrays are full too);
- an optional ROUTER socket replays buffered batches: request ``[empty, start_seq 8B BE]``;
  replies ``[empty, topic, seq, payload]`` for every buffered batch with seq >= start_seq,
  then ``[empty, topic, -1 as 8B signed BE, empty]`` (the topic form of vLLM PR #45177).

The engine hands one list of raw events per step to ``publish()``; a background
thread (as in vLLM) encodes, sends, keeps the replay buffer and answers replay
requests, so the engine's event loop only appends to a bounded queue.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgspec
import zmq

from epp.sim.kvcache import CLEARED, REMOVED, STORED

log = logging.getLogger(__name__)

MEDIUM_GPU = "GPU"
SPEC_KIND = "full_attention"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
EVENT_FORMATS = ("map", "array")
PUBLISHERS = ("zmq", "null")


# ---------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """vLLM's KVEventsConfig: same field names, same defaults."""

    enable_kv_cache_events: bool = False
    publisher: str | None = None  # "zmq" if enabled, else "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    def __post_init__(self) -> None:
        if self.publisher is None:
            object.__setattr__(self, "publisher", "zmq" if self.enable_kv_cache_events else "null")
        if self.publisher not in PUBLISHERS:
            raise ValueError(f"kv-events-config: publisher must be one of {PUBLISHERS}, got {self.publisher!r}")
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"kv-events-config: {name} must be >= 0")
        if self.active:
            for name in ("endpoint", "replay_endpoint"):
                value = getattr(self, name)
                if value is not None:
                    _check_endpoint(name, value)

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        """Parse the ``--kv-events-config`` JSON; errors name the offending field."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"kv-events-config: not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise ValueError("kv-events-config: expected a JSON object")
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> KVEventsConfig:
        types = {"enable_kv_cache_events": bool, "publisher": str, "endpoint": str, "replay_endpoint": str,
                 "buffer_steps": int, "hwm": int, "max_queue_size": int, "topic": str}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"kv-events-config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for name, value in data.items():
            want = types[name]
            nullable = name in ("publisher", "replay_endpoint")
            ok = (value is None and nullable) or (isinstance(value, want) and (want is bool or not isinstance(value, bool)))
            if not ok:
                raise ValueError(f"kv-events-config: {name} must be {want.__name__}, got {value!r}")
        return cls(**data)


def _check_endpoint(name: str, value: str) -> None:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"kv-events-config: {name} must start with tcp://, ipc:// or inproc://, got {value!r}")
    if value.startswith("tcp://"):
        host, sep, port = value[len("tcp://"):].rpartition(":")
        if not sep or not host or not (port == "*" or port.isdigit()):
            raise ValueError(f"kv-events-config: {name} must look like tcp://HOST:PORT, got {value!r}")


def binds(endpoint: str) -> bool:
    """vLLM's rule: bind if the endpoint has a wildcard or is local (ipc, inproc); otherwise connect."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def offset_endpoint(endpoint: str, rank: int) -> str:
    """The endpoint of data-parallel rank ``rank``: tcp port + rank, or an ``_dp<rank>`` suffix, as vLLM."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        if port == "*":
            return endpoint  # an OS-assigned port is distinct anyway
        return f"{base}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"


def server_endpoint(endpoint: str, host: str, rank: int) -> str:
    """Where one sim server's socket goes: rank-offset, and ``*`` as host = the server's own address.

    A sim server stands for a pod whose only interface is its ``--host``, so
    ``tcp://*:5557`` binds ``tcp://<host>:5557`` rather than every interface
    (several servers on 127.0.0.2, 127.0.0.3, ... can then all use 5557).
    """
    endpoint = offset_endpoint(endpoint, rank)
    if endpoint.startswith("tcp://"):
        hostpart, _, port = endpoint[len("tcp://"):].rpartition(":")
        if hostpart == "*":
            address = f"[{host}]" if ":" in host else host
            endpoint = f"tcp://{address}:{port}"
    return endpoint


def expand_topic(topic: str, host: str, port: int, model: str) -> str:
    """Fill per-server placeholders: ``{host}``/``$(POD_IP)``, ``{port}``/``$(POD_PORT)``, ``{model}``.

    ``kv@$(POD_IP):$(POD_PORT)@<model>`` is the topic llm-d's guides give vLLM
    (Kubernetes substitutes the variables); one sim process serves many "pods"
    from one flag, so it does the substitution itself.
    """
    return (topic.replace("$(POD_IP)", host).replace("$(POD_PORT)", str(port))
            .replace("{host}", host).replace("{port}", str(port)).replace("{model}", model))


# ---------------------------------------------------------------------------------
# wire types: vLLM's msgspec structs, in both encodings


class _MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class _ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


def _event_types(base: type) -> tuple[type, type, type]:
    class BlockStored(base):  # type: ignore[valid-type, misc]
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[Any] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemoved(base):  # type: ignore[valid-type, misc]
        block_hashes: list[int]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(base):  # type: ignore[valid-type, misc]
        pass

    return BlockStored, BlockRemoved, AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


_TYPES = {"map": _event_types(_MapEvent), "array": _event_types(_ArrayEvent)}


class EventEncoder:
    """Raw KVCache events -> one msgpack payload, in vLLM's map or array form."""

    __slots__ = ("_stored", "_removed", "_cleared", "block_size", "rank", "_encode")

    def __init__(self, block_size: int, rank: int = 0, event_format: str = "map") -> None:
        if event_format not in EVENT_FORMATS:
            raise ValueError(f"event format must be one of {EVENT_FORMATS}")
        self._stored, self._removed, cleared = _TYPES[event_format]
        self._cleared = cleared()
        self.block_size = block_size
        self.rank = rank
        self._encode = msgspec.msgpack.Encoder().encode

    def events(self, raw: Sequence[tuple[Any, ...]]) -> list[Any]:
        stored, removed, bs = self._stored, self._removed, self.block_size
        out: list[Any] = []
        for event in raw:
            tag = event[0]
            if tag == STORED:
                _, hashes, parent, token_ids, lora_id, lora_name = event
                # As vLLM 0.26: one extra-keys entry per block (the adapter name, else None).
                extra = [None if lora_name is None else (lora_name,)] * len(hashes)
                out.append(stored(hashes, parent, token_ids, bs, lora_id, MEDIUM_GPU, lora_name, extra, 0, SPEC_KIND))
            elif tag == REMOVED:
                out.append(removed([event[1]], MEDIUM_GPU, 0))
            elif tag == CLEARED:
                out.append(self._cleared)
        return out

    def payload(self, ts: float, raw: Sequence[tuple[Any, ...]]) -> bytes:
        return self._encode(KVEventBatch(ts, self.events(raw), self.rank))


# ---------------------------------------------------------------------------------
# publishers


class NullPublisher:
    """``publisher: null`` or events disabled: nothing is recorded or sent."""

    endpoint: str | None = None
    replay_endpoint: str | None = None
    addresses: Addresses | None = None
    enabled = False
    batches = events = dropped = 0

    def publish(self, raw: list[tuple[Any, ...]]) -> None:
        pass

    def close(self) -> None:
        pass


class ZmqPublisher:
    """vLLM's ZmqEventPublisher: PUB (+ optional replay ROUTER) served by a background thread.

    Sockets are created (bound or connected) in the constructor, so a taken
    port fails the server's start; after that only the thread touches them.
    Each publisher has its own ZMQ context, whose termination on ``close()``
    releases the ports at once: a restarted server can bind them again.
    """

    enabled = True

    def __init__(
        self,
        config: KVEventsConfig,
        *,
        endpoint: str,
        replay_endpoint: str | None,
        bind: bool,
        rank: int,
        topic: str,
        block_size: int,
        event_format: str = "map",
    ) -> None:
        """``endpoint`` and ``replay_endpoint`` are final (see server_endpoint); the rest of ``config`` applies."""
        self._encoder = EventEncoder(block_size, rank, event_format)
        self._topic = topic.encode("utf-8")
        self._queue: queue.Queue[tuple[float, list[tuple[Any, ...]]] | None] = queue.Queue(
            maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self.batches = 0  # published so far (also the next sequence number)
        self.events = 0
        self.dropped = 0  # batches refused because the thread died
        self._ctx = zmq.Context(io_threads=1)
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: zmq.Socket[bytes] | None = None
        self._bell_in: zmq.Socket[bytes] | None = None
        self._bell_out: zmq.Socket[bytes] | None = None
        try:
            self._open(config, endpoint, replay_endpoint, bind)
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{self.endpoint}", daemon=True)
        self._thread.start()

    def _open(self, config: KVEventsConfig, endpoint: str, replay_endpoint: str | None, bind: bool) -> None:
        ctx = self._ctx
        pub = self._pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, config.hwm)
        pub.setsockopt(zmq.LINGER, 0)
        if bind:
            pub.bind(endpoint)
            endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port of tcp://host:*
        else:
            pub.connect(endpoint)
        self.endpoint: str | None = endpoint
        self.replay_endpoint: str | None = None
        if replay_endpoint:
            replay = self._replay = ctx.socket(zmq.ROUTER)
            replay.setsockopt(zmq.LINGER, 0)
            # A ROUTER silently drops what exceeds a peer's high-water mark: let
            # one whole replay (the buffer plus its end marker) fit.
            replay.setsockopt(zmq.SNDHWM, max(1000, config.buffer_steps + 1))
            replay.bind(replay_endpoint)  # always bound, as vLLM
            self.replay_endpoint = replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self.addresses: Addresses | None = (endpoint, self.replay_endpoint, bind)
        # A doorbell so the thread sleeps in one poll on both the queue and the
        # replay socket, yet wakes at once for either.
        self._bell_in = ctx.socket(zmq.PAIR)
        self._bell_out = ctx.socket(zmq.PAIR)
        name = f"inproc://kv-events-bell-{id(self)}"
        self._bell_in.bind(name)
        self._bell_out.connect(name)

    # -- the engine's side (event loop thread) ----------------------------------------

    def publish(self, raw: list[tuple[Any, ...]]) -> None:
        """Queue one engine step's events as a batch (blocks only if max_queue_size batches are pending, as vLLM)."""
        if not self._thread.is_alive():  # it crashed (logged): never block the engine on a dead queue
            self.dropped += 1
            return
        self._queue.put((time.time(), raw))
        self._ring()

    def _ring(self) -> None:
        try:
            self._bell_out.send(b"", zmq.NOBLOCK)  # type: ignore[union-attr]
        except zmq.Again:
            pass  # the thread has plenty of wake-ups pending already

    def close(self) -> None:
        """Send what is queued, stop the thread and release the sockets (idempotent)."""
        if self._ctx.closed:
            return
        if self._thread.is_alive():
            self._queue.put(None)
            self._ring()
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.warning("kv-events publisher thread did not stop; %d batches unsent", self._queue.qsize())
                return  # the daemon thread still owns the sockets; never close them under it
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay, self._bell_in, self._bell_out):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("kv-events publisher thread crashed; no more events from %s", self.endpoint)

    def _loop(self) -> None:
        poller = zmq.Poller()
        assert self._bell_in is not None
        poller.register(self._bell_in, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._bell_in in ready:
                while True:  # drain the doorbell, then the queue
                    try:
                        self._bell_in.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                if not self._drain():
                    return
            if self._replay is not None and self._replay in ready:
                try:
                    self._serve_replay()
                except Exception:
                    log.exception("kv-events replay failed")

    def _drain(self) -> bool:
        """Publish every queued batch; False once the stop sentinel is seen."""
        q = self._queue
        pub = self._pub
        assert pub is not None
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            ts, raw = item
            try:
                payload = self._encoder.payload(ts, raw)
                seq = self.batches
                pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), copy=False)
                self._buffer.append((seq, payload))
                self.batches = seq + 1
                self.events += len(raw)
            except Exception:
                log.exception("kv-events publish failed")

    def _serve_replay(self) -> None:
        replay = self._replay
        assert replay is not None
        while True:
            try:
                frames = replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] or len(frames[2]) != 8:
                log.warning("kv-events: ignoring a malformed replay request (%d frames)", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            topic = self._topic
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    replay.send_multipart((client, b"", topic, seq.to_bytes(8, "big"), payload), copy=False)
            replay.send_multipart((client, b"", topic, END_SEQ, b""))


Publisher = NullPublisher | ZmqPublisher
# (events endpoint, replay endpoint, whether the events socket binds)
Addresses = tuple[str, str | None, bool]


def make_publisher(
    config: KVEventsConfig | None,
    *,
    host: str,
    port: int,
    rank: int,
    model: str,
    block_size: int,
    event_format: str = "map",
    addresses: Addresses | None = None,
) -> Publisher:
    """The publisher of one server. ``addresses`` (a previous start's ``publisher.addresses``)
    pins where it goes: a restart binds (or connects to) the same ones, ``*`` ports included."""
    if config is None or not config.active:
        return NullPublisher()
    if addresses is not None:
        endpoint, replay, bind = addresses
    else:
        bind = binds(config.endpoint)  # decided on the configured form: our * substitution keeps it a bind
        endpoint = server_endpoint(config.endpoint, host, rank)
        replay = server_endpoint(config.replay_endpoint, host, rank) if config.replay_endpoint else None
    return ZmqPublisher(config, endpoint=endpoint, replay_endpoint=replay, bind=bind, rank=rank,
                        topic=expand_topic(config.topic, host, port, model), block_size=block_size,
                        event_format=event_format)
