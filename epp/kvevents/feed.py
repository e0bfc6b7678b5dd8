"""What the precise prefix producer needs from the KV-event machinery, in two placements.

``InProcessFeed`` runs the sockets, decoding and ingestion on the serving event loop and
writes the index directly (``subscriberMode: inprocess``; tests, small fleets).
``epp.kvevents.process.ProcessFeed`` runs the same code in a child process and ships index
writes back in batches (``subscriberMode: process``, the default): decoding a flood of events
then never competes with the request path for the serving process's CPU (measured in
epp/kvevents/README.md).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from epp.kvcache.hasher import BlockHasher
from epp.kvcache.index import BlockIndex
from epp.kvevents.config import KVEventsConfig
from epp.kvevents.ingest import Ingestor
from epp.kvevents.manager import Subscriptions


class EventFeed(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def track(self, key: str, address: str) -> None: ...
    def untrack(self, key: str) -> None: ...
    def statuses(self) -> list[dict]: ...
    def counters(self) -> dict: ...

    # LoRA adapter names seen in events (their blocks are keyed apart); read per request.
    lora_names: set[str]


def feed_counters(ingestor_counters, transport_errors: dict[str, int]) -> dict:
    """The feed-wide counters /debug and the metrics show."""
    c = ingestor_counters
    return {"stored": c.stored, "removed": c.removed, "cleared": c.cleared, "skipped": dict(c.skipped),
            "transport_errors": dict(transport_errors)}


class InProcessFeed:
    def __init__(self, config: KVEventsConfig, hasher: BlockHasher, index: BlockIndex) -> None:
        self.ingestor = Ingestor(hasher, index, max_blocks_per_source=index.capacity)
        self.subs = Subscriptions(config, self.ingestor)
        self.lora_names = self.ingestor.lora_names
        self._pending: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.subs.start()

    async def stop(self) -> None:
        for t in list(self._pending):
            await asyncio.gather(t, return_exceptions=True)
        await self.subs.stop()

    def track(self, key: str, address: str) -> None:
        self.subs.track(key, address)

    def untrack(self, key: str) -> None:
        task = asyncio.get_running_loop().create_task(self.subs.untrack(key))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def statuses(self) -> list[dict]:
        return self.subs.statuses()

    def counters(self) -> dict:
        return feed_counters(self.ingestor.counters, self.subs.errors)
