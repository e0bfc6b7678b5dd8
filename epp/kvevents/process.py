"""The KV-event subscriber in its own process (``subscriberMode: process``, the default).

The child owns the ZMQ sockets, the sessions (sequence, replay), msgpack decoding and the
engine-key side of the index (``Ingestor``); its sink records index writes, and every
``flush_interval`` the batch of writes ``(op, endpoint, tier, keys)`` goes to the serving
process, which applies them to its ``BlockIndex``: ~0.3 µs per key, against ~10-20 µs of
decoding and hashing per event in the child. Every second the child also sends its
subscription statuses and counters (for /debug and the metrics).

The child follows the pool through ``track``/``untrack`` messages. If it dies, the serving
process clears the whole index (what the child knew about engine keys is gone with it) and
starts a new child after ``restart_delay``, which subscribes again and replays from 0.

Backpressure: when the pipe to the serving process backs up past ``PIPE_HIGH_WATER``, the
child stops reading its sockets until it drains; publishers then hit ZMQ's high-water mark,
which shows up as gaps and replays, never as unbounded memory.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from epp.datalayer.childproc import ChildProcess, FdPair, drain, frame, open_pipes, read_msg, run_child
from epp.kvcache.hasher import BlockHasher
from epp.kvcache.index import GPU, BlockIndex
from epp.kvevents.config import KVEventsConfig
from epp.kvevents.feed import feed_counters
from epp.kvevents.ingest import Ingestor
from epp.kvevents.manager import Subscriptions

log = logging.getLogger(__name__)

ADD, REMOVE, CLEAR, SUSPEND, RESUME = 0, 1, 2, 3, 4
PIPE_HIGH_WATER = 32 << 20


class FeedProcessError(RuntimeError):
    pass


class Recorder:
    """An index sink that records writes for the serving process.

    Consecutive writes of the same kind to the same endpoint and tier are merged into one
    (engines report evictions one block per event): far fewer objects to pickle and apply.
    """

    def __init__(self) -> None:
        self.ops: list[tuple[int, str, str, list[int]]] = []

    def _record(self, op: int, endpoint: str, keys: Sequence[int], tier: str) -> None:
        ops = self.ops
        if ops:
            last = ops[-1]
            if last[0] == op and last[1] == endpoint and last[2] == tier:
                last[3].extend(keys)
                return
        ops.append((op, endpoint, tier, list(keys)))

    def add(self, endpoint: str, keys: Sequence[int], tier: str = GPU) -> None:
        self._record(ADD, endpoint, keys, tier)

    def remove(self, endpoint: str, keys: Sequence[int], tier: str = GPU) -> None:
        self._record(REMOVE, endpoint, keys, tier)

    def clear(self, endpoint: str) -> None:
        self.ops.append((CLEAR, endpoint, "", ()))

    def suspend(self, endpoint: str) -> None:
        self.ops.append((SUSPEND, endpoint, "", ()))

    def resume(self, endpoint: str) -> None:
        self.ops.append((RESUME, endpoint, "", ()))

    def take(self) -> list[tuple[int, str, str, list[int]]]:
        ops, self.ops = self.ops, []
        return ops


def apply_ops(index: BlockIndex, ops: list[tuple[int, str, str, list[int]]]) -> None:
    add, remove, clear = index.add, index.remove, index.clear
    for op, endpoint, tier, keys in ops:
        if op == ADD:
            add(endpoint, keys, tier)
        elif op == REMOVE:
            remove(endpoint, keys, tier)
        elif op == CLEAR:
            clear(endpoint)
        elif op == SUSPEND:
            index.suspend(endpoint)
        else:
            index.resume(endpoint)


class ProcessFeed:
    def __init__(self, config: KVEventsConfig, hasher: BlockHasher, index: BlockIndex, *,
                 flush_interval: float = 0.01, status_interval: float = 1.0, restart_delay: float = 1.0,
                 nice: int = 5) -> None:
        self.config = config
        self.index = index
        options = {"block_size": hasher.block_size, "hash_seed": hasher.seed_text, "max_blocks": index.capacity,
                   "flush_interval": flush_interval, "status_interval": status_interval, "nice": nice}
        level = logging.getLogger("epp").getEffectiveLevel()
        self.child = ChildProcess("kv-events process", _child_main, (config, options, level),
                                  on_message=self._on_message, error=FeedProcessError, on_spawn=self._send_tracked,
                                  on_exit=self._forget_all, restart_delay=restart_delay,
                                  stale="the precise prefix index is empty")
        self.lora_names: set[str] = set()
        self._tracked: dict[str, str] = {}
        self._statuses: list[dict] = []
        self._counters: dict = feed_counters_empty()

    async def start(self) -> None:
        await self.child.start()

    async def stop(self) -> None:
        await self.child.stop()

    def _on_message(self, msg: Any) -> None:
        kind = msg[0]
        if kind == "ops":
            apply_ops(self.index, msg[1])
        elif kind == "status":
            self._statuses, self._counters, names, logs = msg[1], msg[2], msg[3], msg[4]
            self.lora_names.update(names)
            for level, name, text in logs:
                logging.getLogger(name).log(level, "%s", text)

    def _send_tracked(self) -> None:
        for key, address in self._tracked.items():
            self.child.send(("track", key, address))

    def _forget_all(self) -> None:
        """The child died with what it knew of the engines' blocks: start over from replays."""
        for ep in self.index.endpoints():
            self.index.clear(ep)
        self._statuses = []

    # --- pool -> child ------------------------------------------------------------------------
    def track(self, key: str, address: str) -> None:
        self._tracked[key] = address
        self.child.send(("track", key, address))

    def untrack(self, key: str) -> None:
        self._tracked.pop(key, None)
        self.child.send(("untrack", key))
        self.index.clear(key)  # at once; the child's own clear follows

    def statuses(self) -> list[dict]:
        return self._statuses

    def counters(self) -> dict:
        return self._counters


