"""Every scorer against values hand-computed from the upstream formulas (upstream §3.1)."""

from __future__ import annotations

import pytest
from sched_helpers import cand, cycle, make, request

from plugins.requestcontrol.data import INFLIGHT_LOAD_KEY, PREFIX_CACHE_MATCH_INFO_KEY, InFlightLoad, PrefixCacheMatchInfo


def score(scorer, candidates, req=None):
    return list(scorer.score(cycle(), req or request(), candidates))


def test_queue_scorer_min_max() -> None:
    cs = [cand("10.0.0.1", waiting_queue_size=0), cand("10.0.0.2", waiting_queue_size=5),
          cand("10.0.0.3", waiting_queue_size=10), cand("10.0.0.4", waiting_queue_size=8)]
    # (max - q) / (max - min) with min 0, max 10
    assert score(make("queue-scorer"), cs) == [1.0, 0.5, 0.0, pytest.approx(0.2)]
    same = [cand("10.0.0.1", waiting_queue_size=3), cand("10.0.0.2", waiting_queue_size=3)]
    assert score(make("queue-scorer"), same) == [1.0, 1.0]
    assert score(make("queue-scorer"), []) == []


def test_running_requests_size_scorer() -> None:
    cs = [cand("10.0.0.1", running_requests=4), cand("10.0.0.2", running_requests=12), cand("10.0.0.3", running_requests=8)]
    assert score(make("running-requests-size-scorer"), cs) == [1.0, 0.0, 0.5]


def test_kv_cache_utilization_scorer() -> None:
    cs = [cand("10.0.0.1", kv_cache_usage=0.0), cand("10.0.0.2", kv_cache_usage=0.25), cand("10.0.0.3", kv_cache_usage=1.0)]
    assert score(make("kv-cache-utilization-scorer"), cs) == [1.0, 0.75, 0.0]


def test_lora_affinity_scorer_cases_in_upstream_order() -> None:
    cs = [
        cand("10.0.0.1", active_models={"ad": 1}, max_active_models=1),  # active -> 1.0
        cand("10.0.0.2", active_models={"x": 1}, max_active_models=4),  # free slot -> 0.8
        cand("10.0.0.3", active_models={"x": 1}, waiting_models={"ad": 1}, max_active_models=2),  # waiting, full -> 0.6
        cand("10.0.0.4", active_models={"x": 1, "y": 1}, max_active_models=2),  # full, absent -> 0
        cand("10.0.0.5", waiting_models={"ad": 1}, max_active_models=4),  # waiting but a free slot: 0.8 first
    ]
    assert score(make("lora-affinity-scorer"), cs, request(model="ad")) == [1.0, 0.8, 0.6, 0.0, 0.8]


def test_load_aware_scorer() -> None:
    cs = [cand("10.0.0.1", waiting_queue_size=0), cand("10.0.0.2", waiting_queue_size=32),
          cand("10.0.0.3", waiting_queue_size=128), cand("10.0.0.4", waiting_queue_size=500)]
    assert score(make("load-aware-scorer"), cs) == [0.5, 0.5 * (1 - 32 / 128), 0.0, 0.0]
    s = make("load-aware-scorer", {"threshold": 10})
    assert score(s, cs[:2]) == [0.5, 0.0]
    assert make("load-aware-scorer", {"threshold": -3}).threshold == 128


def with_load(c, requests: int, tokens: int = 0):
    c.data[INFLIGHT_LOAD_KEY] = InFlightLoad(requests, tokens)
    return c


def test_active_request_scorer() -> None:
    cs = [with_load(cand("10.0.0.1"), 0), with_load(cand("10.0.0.2"), 2), with_load(cand("10.0.0.3"), 4), cand("10.0.0.4")]
    # maxCount 4: (4 - n) / 4; no data counts as 0 requests
    assert score(make("active-request-scorer"), cs) == [1.0, 0.5, 0.0, 1.0]
    s = make("active-request-scorer", {"idleThreshold": 2, "maxBusyScore": 0.5})
    assert score(s, cs) == [1.0, 1.0, 0.0, 1.0]
    s = make("active-request-scorer", {"idleThreshold": 1, "maxBusyScore": 0.5})
    assert score(s, cs) == [1.0, 0.25, 0.0, 1.0]
    assert make("active-request-scorer", {"maxBusyScore": 7.0}).max_busy == 1.0


