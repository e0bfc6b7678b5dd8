"""Prefix-cache scorers: reward cached prefixes, and spread cold requests across endpoints."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from epp.framework import PreRequest, Scorer, register
from epp.framework.plugin import Handle
from epp.framework.scheduling import CycleState, SchedulingResult
from epp.framework.types import Candidate, InferenceRequest
from plugins.requestcontrol.data import PREFIX_CACHE_MATCH_INFO_KEY, PrefixCacheMatchInfo, prefix_match_key


@dataclass
class PrefixCacheScorerParams:
    # The producer whose PrefixCacheMatchInfo to score (e.g. precise-prefix-cache-producer);
    # empty: whichever prefix producer is configured (the approximate one by default).
    prefixMatchInfoProducerName: str = ""
    # score = (1 - w) * match / total + w * min(1, matched tokens / maxModelLen)^2
    prefixLengthWeight: float = 0.0
    maxModelLen: int | None = None
    # Upstream moved these to approx-prefix-cache-producer and ignores them here; accepted
    # so old configs load, with a warning saying where they belong.
    autoTune: bool | None = None
    blockSize: int | None = None
    blockSizeTokens: int | None = None
    maxPrefixBlocksToMatch: int | None = None
    maxPrefixTokensToMatch: int | None = None
    lruCapacityPerServer: int | None = None

    def validate(self) -> None:
        if not 0.0 <= self.prefixLengthWeight <= 1.0:
            raise ValueError(f"'prefixLengthWeight' must be between 0.0 and 1.0, got {self.prefixLengthWeight}")
        if self.maxModelLen is not None and self.maxModelLen <= 0:
            raise ValueError(f"'maxModelLen' must be greater than 0, got {self.maxModelLen}")
        if self.prefixLengthWeight > 0 and self.maxModelLen is None:
            raise ValueError("'maxModelLen' must be specified when 'prefixLengthWeight' is greater than 0")


_LEGACY = ("autoTune", "blockSize", "blockSizeTokens", "maxPrefixBlocksToMatch", "maxPrefixTokensToMatch",
           "lruCapacityPerServer")


@register("prefix-cache-scorer")
class PrefixCacheScorer(Scorer):
    """matchBlocks / totalBlocks from the prefix producer's data; no data or no blocks -> 0.

    With ``prefixLengthWeight`` w > 0 (upstream): (1 - w) * ratio + w * min(1, matched tokens /
    ``maxModelLen``)^2, so long matches count more than short ones with the same ratio.
    """

    Params = PrefixCacheScorerParams

    def __init__(self, name: str | None = None, params: PrefixCacheScorerParams | None = None) -> None:
        super().__init__(name, params)
        p: PrefixCacheScorerParams = self.params
        self.key = prefix_match_key(p.prefixMatchInfoProducerName)
        self.consumes = frozenset({self.key})

    @classmethod
    def create(cls, name: str, params: PrefixCacheScorerParams, handle: Handle) -> "PrefixCacheScorer":
        legacy = [k for k in _LEGACY if getattr(params, k) is not None]
        if legacy:
            handle.warn(
                f"parameters {', '.join(legacy)} are ignored by prefix-cache-scorer; "
                "set them on an approx-prefix-cache-producer plugin"
            )
        return cls(name, params)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        key = self.key
        if not candidates:
            return []
        first = candidates[0].data.get(key)
        if first is not None and first.request is not None and first.request.max_match == 0:
            return [0.0] * len(candidates)  # nothing matched anywhere
        w = self.params.prefixLengthWeight
        if w <= 0.0:
            return [d.ratio if (d := c.data.get(key)) is not None else 0.0 for c in candidates]
        scale = float(self.params.maxModelLen)
        out = []
        for c in candidates:
            d = c.data.get(key)
            if d is None or d.total_blocks == 0:
                out.append(0.0)
                continue
            length = min(1.0, d.matched_tokens / scale)
            out.append((1.0 - w) * d.ratio + w * length * length)
        return out


@dataclass
class NoHitLRUParams:
    prefixPluginType: str = "prefix-cache-scorer"  # accepted for compatibility: we read the producer's data
    prefixPluginName: str = "prefix-cache-scorer"
    lruSize: int = 1024
    prefillProfile: str = "prefill"


_PENDING_LIMIT = 8192  # cold/warm verdicts kept between Score and PreRequest


@register("no-hit-lru-scorer")
class NoHitLRUScorer(Scorer, PreRequest):
    """Cold requests (no endpoint holds any of the prompt) go to the endpoint least recently
    given a cold request; warm requests score 0.5 everywhere (prefix scoring decides).

    Cold scores are LRU ranks: never-used endpoints first (1.0, then decreasing in candidate
    order), then used ones from least to most recently used; score = 1 - rank / (n - 1).
    """

    Params = NoHitLRUParams
    consumes = frozenset({PREFIX_CACHE_MATCH_INFO_KEY})

    def __init__(self, name: str | None = None, params: NoHitLRUParams | None = None) -> None:
        super().__init__(name, params)
        self.size = self.params.lruSize if self.params.lruSize > 0 else 1024
        self.lru: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._cold: OrderedDict[str, bool] = OrderedDict()  # request id -> cold?

    @staticmethod
    def is_cold(candidates: list[Candidate]) -> bool:
        key = PREFIX_CACHE_MATCH_INFO_KEY
        first = candidates[0].data.get(key) if candidates else None
        if isinstance(first, PrefixCacheMatchInfo) and first.request is not None and first.request.max_match == 0:
            return True  # nothing matched anywhere: no need to look at each candidate
        for c in candidates:
            info = c.data.get(key)
            if info is not None and info.match_blocks > 0:
                return False
        return True

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        cold = self.is_cold(candidates)
        self._cold[request.request_id] = cold
        if len(self._cold) > _PENDING_LIMIT:  # requests that never reached PreRequest
            self._cold.popitem(last=False)
        n = len(candidates)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        positions = {k: i for i, k in enumerate(self.lru)}
        pos = [positions.get(c.key) for c in candidates]
        never_used = pos.count(None)
        denom = float(n - 1)
        out = []
        i = 0  # rank among never-used endpoints, in candidate order
        for p in pos:
            if p is None:
                rank = i
                i += 1
            else:
                rank = never_used + p
            s = 1.0 - rank / denom
            out.append(s if s > 0.0 else 0.0)
        return out

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        if not self._cold.pop(request.request_id, False):
            return
        for profile in (result.primary_profile, self.params.prefillProfile):
            res = result.profile_results.get(profile)
            if res is not None and res.targets:
                key = res.targets[0].key
                self.lru[key] = None
                self.lru.move_to_end(key)
                if len(self.lru) > self.size:
                    self.lru.popitem(last=False)
