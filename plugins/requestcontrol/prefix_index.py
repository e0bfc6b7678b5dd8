"""Approximate per-endpoint index of the prompt blocks each endpoint is believed to cache.

Hashes are chained (block i's hash covers blocks 0..i), so an endpoint holding block i
was sent the whole prefix up to i. A request's blocks are recorded last-to-first: the
leading blocks become the most recently used, and LRU eviction always removes the tail
of a chain first, as a model server's KV cache does (shared prefix blocks outlive the
leaves). Hence the blocks an endpoint holds of any chain are always a *leading* run, and
its match length can be found by binary search in its own LRU.

That invariant also means a reverse map (hash -> endpoints) is only needed for the
*first* block of each chain, which keeps the global map tiny; each endpoint's LRU is one
``OrderedDict`` (O(1) touch and eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence


class PrefixIndex:
    __slots__ = ("_lrus", "_first", "_size")

    def __init__(self) -> None:
        self._lrus: dict[str, OrderedDict[int, None]] = {}
        # first-block hash -> endpoints holding it
        self._first: dict[int, set[str]] = {}
        self._size = 0

    def __len__(self) -> int:
        """Total entries over all endpoints."""
        return self._size

    def endpoints(self) -> list[str]:
        return list(self._lrus)

    def entries(self, endpoint: str) -> int:
        lru = self._lrus.get(endpoint)
        return len(lru) if lru is not None else 0

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Endpoint -> number of leading blocks of ``hashes`` it holds (endpoints with 0 omitted)."""
        if not hashes:
            return {}
        holders = self._first.get(hashes[0])
        if not holders:
            return {}
        n = len(hashes)
        last = hashes[-1]
        out: dict[str, int] = {}
        lrus = self._lrus
        for ep in holders:
            lru = lrus[ep]
            if last in lru:
                out[ep] = n
                continue
            # invariant: hashes[lo-1] held, hashes[hi] not held
            lo, hi = 1, n - 1
            while lo < hi:
                mid = (lo + hi) >> 1
                if hashes[mid] in lru:
                    lo = mid + 1
                else:
                    hi = mid
            out[ep] = lo
        return out

    def add(self, endpoint: str, hashes: Sequence[int], capacity: int) -> None:
        """Record that ``endpoint`` was sent the chain ``hashes``; keep at most ``capacity`` entries."""
        if not hashes:
            return
        lru = self._lrus.get(endpoint)
        if lru is None:
            lru = self._lrus[endpoint] = OrderedDict()
        before = len(lru)
        move = lru.move_to_end
        for h in reversed(hashes):
            if h in lru:
                move(h)
            else:
                lru[h] = None
        first = hashes[0]
        holders = self._first.get(first)
        if holders is None:
            self._first[first] = {endpoint}
        else:
            holders.add(endpoint)
        self._size += len(lru) - before
        if len(lru) > capacity:
            self._evict(endpoint, lru, len(lru) - max(capacity, 0))

    def _evict(self, endpoint: str, lru: OrderedDict[int, None], count: int) -> None:
        first = self._first
        pop = lru.popitem
        for _ in range(count):
            h, _v = pop(last=False)
            holders = first.get(h)
            if holders is not None:
                holders.discard(endpoint)
                if not holders:
                    del first[h]
        self._size -= count

    def remove_endpoint(self, endpoint: str) -> None:
        lru = self._lrus.pop(endpoint, None)
        if lru is None:
            return
        first = self._first
        for h in lru:
            holders = first.get(h)
            if holders is not None:
                holders.discard(endpoint)
                if not holders:
                    del first[h]
        self._size -= len(lru)

    def retain(self, endpoints: Iterable[str]) -> list[str]:
        """Drop every endpoint not in ``endpoints``; returns the dropped ones."""
        keep = set(endpoints)
        gone = [ep for ep in self._lrus if ep not in keep]
        for ep in gone:
            self.remove_endpoint(ep)
        return gone