def test_active_request_scorer_warns_on_request_timeout(handle) -> None:
    make("active-request-scorer", {"requestTimeout": "2m"}, h=handle)
    assert any("requestTimeout" in w for w in handle.warnings)


def test_token_load_scorer() -> None:
    cs = [with_load(cand("10.0.0.1"), 1, 0), with_load(cand("10.0.0.2"), 1, 100), with_load(cand("10.0.0.3"), 3, 5000)]
    assert score(make("token-load-scorer", {"queueThresholdTokens": 1000}), cs) == [1.0, 0.9, 0.0]
    assert score(make("token-load-scorer"), cs)[1] == pytest.approx(1 - 100 / 4194304)


def with_prefix(c, match: int, total: int):
    c.data[PREFIX_CACHE_MATCH_INFO_KEY] = PrefixCacheMatchInfo(match, total, 16)
    return c


def test_prefix_cache_scorer() -> None:
    cs = [with_prefix(cand("10.0.0.1"), 3, 4), with_prefix(cand("10.0.0.2"), 0, 4), cand("10.0.0.3"),
          with_prefix(cand("10.0.0.4"), 0, 0)]
    assert score(make("prefix-cache-scorer"), cs) == [0.75, 0.0, 0.0, 0.0]


def test_prefix_cache_scorer_warns_about_legacy_params(handle) -> None:
    make("prefix-cache-scorer", {"maxPrefixBlocksToMatch": 256, "lruCapacityPerServer": 31250}, h=handle)
    (w,) = handle.warnings
    assert "maxPrefixBlocksToMatch" in w and "approx-prefix-cache-producer" in w


def test_no_hit_lru_scorer_cold_and_warm() -> None:
    from epp.framework.scheduling import ProfileResult, SchedulingResult

    s = make("no-hit-lru-scorer")
    cs = [with_prefix(cand(f"10.0.0.{i}"), 0, 4) for i in (1, 2, 3)]
    # cold, nothing used yet: never-used ranks in candidate order: 1 - i / (n - 1)
    assert score(s, cs, request(rid="a")) == [1.0, 0.5, 0.0]

    def served(rid: str, target):
        s.pre_request(request(rid=rid), SchedulingResult({"default": ProfileResult([target])}, "default"))

    served("a", cs[0])
    # 10.0.0.1 used: never-used (2, 3) rank 0, 1; used rank = 2 + lru position 0
    assert score(s, cs, request(rid="b")) == [0.0, 1.0, 0.5]
    served("b", cs[1])
    # LRU (oldest first): .1, .2 ; never-used .3 rank 0; .1 rank 1; .2 rank 2
    assert score(s, cs, request(rid="c")) == [0.5, 0.0, 1.0]
    # a warm request scores 0.5 everywhere and does not touch the LRU
    warm = [with_prefix(cand("10.0.0.1"), 2, 4), with_prefix(cand("10.0.0.2"), 0, 4), with_prefix(cand("10.0.0.3"), 0, 4)]
    assert score(s, warm, request(rid="d")) == [0.5, 0.5, 0.5]
    served("d", warm[2])
    assert list(s.lru) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert score(s, cs[:1], request(rid="e")) == [1.0]


def test_no_hit_lru_scorer_lru_size() -> None:
    from epp.framework.scheduling import ProfileResult, SchedulingResult

    s = make("no-hit-lru-scorer", {"lruSize": 2})
    cs = [cand(f"10.0.0.{i}") for i in (1, 2, 3)]
    for i, c in enumerate(cs):
        s.score(cycle(), request(rid=str(i)), cs)
        s.pre_request(request(rid=str(i)), SchedulingResult({"default": ProfileResult([c])}, "default"))
    assert list(s.lru) == ["10.0.0.2:8000", "10.0.0.3:8000"]
