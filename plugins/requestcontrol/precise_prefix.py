"""``precise-prefix-cache-producer`` (alias ``precise-prefix-cache-scorer``): prefix matches from
the engines' own KV events instead of a guess.

It subscribes to every endpoint's KV events (``epp.kvevents``; per endpoint, following the
pool, and/or a central bound socket) and keeps ``epp.kvcache.BlockIndex`` equal to what the
engines hold. Per request it hashes the prompt's token IDs (``TokenizedPrompt``, from
``token-producer``, which the loader adds when no producer of token IDs is configured) into
request keys and writes, for every candidate, ``PrefixCacheMatchInfo(matchBlocks = tier-
weighted longest consecutive prefix held, totalBlocks = full blocks of the prompt)`` under its
own data key (``prefix-cache-scorer`` with ``prefixMatchInfoProducerName``) and the plain one.
A request without token IDs (render failed, not a completions/chat request) matches nothing,
and an endpoint that never sent events holds nothing: both score 0, like an empty cache.

With ``speculativeIndexing``, the pick's request keys are inserted for the chosen endpoint in
a ``speculative`` tier at once (the engine's events confirm them shortly after) and taken out
after ``speculativeTTL``: back-to-back requests with one prefix then stick together before the
first one's events arrive. Off by default, as upstream; it makes replicas' indexes differ
for that TTL (see docs on active-active).

The deprecated ``precise-prefix-cache-scorer`` type is the same producer that also scores
(upstream kept it as a wrapper): old configs that list it in a profile keep working.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Sequence

from epp.framework import DataProducer, PreRequest, Scorer, register, registry
from epp.framework.params import Duration
from epp.framework.plugin import Handle
from epp.framework.scheduling import CycleState, SchedulingResult
from epp.framework.types import Candidate, InferenceRequest
from epp.kvcache import metrics as kvm
from epp.kvcache.hasher import HASH_ALGORITHMS, BlockHasher
from epp.kvcache.index import DEFAULT_CAPACITY, BlockIndex
from epp.kvevents.config import KVEventsConfig
from epp.kvevents.feed import EventFeed, InProcessFeed
from plugins.requestcontrol.data import (
    PREFIX_CACHE_MATCH_INFO_KEY,
    TOKENIZED_PROMPT_KEY,
    PrefixCacheMatchInfo,
    PrefixRequestState,
    TokenizedPrompt,
    prefix_match_key,
)

log = logging.getLogger(__name__)

SPECULATIVE_TIER = "speculative"
PREFILL_PROFILE = "prefill"


@dataclass
class TokenProcessorConfig:
    blockSizeTokens: int | None = None  # None: 16 (or the deprecated blockSize)
    blockSize: int | None = None  # deprecated alias of blockSizeTokens
    hashSeed: str = ""
    hashAlgorithm: Literal["cbor-fnv", "xxh64"] = "cbor-fnv"  # both give our XXH64 chain (epp/kvcache/README.md)

    def block_size(self) -> int:
        return self.blockSizeTokens or self.blockSize or 16

    def validate(self) -> None:
        if self.block_size() <= 0:
            raise ValueError("'blockSizeTokens' must be > 0")
        if self.hashAlgorithm not in HASH_ALGORITHMS:
            raise ValueError(f"'hashAlgorithm' must be one of {', '.join(HASH_ALGORITHMS)}")


@dataclass
class InMemoryConfig:
    size: int = DEFAULT_CAPACITY  # (endpoint, block) entries; upstream counts keys (default 1e8)
    podCacheSize: int = 10  # accepted; entries are per endpoint here, bounded by `size`

    def validate(self) -> None:
        if self.size <= 0:
            raise ValueError("'size' must be > 0")


@dataclass
class KVBlockIndexConfig:
    inMemoryConfig: InMemoryConfig = field(default_factory=InMemoryConfig)
    enableMetrics: bool = False  # accepted; the index metrics are always exported
    metricsLoggingInterval: Duration | None = None  # accepted
    costAwareMemoryConfig: dict | None = None
    redisConfig: dict | None = None
    valkeyConfig: dict | None = None

    def validate(self) -> None:
        for name in ("costAwareMemoryConfig", "redisConfig", "valkeyConfig"):
            if getattr(self, name) is not None:
                raise ValueError(f"'{name}' is not supported: this EPP keeps the index in memory "
                                 "(each replica subscribes to every engine, so none is shared)")


@dataclass
class BackendTier:
    name: str
    weight: float = 1.0


def _default_tiers() -> list[BackendTier]:
    return [BackendTier("gpu", 1.0), BackendTier("cpu", 0.8)]


@dataclass
class IndexerConfig:
    kvBlockIndexConfig: KVBlockIndexConfig = field(default_factory=KVBlockIndexConfig)
    kvCacheBackendConfigs: list[BackendTier] = field(default_factory=_default_tiers)
    prefixStoreConfig: dict | None = None  # accepted (upstream's tokenization prefix store)
    tokenizersPoolConfig: dict | None = None  # deprecated upstream; configure a token-producer instead


@dataclass
class PrecisePrefixParams:
    tokenProcessorConfig: TokenProcessorConfig = field(default_factory=TokenProcessorConfig)
    indexerConfig: IndexerConfig = field(default_factory=IndexerConfig)
    kvEventsConfig: KVEventsConfig = field(default_factory=KVEventsConfig)
    speculativeIndexing: bool = False
    speculativeTTL: Duration = Duration(2.0)

    def validate(self) -> None:
        if self.speculativeTTL <= 0:
            raise ValueError("'speculativeTTL' must be > 0")


def make_feed(config: KVEventsConfig, hasher: BlockHasher, index: BlockIndex) -> EventFeed:
    if config.subscriberMode == "process":
        from epp.kvevents.process import ProcessFeed

        return ProcessFeed(config, hasher, index)
    return InProcessFeed(config, hasher, index)


@register("precise-prefix-cache-producer")
class PrecisePrefixCacheProducer(DataProducer, PreRequest):
    Params = PrecisePrefixParams
    consumes = frozenset({TOKENIZED_PROMPT_KEY})

    def __init__(self, name: str | None = None, params: PrecisePrefixParams | None = None) -> None:
        super().__init__(name, params)
        p: PrecisePrefixParams = self.params
        self.produces = frozenset({PREFIX_CACHE_MATCH_INFO_KEY, prefix_match_key(self.name)})
        self._key = prefix_match_key(self.name)
        self.block_size = p.tokenProcessorConfig.block_size()
        self.hasher = BlockHasher(self.block_size, p.tokenProcessorConfig.hashSeed)
        tiers = {t.name.lower(): t.weight for t in p.indexerConfig.kvCacheBackendConfigs}
        self.index = BlockIndex(p.indexerConfig.kvBlockIndexConfig.inMemoryConfig.size, tiers)
        self.feed: EventFeed | None = None
        self._pool = None
        self._speculative: deque[tuple[float, str, tuple[int, ...]]] = deque()
        self.stats = kvm.LookupStats()

    @classmethod
    def create(cls, name: str, params: PrecisePrefixParams, handle: Handle) -> "PrecisePrefixCacheProducer":
        if params.indexerConfig.tokenizersPoolConfig is not None:
            handle.warn("indexerConfig.tokenizersPoolConfig is ignored: token IDs come from a 'token-producer' "
                        "plugin (vLLM's render endpoint by default, or a local tokenizer)")
        kv = params.kvEventsConfig
        if not kv.discoverPods and not kv.zmqEndpoint:
            handle.warn("kvEventsConfig has discoverPods: false and no zmqEndpoint: no KV events will arrive, "
                        "every endpoint scores 0")
        return cls(name, params)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self, handle: Handle) -> None:
        pool = handle.pool
        if pool is None or self.feed is not None:
            return  # `epp check-config`: nothing to subscribe to
        self.feed = make_feed(self.params.kvEventsConfig, self.hasher, self.index)
        await self.feed.start()
        self._pool = pool
        pool.subscribe(self._on_pool_event)
        for ep in pool.endpoints():
            self.feed.track(ep.key, ep.metadata.address)
        kvm.register(self)

    async def close(self) -> None:
        kvm.unregister(self)
        if self._pool is not None:
            self._pool.unsubscribe(self._on_pool_event)
            self._pool = None
        if self.feed is not None:
            await self.feed.stop()
            self.feed = None

    def _on_pool_event(self, event: str, endpoint) -> None:
        if self.feed is None:
            return
        if event == "added":
            self.feed.track(endpoint.key, endpoint.metadata.address)
        elif event == "removed":
            self.feed.untrack(endpoint.key)
            self.index.clear(endpoint.key)

    # --- request path ----------------------------------------------------------------------
    def request_keys(self, request: InferenceRequest, tokens: TokenizedPrompt) -> list[int]:
        lora = ""
        feed = self.feed
        if feed is not None and feed.lora_names:
            model = request.target_model or request.incoming_model
            if model in feed.lora_names:
                lora = model
        return self.hasher.keys_of_bytes(tokens.data, self.hasher.root(lora, request.cache_salt))

    def produce(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Candidate]) -> None:
        if not candidates:
            return
        t0 = time.perf_counter()
        if self._speculative:
            self._expire(t0)
        tokens = cycle.get(TOKENIZED_PROMPT_KEY)
        keys = self.request_keys(request, tokens) if isinstance(tokens, TokenizedPrompt) else []
        total = len(keys)
        bs = self.block_size
        state = PrefixRequestState(tuple(keys), bs, 0, self.name)
        zero = PrefixCacheMatchInfo(0, total, bs, state)
        key, plain = self._key, PREFIX_CACHE_MATCH_INFO_KEY
        matches = self.index.match(keys, [c.key for c in candidates]) if total else {}
        best = 0
        for c in candidates:
            m = matches.get(c.key)
            if m is None:
                info = zero
            else:
                n, weighted = m
                info = PrefixCacheMatchInfo(int(weighted), total, bs, state)
                if n > best:
                    best = n
            c.data[key] = info
            c.data[plain] = info
        state.max_match = best
        state.matches = {ep: n for ep, (n, _w) in matches.items()}
        self.stats.observe(total, best, time.perf_counter() - t0)

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        if not self.params.speculativeIndexing:
            return
        targets = []
        primary = result.profile_results.get(result.primary_profile)
        if primary is not None and primary.targets:
            targets.append(primary.targets[0])
        prefill = result.profile_results.get(PREFILL_PROFILE)
        if result.primary_profile != PREFILL_PROFILE and prefill is not None and prefill.targets:
            targets.append(prefill.targets[0])
        expires = time.perf_counter() + self.params.speculativeTTL
        for target in targets:
            info = target.data.get(self._key)
            if not isinstance(info, PrefixCacheMatchInfo) or info.request is None or not info.request.hashes:
                continue
            keys = info.request.hashes
            self.index.add(target.key, keys, SPECULATIVE_TIER)
            self._speculative.append((expires, target.key, keys))

    def _expire(self, now: float) -> None:
        q = self._speculative
        while q and q[0][0] <= now:
            _, endpoint, keys = q.popleft()
            self.index.remove(endpoint, keys, SPECULATIVE_TIER)

    # --- debug -------------------------------------------------------------------------------
    def debug_state(self) -> dict:
        feed = self.feed
        return {
            "producer": self.name,
            "index": {"entries": len(self.index), "capacity": self.index.capacity,
                      "per_endpoint": {ep: self.index.entries(ep) for ep in self.index.endpoints()},
                      "admissions": self.index.admissions, "evictions": self.index.evictions},
            "lookups": self.stats.as_dict(),
            "subscriber_mode": self.params.kvEventsConfig.subscriberMode,
            "subscriptions": feed.statuses() if feed is not None else [],
            "events": feed.counters() if feed is not None else {},
        }


@register("precise-prefix-cache-scorer")
class PrecisePrefixCacheScorer(PrecisePrefixCacheProducer, Scorer):
    """Deprecated upstream: the producer that also scores its own matches (match / total)."""

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        key = self._key
        return [d.ratio if (d := c.data.get(key)) is not None else 0.0 for c in candidates]


# A prefix-cache-scorer naming a producer that is not configured gets one with defaults.
registry.register_default_producer(prefix_match_key("precise-prefix-cache-producer"), "precise-prefix-cache-producer")
