"""``approx-prefix-cache-producer``: guesses how much of a prompt each endpoint has cached.

Before scheduling it cuts the request's ``prefix_input`` into fixed-size character blocks
(``blockSizeTokens`` x 4 characters, upstream's average of 4 characters per token), hashes
them as a chain seeded by model and ``cache_salt`` (so different models or salts never
share entries), and looks the chain up in a per-endpoint LRU index. Each candidate gets a
``PrefixCacheMatchInfo`` (leading blocks held / total blocks) for ``prefix-cache-scorer``.
After the pick (PreRequest) the chain is recorded for the chosen endpoint(s).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import xxhash

from epp.framework import DataProducer, PreRequest, register, registry
from epp.framework.plugin import Handle
from epp.framework.scheduling import CycleState, SchedulingResult
from epp.framework.types import Candidate, InferenceRequest
from epp.observability import deferred
from epp.observability import metrics as m
from plugins.requestcontrol.data import (
    PREFIX_CACHE_MATCH_INFO_KEY,
    PrefixCacheMatchInfo,
    PrefixRequestState,
    prefix_match_key,
)
from plugins.requestcontrol.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

AVERAGE_CHARS_PER_TOKEN = 4
PREFILL_PROFILE = "prefill"
_xxh64 = xxhash.xxh64_intdigest


@dataclass
class ApproxPrefixParams:
    autoTune: bool = True
    blockSizeTokens: int | None = None  # None = 16 (distinguishes "not given" for the blockSize check)
    maxPrefixBlocksToMatch: int = 256
    maxPrefixTokensToMatch: int = 0
    lruCapacityPerServer: int = 31250
    blockSize: int = 0  # deprecated: block size in characters

    def validate(self) -> None:
        if self.blockSize > 0 and self.blockSizeTokens is None:
            raise ValueError("'blockSize' (characters) is no longer supported; set 'blockSizeTokens' instead")
        if self.blockSizeTokens is not None and self.blockSizeTokens <= 0:
            raise ValueError("'blockSizeTokens' must be > 0")
        if not self.autoTune and self.blockSizeTokens is None:
            raise ValueError("'blockSizeTokens' is required when 'autoTune' is false")
        if self.maxPrefixBlocksToMatch <= 0:
            raise ValueError("'maxPrefixBlocksToMatch' must be > 0")
        if self.maxPrefixTokensToMatch < 0:
            raise ValueError("'maxPrefixTokensToMatch' must be >= 0")
        if self.lruCapacityPerServer <= 0:
            raise ValueError("'lruCapacityPerServer' must be > 0")


def chain_hashes(data: bytes, block_chars: int, seed_text: bytes) -> tuple[int, ...]:
    """Chained 64-bit hashes of ``data`` in blocks of ``block_chars`` (trailing partial block included).

    Input shorter than one block yields no hashes: too little to be worth routing on.
    Each block is hashed with the previous hash as the xxh64 seed, so block i's hash
    covers blocks 0..i.
    """
    n = len(data)
    if n < block_chars:
        return ()
    prev = _xxh64(seed_text)
    out = []
    append = out.append
    for start in range(0, n, block_chars):
        prev = _xxh64(data[start:start + block_chars], prev)
        append(prev)
    return tuple(out)


@register("approx-prefix-cache-producer")
class ApproxPrefixCacheProducer(DataProducer, PreRequest):
    Params = ApproxPrefixParams

    def __init__(self, name: str | None = None, params: ApproxPrefixParams | None = None) -> None:
        super().__init__(name, params)
        # The plain key, and the one with our name (prefix-cache-scorer's prefixMatchInfoProducerName).
        self._named = prefix_match_key(self.name)
        self.produces = frozenset({PREFIX_CACHE_MATCH_INFO_KEY, self._named})
        p: ApproxPrefixParams = self.params
        self.block_size_tokens = p.blockSizeTokens or 16
        self.index = PrefixIndex()
        self._pool = None

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self, handle: Handle) -> None:
        pool = handle.pool
        if pool is not None and self._pool is None:
            self._pool = pool
            pool.subscribe(self._on_pool_event)
            self.index.retain(ep.key for ep in pool.endpoints())
            m.PREFIX_INDEXER_SIZE.set(len(self.index))

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.unsubscribe(self._on_pool_event)
            self._pool = None

    def _on_pool_event(self, event: str, endpoint) -> None:
        if event == "removed":
            self.index.remove_endpoint(endpoint.key)
            m.PREFIX_INDEXER_SIZE.set(len(self.index))

    # --- request path --------------------------------------------------------------------
    def _block_tokens(self, candidates: Sequence[Candidate]) -> int:
        if self.params.autoTune and candidates:
            bs = candidates[0].metrics.cache_block_size
            if bs > 0:
                return bs
        return self.block_size_tokens

    def hashes_for(self, request: InferenceRequest, block_tokens: int) -> tuple[int, ...]:
        p: ApproxPrefixParams = self.params
        chars = block_tokens * AVERAGE_CHARS_PER_TOKEN
        max_blocks = p.maxPrefixTokensToMatch // block_tokens if p.maxPrefixTokensToMatch > 0 else p.maxPrefixBlocksToMatch
        data = request.prefix_input
        limit = max_blocks * chars
        if len(data) > limit:
            data = data[:limit]
        model = request.target_model or request.incoming_model
        return chain_hashes(data, chars, (model + "\x00" + request.cache_salt).encode())

    def produce(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Candidate]) -> None:
        if not candidates:
            return
        block_tokens = self._block_tokens(candidates)
        hashes = self.hashes_for(request, block_tokens)
        state = PrefixRequestState(hashes, block_tokens, block_tokens * AVERAGE_CHARS_PER_TOKEN, self.name)
        total = len(hashes)
        zero = PrefixCacheMatchInfo(0, total, block_tokens, state)
        key, named = PREFIX_CACHE_MATCH_INFO_KEY, self._named
        matches = self.index.match(hashes) if total else None
        best = 0
        if matches:
            for c in candidates:
                n = matches.get(c.key, 0)
                if n:
                    c.data[key] = c.data[named] = PrefixCacheMatchInfo(n, total, block_tokens, state)
                    if n > best:
                        best = n
                else:
                    c.data[key] = c.data[named] = zero
        else:
            for c in candidates:
                c.data[key] = c.data[named] = zero
        state.max_match = best
        state.matches = matches
        if total:
            deferred.observe(m.PREFIX_INDEXER_HIT_RATIO, best / total)
            deferred.observe(m.PREFIX_INDEXER_HIT_BYTES, best * state.block_size_chars)

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        targets = []
        primary = result.profile_results.get(result.primary_profile)
        if primary is not None and primary.targets:
            targets.append(primary.targets[0])
        if result.primary_profile != PREFILL_PROFILE:
            prefill = result.profile_results.get(PREFILL_PROFILE)
            if prefill is not None and prefill.targets:
                targets.append(prefill.targets[0])
        for target in targets:
            info = target.data.get(PREFIX_CACHE_MATCH_INFO_KEY)
            if not isinstance(info, PrefixCacheMatchInfo) or info.request is None or not info.request.hashes:
                continue
            self.index.add(target.key, info.request.hashes, self._capacity(target))
        m.PREFIX_INDEXER_SIZE.set(len(self.index))

    def _capacity(self, target: Candidate) -> int:
        if self.params.autoTune:
            blocks = target.metrics.cache_num_blocks
            if blocks > 0:
                return blocks
        return self.params.lruCapacityPerServer


registry.register_default_producer(PREFIX_CACHE_MATCH_INFO_KEY, "approx-prefix-cache-producer")
registry.register_default_producer(prefix_match_key("approx-prefix-cache-producer"), "approx-prefix-cache-producer")