def feed_counters_empty() -> dict:
    return {"stored": 0, "removed": 0, "cleared": 0, "skipped": {}, "transport_errors": {}}


# --- the child ------------------------------------------------------------------------------------
def _child_main(fds: FdPair, config: KVEventsConfig, options: dict[str, Any], level: int) -> None:
    run_child(_child, fds, config, options, level, nice=options.get("nice", 0))


class _Logs(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            if len(self.records) < 1000:
                self.records.append((record.levelno, record.name, msg))
        except Exception:
            pass


async def _child(fds: FdPair, config: KVEventsConfig, options: dict[str, Any], level: int) -> None:
    reader, _, writer = await open_pipes(fds.read_fd, fds.write_fd)
    logs = _Logs()
    root = logging.getLogger()
    root.handlers[:] = [logs]
    root.setLevel(level)
    recorder = Recorder()
    ingestor = Ingestor(BlockHasher(options["block_size"], options["hash_seed"]), recorder,
                        max_blocks_per_source=options["max_blocks"])
    gate = asyncio.Event()
    gate.set()
    subs = Subscriptions(config, ingestor, gate=gate)

    def send(msg: Any) -> None:
        writer.write(frame(msg))

    try:
        await subs.start()
    except Exception as e:
        send(("error", f"cannot start the kv-events subscriber: {type(e).__name__}: {e}"))
        await drain(writer)
        return
    send(("ready",))

    async def flush_forever() -> None:
        loop = asyncio.get_running_loop()
        next_status = 0.0
        while True:
            await asyncio.sleep(options["flush_interval"])
            ops = recorder.take()
            if ops:
                send(("ops", ops))
            backed_up = writer.get_write_buffer_size() > PIPE_HIGH_WATER
            if backed_up == gate.is_set():
                (gate.clear if backed_up else gate.set)()
            if loop.time() >= next_status:
                next_status = loop.time() + options["status_interval"]
                records, logs.records = logs.records, []
                send(("status", subs.statuses(), feed_counters(ingestor.counters, subs.errors),
                      list(ingestor.lora_names), records))

    flusher = asyncio.get_running_loop().create_task(flush_forever())
    try:
        while True:
            try:
                msg = await read_msg(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the serving process went away
            if msg[0] == "track":
                subs.track(msg[1], msg[2])
            elif msg[0] == "untrack":
                await subs.untrack(msg[1])
            elif msg[0] == "stop":
                break
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await subs.stop()
        await drain(writer)
