"""Paged KV cache with prefix caching, modelled on vLLM V1's block manager.

We never store block contents, only *counts* and *identities*:

- ``free_uncached``: free blocks holding nothing reusable;
- ``cached``: block hash -> reference count, for full prompt blocks;
- ``evictable``: cached blocks nobody references, in LRU order.

A request owns ``num_hashed`` shared prompt blocks (the first ``num_hashed``
of its block hashes) plus ``num_anon`` private blocks (the partial prompt
block and generated tokens). Invariant:
``used + free_uncached + len(evictable) == num_blocks``.

Allocation takes never-used free blocks first and only then evicts the least
recently used cached block, so the prefix cache keeps as much as it can.

With ``record_events()`` the cache also logs what vLLM's block pool reports
as KV events, in order: a block hash entering the cache (``STORED``, one per
run of consecutive new blocks of a request), leaving it (``REMOVED``, one per
evicted block) and a reset (``CLEARED``). The engine drains ``events`` after
each step; kvevents.py turns them into vLLM's wire format.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

# Event tags in KVCache.events:
#   (STORED, block_hashes, parent_hash or None, token_ids, lora_id, lora_name)
#   (REMOVED, block_hash)
#   (CLEARED,)
STORED = 0
REMOVED = 1
CLEARED = 2


class KVHolder(Protocol):
    """What the cache needs to know about a request (see scheduler.SimRequest)."""

    block_hashes: list[int]
    prompt_ids: list[int]
    lora: str | None
    lora_id: int | None
    num_hashed: int
    num_anon: int


class KVCache:
    __slots__ = ("block_size", "num_blocks", "free_uncached", "cached", "evictable", "evictions", "events")

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_uncached = num_blocks
        self.cached: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0
        # None: nobody listens, record nothing (the common, zero-cost case).
        self.events: list[tuple[Any, ...]] | None = None

    def record_events(self) -> None:
        """Start logging stores, evictions and resets into ``events``."""
        if self.events is None:
            self.events = []

    def take_events(self) -> list[tuple[Any, ...]]:
        """The events logged since the last call, oldest first."""
        events = self.events
        if not events:
            return []
        self.events = []
        return events

    # -- queries -----------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation could use (cached-but-idle blocks count as free, as in vLLM)."""
        return self.free_uncached + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live requests: vllm:kv_cache_usage_perc."""
        return self.num_used / self.num_blocks

    def lookup_prefix(self, hashes: list[int], max_blocks: int) -> int:
        """Number of leading blocks of ``hashes`` already in the cache (at most ``max_blocks``)."""
        cached = self.cached
        n = 0
        for h in hashes[:max_blocks]:
            if h not in cached:
                break
            n += 1
        return n

    # -- mutations ---------------------------------------------------------------

    def allocate(self, req: KVHolder, num_tokens: int) -> bool:
        """Make ``req`` hold KV for its first ``num_tokens`` tokens; False if it does not fit.

        Full prompt blocks are registered (or shared) by hash as soon as they are
        scheduled, which is when vLLM V1 caches them too. On failure nothing changes.
        """
        bs = self.block_size
        hashes = req.block_hashes
        total_target = -(-num_tokens // bs)
        hashed_target = min(len(hashes), num_tokens // bs)
        have_hashed = req.num_hashed
        have_anon = req.num_anon
        if hashed_target == have_hashed and total_target == have_hashed + have_anon:
            return True  # the common decode step: the current block still has room

        cached = self.cached
        new_hashes = hashes[have_hashed:hashed_target]
        shared = 0
        shared_idle = 0
        for h in new_hashes:
            rc = cached.get(h)
            if rc is not None:
                shared += 1
                if rc == 0:
                    shared_idle += 1
        # Physical blocks this request must own afterwards, minus the private
        # blocks it already has (a partial block that fills up becomes a cached one).
        need = (hashed_target - have_hashed - shared) + (total_target - hashed_target) - have_anon
        if need > self.free_uncached + len(self.evictable) - shared_idle:
            return False

        evictable = self.evictable
        # Runs [start, end) of block indices new to the cache, for the events.
        runs: list[list[int]] | None = [] if self.events is not None else None
        index = have_hashed
        for h in new_hashes:
            rc = cached.get(h)
            if rc is None:
                cached[h] = 1
                if runs is not None:
                    if runs and runs[-1][1] == index:
                        runs[-1][1] = index + 1
                    else:
                        runs.append([index, index + 1])
            else:
                if rc == 0:
                    del evictable[h]
                cached[h] = rc + 1
            index += 1
        if need > 0:
            self._take(need)
        elif need < 0:
            self.free_uncached -= need
        if runs:
            # After the evictions that made room, as vLLM's block pool orders them.
            self._log_stored(req, runs)
        req.num_hashed = hashed_target
        req.num_anon = total_target - hashed_target
        return True

    def free(self, req: KVHolder) -> None:
        """Release everything ``req`` holds; its cached blocks become evictable."""
        hashes = req.block_hashes
        cached = self.cached
        evictable = self.evictable
        # Tail blocks first, so they are evicted before the shared head of the
        # prompt (the part other requests are most likely to reuse), as vLLM does.
        for i in range(req.num_hashed - 1, -1, -1):
            h = hashes[i]
            rc = cached[h] - 1
            cached[h] = rc
            if rc == 0:
                evictable[h] = None
        self.free_uncached += req.num_anon
        req.num_hashed = 0
        req.num_anon = 0

    def reset(self) -> None:
        """Drop every cached block (all must be free)."""
        if self.num_used:
            raise RuntimeError("cannot reset a KV cache with blocks in use")
        self.cached.clear()
        self.evictable.clear()
        self.free_uncached = self.num_blocks
        if self.events is not None:
            self.events.append((CLEARED,))

    def _take(self, n: int) -> None:
        from_free = min(n, self.free_uncached)
        self.free_uncached -= from_free
        n -= from_free
        evictable = self.evictable
        cached = self.cached
        events = self.events
        for _ in range(n):
            h, _ = evictable.popitem(last=False)
            del cached[h]
            if events is not None:
                events.append((REMOVED, h))
        self.evictions += n

    def _log_stored(self, req: KVHolder, runs: list[list[int]]) -> None:
        assert self.events is not None
        bs = self.block_size
        hashes = req.block_hashes
        ids = req.prompt_ids
        for start, end in runs:
            parent = hashes[start - 1] if start else None
            self.events.append((STORED, hashes[start:end], parent, ids[start * bs : end * bs], req.lora_id, req.lora))
