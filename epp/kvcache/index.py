"""The precise prefix index: which request keys (see ``hasher``) each endpoint holds, per tier.

Written by KV-event ingestion (``epp.kvevents``), read on the request path. Per endpoint an
``OrderedDict`` maps request key -> tier bit mask (gpu, cpu, ...), in least-recently-stored
order. A lookup walks the request's keys in order and stops, per endpoint, at the first key
that endpoint lacks (the longest consecutive prefix, as llm-d scores it); the walk runs in C
(``takewhile`` over the dict's ``__contains__``), about 30 ns per matched block. Each matched
block counts its best tier's weight (gpu 1.0, cpu 0.8, unknown tiers 1.0, as upstream).

Memory is bounded by ``capacity`` entries over all endpoints: past it the largest endpoint
loses its least recently stored entries. Engines report every eviction, so the index only
reaches the bound when it was sized below the fleet's KV capacity or events were lost
without replay; the bound keeps that from growing without limit. One entry costs ~110
bytes (measured in epp/kvcache/README.md).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import takewhile
from typing import Iterable, Mapping, Sequence

GPU = "gpu"
DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {"gpu": 1.0, "cpu": 0.8}
DEFAULT_CAPACITY = 10_000_000
_GPU_BIT = 1
_MAX_TIERS = 24


class BlockIndex:
    __slots__ = ("capacity", "_eps", "_other", "_bits", "_weights", "_mask_weight", "size",
                 "admissions", "evictions", "_suspended")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, tier_weights: Mapping[str, float] | None = None) -> None:
        if capacity <= 0:
            raise ValueError("index capacity must be > 0")
        self.capacity = capacity
        self._eps: dict[str, OrderedDict[int, int]] = {}
        self._other: dict[str, int] = {}  # per endpoint: entries held in some tier other than gpu alone
        self._bits: dict[str, int] = {GPU: _GPU_BIT}
        self._weights: dict[int, float] = {}
        for name, w in (tier_weights or DEFAULT_TIER_WEIGHTS).items():
            self._weights[self.tier_bit(name)] = float(w)
        self._mask_weight: dict[int, float] = {}
        self.size = 0
        self.admissions = 0  # entries added (upstream's kv_cache_index_admissions_total)
        self.evictions = 0  # entries dropped by the capacity bound
        self._suspended: set[str] = set()  # endpoints whose entries are kept but not matched

    # --- tiers ------------------------------------------------------------------------------
    def tier_bit(self, tier: str) -> int:
        tier = tier.lower() if tier else GPU
        bit = self._bits.get(tier)
        if bit is None:
            if len(self._bits) >= _MAX_TIERS:  # garbage media names must not grow this forever
                tier = "other"
                bit = self._bits.get(tier)
                if bit is not None:
                    return bit
            bit = self._bits[tier] = 1 << len(self._bits)
        return bit

    def _weight(self, mask: int) -> float:
        w = self._mask_weight.get(mask)
        if w is None:
            w = max(self._weights.get(bit, 1.0) for bit in _bits_of(mask))
            self._mask_weight[mask] = w
        return w

    # --- writes (KV-event ingestion) ----------------------------------------------------------
    def add(self, endpoint: str, keys: Sequence[int], tier: str = GPU) -> None:
        """``endpoint`` now holds ``keys`` in ``tier``: they become its most recently stored."""
        od = self._eps.get(endpoint)
        if od is None:
            od = self._eps[endpoint] = OrderedDict()
            self._other[endpoint] = 0
        bit = _GPU_BIT if tier == GPU else self.tier_bit(tier)
        added = other = 0
        get, move = od.get, od.move_to_end
        # Last to first: a chain's head ends up most recent, so a bound evicts tails first.
        for k in reversed(keys):
            m = get(k)
            if m is None:
                od[k] = bit
                added += 1
                if bit != _GPU_BIT:
                    other += 1
            else:
                new = m | bit
                if new != m:
                    od[k] = new
                    if m == _GPU_BIT:
                        other += 1
                move(k)
        if other:
            self._other[endpoint] += other
        if added:
            self.size += added
            self.admissions += added
            if self.size > self.capacity:
                self._shrink()

    def remove(self, endpoint: str, keys: Iterable[int], tier: str = GPU) -> int:
        """``endpoint`` no longer holds ``keys`` in ``tier``; returns the entries dropped."""
        od = self._eps.get(endpoint)
        if od is None:
            return 0
        bit = _GPU_BIT if tier == GPU else self.tier_bit(tier)
        removed = other = 0
        get = od.get
        for k in keys:
            m = get(k)
            if m is None or not m & bit:
                continue
            new = m & ~bit
            if new:
                od[k] = new
                if new == _GPU_BIT:
                    other -= 1
            else:
                del od[k]
                removed += 1
                if m != _GPU_BIT:
                    other -= 1
        if other:
            self._other[endpoint] += other
        self.size -= removed
        return removed

    def clear(self, endpoint: str) -> int:
        """Forget everything ``endpoint`` holds (AllBlocksCleared, publisher restart, removal)."""
        self._suspended.discard(endpoint)  # nothing stale is left to hide
        od = self._eps.pop(endpoint, None)
        self._other.pop(endpoint, None)
        if od is None:
            return 0
        self.size -= len(od)
        return len(od)

    def suspend(self, endpoint: str) -> None:
        """Stop matching ``endpoint`` without forgetting it: its publisher disconnected, and until
        its stream resumes we cannot tell a restart (the cache is gone) from a network blip."""
        self._suspended.add(endpoint)

    def resume(self, endpoint: str) -> None:
        self._suspended.discard(endpoint)

    def suspended(self, endpoint: str) -> bool:
        return endpoint in self._suspended

    def _shrink(self) -> None:
        eps = self._eps
        while self.size > self.capacity and eps:
            ep = max(eps, key=lambda e: len(eps[e]))
            od = eps[ep]
            n = min(self.size - self.capacity, len(od))
            pop = od.popitem
            other = 0
            for _ in range(n):
                _k, m = pop(last=False)
                if m != _GPU_BIT:
                    other += 1
            self._other[ep] -= other
            self.size -= n
            self.evictions += n
            if not od:
                del eps[ep]
                del self._other[ep]

    # --- reads (request path) ------------------------------------------------------------------
    def match(self, keys: Sequence[int], endpoints: Iterable[str]) -> dict[str, tuple[int, float]]:
        """Per endpoint holding ``keys[0]`` (and not suspended): (leading keys held, their tier-weighted sum)."""
        out: dict[str, tuple[int, float]] = {}
        if not keys:
            return out
        first, last, total = keys[0], keys[-1], len(keys)
        eps = self._eps
        suspended = self._suspended
        for ep in endpoints:
            od = eps.get(ep)
            if od is None or first not in od or (suspended and ep in suspended):
                continue
            if last in od and all(map(od.__contains__, keys)):
                n = total
            else:
                n = len(list(takewhile(od.__contains__, keys)))
            if self._other[ep]:
                weight = self._weight
                out[ep] = (n, sum(weight(od[k]) for k in keys[:n]))
            else:
                out[ep] = (n, float(n))
        return out

    def endpoints(self) -> list[str]:
        return list(self._eps)

    def entries(self, endpoint: str) -> int:
        od = self._eps.get(endpoint)
        return len(od) if od is not None else 0

    def holdings(self, endpoint: str) -> dict[int, frozenset[str]]:
        """Key -> tiers held, for one endpoint (tests and debug views; copies everything)."""
        names = {bit: name for name, bit in self._bits.items()}
        od = self._eps.get(endpoint) or {}
        return {k: frozenset(names[b] for b in _bits_of(m)) for k, m in od.items()}

    def __len__(self) -> int:
        return self.size


def _bits_of(mask: int) -> Iterable[int]:
    bit = 1
    while bit <= mask:
        if mask & bit:
            yield bit
        bit <<= 1
